"""Dagster sensors and schedules of the platform (imported by the definitions)."""

from sensors.landing import kafka_landing_sensor

__all__ = ["all_sensors", "kafka_landing_sensor"]

all_sensors = [kafka_landing_sensor]
