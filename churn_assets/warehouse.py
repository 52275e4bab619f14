"""The DuckDB warehouse: table definitions, short-lived connections and published read models.

Only Dagster runs (and the ``churn land`` CLI, which runs the same code) write the warehouse file.
Anything else reads Parquet read models that writers publish atomically (write to a temporary
file, then rename), so a reader never meets DuckDB's single-writer file lock.
"""

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd

__all__ = [
    "LANDING_TABLES",
    "LEGACY_EPOCH",
    "SCHEMA_SQL",
    "TABLE_DDL",
    "WarehouseMigrationError",
    "connect",
    "ensure_schema",
    "publish_read_model",
    "read_model_path",
    "load_read_model",
    "ReadModelMissing",
]

log = logging.getLogger(__name__)

# topic -> landing table. Every landed row keeps its Kafka coordinates as the primary key, so a
# replayed message is a no-op (INSERT ... ON CONFLICT DO NOTHING). The coordinates include the log
# epoch (``kafka_epoch``: the cluster id, and the topic id where the broker has one), because
# offsets start again from 0 in a new log: a restarted embedded broker or a recreated topic.
LANDING_TABLES = {
    "churn.customers": "landed_customer_events",
    "ml.predictions": "landed_predictions",
    "ml.feedback": "landed_feedback",
}

# The epoch of rows and offsets landed before epochs were recorded (see ``ensure_schema``); also
# the default for rows written without one (test fixtures that fill landed tables directly).
LEGACY_EPOCH = "legacy"

TABLE_DDL = {
    "landing_offsets": """
CREATE TABLE IF NOT EXISTS landing_offsets (
    kafka_epoch VARCHAR NOT NULL,
    topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_epoch, topic, kafka_partition)
);""",
    "landed_customer_events": """
CREATE TABLE IF NOT EXISTS landed_customer_events (
    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',
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
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
    "landed_predictions": """
CREATE TABLE IF NOT EXISTS landed_predictions (
    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',
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
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
    "landed_feedback": """
CREATE TABLE IF NOT EXISTS landed_feedback (
    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',
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
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
    "dead_letters": """
CREATE TABLE IF NOT EXISTS dead_letters (
    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    message_key VARCHAR,
    raw_value VARCHAR,
    reason VARCHAR NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
}

SCHEMA_SQL = "\n".join(TABLE_DDL.values()) + "\n"


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


class WarehouseMigrationError(RuntimeError):
    """The warehouse has a table layout this code cannot migrate; nothing was changed."""


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_catalog = current_database() AND table_schema = 'main' "
        "AND table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return [row[0] for row in rows]


def _migrate_to_epochs(con: duckdb.DuckDBPyConnection) -> None:
    """Rebuild tables created before log epochs with ``kafka_epoch`` in their primary key.

    Existing rows and offsets get the epoch :data:`LEGACY_EPOCH`. One transaction: either every
    table is migrated with every row, or nothing changes. DuckDB cannot alter a primary key, so
    each table is renamed, recreated and copied.
    """
    old = {t: cols for t in TABLE_DDL if (cols := _columns(con, t)) and "kafka_epoch" not in cols}
    if not old:
        return
    counts: dict[str, int] = {}
    con.begin()
    try:
        for table, columns in old.items():
            before = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            listed = ", ".join(columns)
            con.execute(f"ALTER TABLE {table} RENAME TO {table}__pre_epoch")
            con.execute(TABLE_DDL[table])
            unknown = set(columns) - set(_columns(con, table))
            if unknown:
                raise WarehouseMigrationError(
                    f"table {table} has columns {sorted(unknown)} that the current schema does "
                    "not know; cannot migrate it to per-epoch keys (nothing was changed)"
                )
            con.execute(
                f"INSERT INTO {table} (kafka_epoch, {listed}) "
                f"SELECT ?, {listed} FROM {table}__pre_epoch",
                [LEGACY_EPOCH],
            )
            after = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            if after != before:
                raise WarehouseMigrationError(
                    f"migrating {table} copied {after} of its {before} rows; rolled back"
                )
            con.execute(f"DROP TABLE {table}__pre_epoch")
            counts[table] = int(after)
        con.commit()
    except BaseException:
        con.rollback()
        raise
    log.warning(
        "migrated the warehouse to per-log-epoch Kafka keys: existing rows and offsets got "
        "kafka_epoch %r (%s)",
        LEGACY_EPOCH,
        ", ".join(f"{table}: {rows} rows" for table, rows in counts.items()),
    )


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the landing tables, migrating a warehouse created before log epochs first."""
    _migrate_to_epochs(con)
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
