"""The DuckDB warehouse: table definitions, short-lived connections and published read models.

Only Dagster runs (and the ``churn land`` CLI, which runs the same code) write the warehouse file.
Anything else reads Parquet read models that writers publish atomically (write to a temporary
file, then rename), so a reader never meets DuckDB's single-writer file lock.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd

__all__ = [
    "LANDING_TABLES",
    "SCHEMA_SQL",
    "connect",
    "ensure_schema",
    "publish_read_model",
    "read_model_path",
    "load_read_model",
    "ReadModelMissing",
]

# topic -> landing table. Every landed row keeps its Kafka coordinates as the primary key, so a
# replayed message is a no-op (INSERT ... ON CONFLICT DO NOTHING).
LANDING_TABLES = {
    "churn.customers": "landed_customer_events",
    "ml.predictions": "landed_predictions",
    "ml.feedback": "landed_feedback",
}

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS landing_offsets (
    topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, kafka_partition)
);

CREATE TABLE IF NOT EXISTS landed_customer_events (
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    event_id VARCHAR NOT NULL,
    customer_id VARCHAR NOT NULL,
    event_time TIMESTAMPTZ NOT NULL,
    customer_tenure INTEGER NOT NULL,
    monthly_charges DOUBLE NOT NULL,
    total_charges DOUBLE NOT NULL,
    contract_type VARCHAR NOT NULL,
    payment_method VARCHAR NOT NULL,
    internet_service VARCHAR NOT NULL,
    support_tickets INTEGER NOT NULL,
    login_frequency DOUBLE NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);

CREATE TABLE IF NOT EXISTS landed_predictions (
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    request_id VARCHAR NOT NULL,
    customer_id VARCHAR,
    model_name VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    arm VARCHAR NOT NULL,
    score DOUBLE,
    latency_ms DOUBLE NOT NULL,
    status VARCHAR NOT NULL,
    error VARCHAR,
    features JSON,
    predicted_at TIMESTAMPTZ NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);

CREATE TABLE IF NOT EXISTS landed_feedback (
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    event_id VARCHAR NOT NULL,
    customer_id VARCHAR NOT NULL,
    request_id VARCHAR,
    churned BOOLEAN NOT NULL,
    outcome_time TIMESTAMPTZ NOT NULL,
    observed_at TIMESTAMPTZ NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);

CREATE TABLE IF NOT EXISTS dead_letters (
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    message_key VARCHAR,
    raw_value VARCHAR,
    reason VARCHAR NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);
"""


@contextlib.contextmanager
def connect(path: Path, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection to the warehouse file, closed on exit."""
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise FileNotFoundError(f"warehouse {path} does not exist yet; land some data first")
    con = duckdb.connect(str(path), read_only=read_only)
    try:
        yield con
    finally:
        con.close()


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)


def read_model_path(read_models_dir: Path, name: str) -> Path:
    return read_models_dir / f"{name}.parquet"


class ReadModelMissing(FileNotFoundError):
    """A read model has not been published yet."""


def load_read_model(read_models_dir: Path, name: str) -> pd.DataFrame:
    """A published read model as a DataFrame, for dashboards and notebooks.

    Reads the Parquet file, never the live warehouse, so it works while Dagster runs write.
    """
    path = read_model_path(read_models_dir, name)
    if not path.exists():
        raise ReadModelMissing(
            f"read model {name!r} has not been published yet ({path}); "
            "materialise the asset that publishes it in Dagster"
        )
    con = duckdb.connect()
    try:
        return con.execute("SELECT * FROM read_parquet(?)", [str(path)]).df()
    finally:
        con.close()


def publish_read_model(
    con: duckdb.DuckDBPyConnection, read_models_dir: Path, name: str, query: str
) -> tuple[Path, int]:
    """Write ``query``'s result to ``<read_models_dir>/<name>.parquet`` atomically.

    ``query`` is a trusted SQL constant (never user input). Returns the path and row count.
    """
    read_models_dir.mkdir(parents=True, exist_ok=True)
    final = read_model_path(read_models_dir, name)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    con.execute(f"COPY ({query}) TO '{tmp.as_posix()}' (FORMAT parquet)")
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{tmp.as_posix()}')").fetchall()[0]
    os.replace(tmp, final)
    return final, int(rows[0]) if rows else 0
