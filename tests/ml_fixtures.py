"""Shared ML fixtures: a small seeded simulation and what is trained on it."""

from datetime import UTC, datetime

import pandas as pd

from churn_assets.config import Settings
from churn_assets.simulator import SimulationConfig, simulate_frames
from churn_assets.warehouse import connect, ensure_schema


def small_frames(customers: int = 2000, days: int = 90, seed: int = 42):
    return simulate_frames(SimulationConfig(customers=customers, days=days, seed=seed))


def write_landed(settings: Settings, events: pd.DataFrame, feedback: pd.DataFrame) -> None:
    """Append frames to the landed tables as landing would (ML tests that do not need Kafka)."""
    now = datetime.now(UTC)
    with connect(settings.warehouse_path) as con:
        ensure_schema(con)
        for table, topic, frame in (
            ("landed_customer_events", "churn.customers", events),
            ("landed_feedback", "ml.feedback", feedback),
        ):
            start = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            rows = frame.assign(
                kafka_topic=topic,
                kafka_partition=0,
                kafka_offset=range(start, start + len(frame)),
                landed_at=now,
            )
            con.register("incoming", rows)
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
            con.unregister("incoming")
