"""Dagster sensors and schedules of the platform (imported by the definitions)."""

from sensors.landing import kafka_landing_sensor
from sensors.monitoring import monitoring_sensor
from sensors.retraining import retraining_sensor, weekly_retraining_schedule
from sensors.rollout import rollout_sensor

__all__ = [
    "all_schedules",
    "all_sensors",
    "kafka_landing_sensor",
    "monitoring_sensor",
    "retraining_sensor",
    "rollout_sensor",
    "weekly_retraining_schedule",
]

all_sensors = [kafka_landing_sensor, monitoring_sensor, retraining_sensor, rollout_sensor]
all_schedules = [weekly_retraining_schedule]
