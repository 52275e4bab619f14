"""The DuckDB warehouse: table definitions, short-lived connections and published read models.

Only Dagster runs (and the ``churn land`` CLI, which runs the same code) write the warehouse file.
Anything else reads Parquet read models that writers publish atomically (write to a temporary
file, then rename), so a reader never meets DuckDB's single-writer file lock. The landed tables'
read models are published in parts (immutable part files named by an atomically replaced
manifest, :func:`publish_read_model_parts`), so a landing run writes its new rows, not the whole
table; :func:`read_model_table`, :func:`read_model_rows` and :func:`load_read_model` read one
whole version of either kind.
"""

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from churn_assets.contract import Contract, Feature
from churn_assets.schemas import DEFAULT_CONTRACT

__all__ = [
    "BUSINESS_KEYS",
    "LANDING_TABLES",
    "LEGACY_EPOCH",
    "SCHEMA_SQL",
    "TABLE_DDL",
    "customer_events_ddl",
    "schema_sql",
    "table_ddl",
    "WarehouseMigrationError",
    "business_key_index",
    "connect",
    "ensure_schema",
    "publish_read_model",
    "read_model_path",
    "load_read_model",
    "remove_stale_temp_files",
    "ReadModelMissing",
    "ReadModelUnreadable",
    "ReadModelChanging",
    "PublishedParts",
    "manifest_path",
    "parts_dir",
    "publish_read_model_parts",
    "read_model_rows",
    "read_model_table",
]

log = logging.getLogger(__name__)

# topic -> landing table. Every landed row keeps its Kafka coordinates as the primary key. The
# coordinates include the log epoch (``kafka_epoch``: the cluster id, and the topic id where the
# broker has one), because offsets start again from 0 in a new log: a restarted embedded broker or
# a recreated topic. Rows are also unique by their message's own id (``BUSINESS_KEYS``).
LANDING_TABLES = {
    "churn.customers": "landed_customer_events",
    "ml.predictions": "landed_predictions",
    "ml.feedback": "landed_feedback",
}

# landing table -> the message's own identity (its business key). Offsets make landing exactly-once
# within one Kafka log; this key makes it exactly-once across logs: a message produced again (into
# a restarted broker's new log, or into the same log) is a replay, counted in ``landing_replays``
# and not inserted. A unique index (``business_key_index``) holds it. A prediction is one arm's
# answer of one model version to one request, so one request id appears once per arm and version.
BUSINESS_KEYS = {
    "landed_customer_events": ("event_id",),
    "landed_predictions": ("request_id", "arm", "model_version"),
    "landed_feedback": ("event_id",),
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
    "landed_customer_events": "",  # from the contract: see customer_events_ddl
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
    published_at TIMESTAMPTZ,
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
    # Valid messages that were not inserted because their business key had landed already (or
    # came earlier in the same batch), per topic and log epoch; moved in the batch's transaction.
    "landing_replays": """
CREATE TABLE IF NOT EXISTS landing_replays (
    kafka_epoch VARCHAR NOT NULL,
    topic VARCHAR NOT NULL,
    replayed BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_epoch, topic)
);""",
}


class WarehouseMigrationError(RuntimeError):
    """The warehouse has a table layout this code cannot migrate; nothing was changed."""


# A contract kind -> the DuckDB type of its column in ``landed_customer_events``.
_KIND_TYPES = {
    "integer": "INTEGER",
    "number": "DOUBLE",
    "category": "VARCHAR",
    "boolean": "BOOLEAN",
}
# The column types an existing table may hold for a kind (older or wider integer columns).
_COMPATIBLE_TYPES = {
    "integer": {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"},
    "number": {"DOUBLE", "FLOAT", "DECIMAL"},
    "category": {"VARCHAR"},
    "boolean": {"BOOLEAN"},
}
_INT32 = 2**31 - 1
# The columns of landed_customer_events that are not features.
_EVENT_COLUMNS = frozenset(
    {
        "kafka_epoch",
        "kafka_topic",
        "kafka_partition",
        "kafka_offset",
        "event_id",
        "customer_id",
        "event_time",
        "landed_at",
    }
)


def _column_type(feature: Feature) -> str:
    """The DuckDB type of a feature's column; an integer wider than 32 bits takes BIGINT."""
    if feature.kind == "integer" and any(
        bound is not None and abs(bound) > _INT32 for bound in (feature.minimum, feature.maximum)
    ):
        return "BIGINT"
    if feature.kind == "integer" and (feature.minimum is None or feature.maximum is None):
        return "BIGINT"
    return _KIND_TYPES[feature.kind]


def customer_events_ddl(contract: Contract) -> str:
    """``landed_customer_events`` for ``contract``: the Kafka coordinates, the event's identity
    and one column per feature (NOT NULL where the contract rejects a missing value)."""
    taken = sorted(set(contract.names) & _EVENT_COLUMNS)
    if taken:
        raise WarehouseMigrationError(
            f"feature names {taken} are columns of every customer event (with "
            f"{', '.join(sorted(_EVENT_COLUMNS))}); rename the features in the contract"
        )
    features = "".join(
        f"    {f.name} {_column_type(f)}{' NOT NULL' if f.missing == 'reject' else ''},\n"
        for f in contract.features
    )
    return (
        "\nCREATE TABLE IF NOT EXISTS landed_customer_events (\n"
        "    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',\n"
        "    kafka_topic VARCHAR NOT NULL,\n"
        "    kafka_partition INTEGER NOT NULL,\n"
        "    kafka_offset BIGINT NOT NULL,\n"
        "    event_id VARCHAR NOT NULL,\n"
        "    customer_id VARCHAR NOT NULL,\n"
        "    event_time TIMESTAMPTZ NOT NULL,\n"
        f"{features}"
        "    landed_at TIMESTAMPTZ NOT NULL,\n"
        "    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)\n"
        ");"
    )


def table_ddl(contract: Contract) -> dict[str, str]:
    """Every warehouse table's ``CREATE TABLE IF NOT EXISTS``, customer events per ``contract``."""
    return TABLE_DDL | {"landed_customer_events": customer_events_ddl(contract)}


def schema_sql(contract: Contract) -> str:
    return "\n".join(table_ddl(contract).values()) + "\n"


TABLE_DDL.update(landed_customer_events=customer_events_ddl(DEFAULT_CONTRACT))
# The tables of the default contract (what warehouses held before contracts).
SCHEMA_SQL = schema_sql(DEFAULT_CONTRACT)

# A dead process's temporary read-model file: ``.<name>.<pid>.tmp`` (publish_read_model and the
# JSON read models beside it write one, then rename it into place).
_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.tmp$")


def business_key_index(table: str) -> str:
    """The name of the unique index on ``table``'s business key."""
    return f"{table}_business_key"


def _business_key_ddl(table: str) -> str:
    columns = ", ".join(BUSINESS_KEYS[table])
    return f"CREATE UNIQUE INDEX IF NOT EXISTS {business_key_index(table)} ON {table} ({columns})"


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


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_catalog = current_database() AND table_schema = 'main' "
        "AND table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return [row[0] for row in rows]


def _recreate(con: duckdb.DuckDBPyConnection, table: str, old: str, purpose: str) -> list[str]:
    """Inside the caller's transaction: rename ``table`` to ``old`` and create it again from
    :data:`TABLE_DDL` (DuckDB cannot alter a primary key or index rows deleted in the same
    transaction); returns the old columns, which the caller copies. A column the current
    schema does not know stops the migration."""
    columns = _columns(con, table)
    con.execute(f"ALTER TABLE {table} RENAME TO {old}")
    con.execute(TABLE_DDL[table])
    unknown = set(columns) - set(_columns(con, table))
    if unknown:
        raise WarehouseMigrationError(
            f"table {table} has columns {sorted(unknown)} that the current schema does not "
            f"know; cannot {purpose} (nothing was changed)"
        )
    return columns


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
            _recreate(con, table, f"{table}__pre_epoch", "migrate it to per-epoch keys")
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


def _indexes(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "SELECT index_name FROM duckdb_indexes() "
        "WHERE database_name = current_database() AND schema_name = 'main'"
    ).fetchall()
    return {row[0] for row in rows}


def _migrate_to_business_keys(con: duckdb.DuckDBPyConnection) -> None:
    """Give landed tables their business-key unique index, and dead letters their outbox column.

    Landed tables without the index may hold one message several times (landed from two logs, or
    produced twice): each keeps its first landed row (earliest ``landed_at``, then epoch,
    partition, offset). DuckDB cannot build a unique index over rows deleted in the same
    transaction, so a table with rows is rebuilt (renamed, recreated with the index, the first
    rows copied, the old one dropped). ``dead_letters`` without ``published_at`` gets the column;
    its rows count as unpublished, so the next landing run of their topic republishes them (at
    least once: a consumer of ``churn.dead-letter`` dedupes by key). One transaction for all of
    it; a warehouse that has both already is left alone.
    """
    indexes = _indexes(con)
    missing = [t for t in BUSINESS_KEYS if business_key_index(t) not in indexes]
    outbox = "published_at" not in _columns(con, "dead_letters")
    if not missing and not outbox:
        return
    removed: dict[str, int] = {}
    kept: dict[str, int] = {}
    unpublished = 0
    con.begin()
    try:
        for table in missing:
            before = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            if before == 0:
                con.execute(_business_key_ddl(table))
                continue
            old = f"{table}__pre_business_key"
            columns = _recreate(con, table, old, "give it a business-key index")
            con.execute(_business_key_ddl(table))
            listed = ", ".join(columns)
            key = ", ".join(BUSINESS_KEYS[table])
            con.execute(
                f"INSERT INTO {table} ({listed}) SELECT {listed} FROM {old} "
                f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY landed_at, kafka_epoch, "
                "kafka_partition, kafka_offset) = 1"
            )
            after = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            distinct = con.execute(f"SELECT count(DISTINCT ({key})) FROM {old}").fetchall()[0][0]
            if after != distinct:
                raise WarehouseMigrationError(
                    f"deduplicating {table} kept {after} rows for {distinct} distinct business "
                    "keys; rolled back"
                )
            con.execute(f"DROP TABLE {old}")
            removed[table] = int(before - after)
            kept[table] = int(after)
        if outbox:
            con.execute("ALTER TABLE dead_letters ADD COLUMN published_at TIMESTAMPTZ")
            unpublished = con.execute("SELECT count(*) FROM dead_letters").fetchall()[0][0]
        con.commit()
    except BaseException:
        con.rollback()
        raise
    if kept:
        log.warning(
            "migrated the warehouse to business-key idempotency: removed %d duplicate rows "
            "(keeping each message's first landed row): %s",
            sum(removed.values()),
            ", ".join(f"{t}: {removed[t]} removed, {kept[t]} kept" for t in kept),
        )
    if unpublished:
        log.warning(
            "dead_letters has a published_at column now; its %d existing dead letters count as "
            "unpublished and are republished to the dead-letter topic once by the next landing "
            "run of their topic (consumers dedupe by key)",
            unpublished,
        )


def _column_types(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, tuple[str, bool]]:
    """Column name -> (DuckDB type, nullable)."""
    rows = con.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_catalog = current_database() AND table_schema = 'main' "
        "AND table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return {name: (kind.split("(")[0], nullable == "YES") for name, kind, nullable in rows}


def _reconcile_feature_columns(con: duckdb.DuckDBPyConnection, contract: Contract) -> None:
    """Fit an existing ``landed_customer_events`` to ``contract`` without losing a row.

    A contract feature the table lacks is added as a nullable column (the rows landed before
    have no value for it); a column the contract no longer declares stays with its data and
    loses NOT NULL, so new events without it land. A column whose type does not fit the
    feature's kind stops here (nothing changed): landing would otherwise fail on every row.
    """
    table = "landed_customer_events"
    present = _column_types(con, table)
    wrong = [
        f"{f.name} is {present[f.name][0]}, the contract says {f.kind}"
        for f in contract.features
        if f.name in present and present[f.name][0] not in _COMPATIBLE_TYPES[f.kind]
    ]
    if wrong:
        raise WarehouseMigrationError(
            f"{table} has columns the feature contract cannot use ({'; '.join(wrong)}); rename "
            "the feature in the contract or migrate the column (nothing was changed)"
        )
    added = [f for f in contract.features if f.name not in present]
    relaxed = [
        name
        for name, (_, nullable) in present.items()
        if name not in _EVENT_COLUMNS and name not in contract.names and not nullable
    ]
    if not added and not relaxed:
        return
    con.begin()
    try:
        for feature in added:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {feature.name} {_column_type(feature)}")
        if relaxed:
            # DuckDB alters no column of a table with an index: drop and rebuild the unique
            # business-key index around it (rows only gain NULLs, so it rebuilds as it was).
            con.execute(f"DROP INDEX IF EXISTS {business_key_index(table)}")
            for name in relaxed:
                con.execute(f"ALTER TABLE {table} ALTER COLUMN {name} DROP NOT NULL")
            con.execute(_business_key_ddl(table))
        con.commit()
    except BaseException:
        con.rollback()
        raise
    if added:
        log.warning(
            "%s: added nullable columns %s for the feature contract; rows landed before have "
            "no value there",
            table,
            ", ".join(f.name for f in added),
        )
    if relaxed:
        log.warning(
            "%s: columns %s are not in the feature contract any more; they keep their data and "
            "take NULL for new events",
            table,
            ", ".join(relaxed),
        )


def ensure_schema(con: duckdb.DuckDBPyConnection, contract: Contract | None = None) -> None:
    """Create the landing tables, migrating an older warehouse first.

    Migrations, each idempotent: tables from before log epochs get ``kafka_epoch``; landed tables
    get their business-key unique index (deduplicated first); ``dead_letters`` gets
    ``published_at``. Those warehouses predate contracts, so they migrate with the default
    contract's columns. With a ``contract``, ``landed_customer_events`` is then fitted to it
    (missing feature columns added, nullable; see :func:`_reconcile_feature_columns`); without
    one, a new warehouse gets the default contract's columns and an existing one is left as is.
    """
    _migrate_to_epochs(con)
    con.execute(schema_sql(contract or DEFAULT_CONTRACT))
    _migrate_to_business_keys(con)
    if contract is not None:
        _reconcile_feature_columns(con, contract)


def read_model_path(read_models_dir: Path, name: str) -> Path:
    """The file that stands for a read model's published version: its manifest where it is
    published in parts (the landed tables, :func:`publish_read_model_parts`), else its one
    Parquet file. Check it exists, or stat it to see a new version; read the rows through
    :func:`read_model_table`, :func:`read_model_rows` or :func:`load_read_model`, never by
    opening the path."""
    manifest = manifest_path(read_models_dir, name)
    return manifest if manifest.exists() else _single_path(read_models_dir, name)


class ReadModelMissing(FileNotFoundError):
    """A read model has not been published yet."""


class ReadModelUnreadable(ValueError):
    """A read model's file is there but is not a Parquet file Arrow can read."""


def read_model_table(
    read_models_dir: Path, name: str, columns: list[str] | None = None
) -> pa.Table:
    """One published version of a read model (``columns`` only, when given) as an Arrow table.

    Every file of the version is read through a handle opened before reading: DuckDB's
    ``read_parquet`` opens the path again to scan, and a publisher renaming a new file into
    place in between gave it the old footer with the new file's bytes ("TProtocolException:
    Invalid data"). Open handles pin one version, whole or in parts.
    """
    with _open_version(read_models_dir, name) as handles:
        try:
            tables = [pq.read_table(handle, columns=columns) for handle in handles]
        except (pa.ArrowException, OSError) as exc:
            raise ReadModelUnreadable(f"read model {name!r}: {exc}") from exc
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def read_model_rows(read_models_dir: Path, name: str) -> int:
    """The row count of one published version of a read model, from its footers alone."""
    with _open_version(read_models_dir, name) as handles:
        try:
            return sum(pq.ParquetFile(handle).metadata.num_rows for handle in handles)
        except (pa.ArrowException, OSError) as exc:
            raise ReadModelUnreadable(f"read model {name!r}: {exc}") from exc


def load_read_model(read_models_dir: Path, name: str) -> pd.DataFrame:
    """A published read model as a DataFrame, for dashboards and notebooks.

    Reads the Parquet files, never the live warehouse, so it works while Dagster runs write.
    """
    table = read_model_table(read_models_dir, name)
    con = duckdb.connect()
    try:
        return con.from_arrow(table).df()  # DuckDB's own conversion, as read_parquet's .df()
    finally:
        con.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(read_models_dir: Path) -> list[Path]:
    """Remove the ``.<name>.<pid>.tmp`` files that dead processes left in ``read_models_dir``.

    A publisher killed between writing its temporary file and renaming it leaves the file
    behind. Only files whose pid is not a live process (in this PID namespace) are removed, so a
    live publisher's file is never touched; a pid reused by another process keeps its file until
    a later sweep. Returns the removed paths.
    """
    removed: list[Path] = []
    if not read_models_dir.is_dir():
        return removed
    folders = [read_models_dir, *read_models_dir.glob("*.parts")]
    for path in (p for folder in folders if folder.is_dir() for p in folder.iterdir()):
        match = _TEMP_FILE.match(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another sweeper was first
            path.unlink()
            removed.append(path)
    if removed:
        log.info(
            "removed %d temporary read-model files left by dead processes: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def publish_read_model(
    con: duckdb.DuckDBPyConnection, read_models_dir: Path, name: str, query: str
) -> tuple[Path, int]:
    """Write ``query``'s result to ``<read_models_dir>/<name>.parquet`` atomically.

    ``query`` is a trusted SQL constant (never user input). Returns the path and row count.
    Temporary files that dead publishers left in the folder are swept first.
    """
    read_models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(read_models_dir)
    final = _single_path(read_models_dir, name)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    con.execute(f"COPY ({query}) TO '{tmp.as_posix()}' (FORMAT parquet)")
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{tmp.as_posix()}')").fetchall()[0]
    os.replace(tmp, final)
    return final, int(rows[0]) if rows else 0


# ---------------------------------------------------------------------------------------------
# Read models published in parts.
#
# A landed table grows by each run's rows; rewriting it whole at every run made a run's cost
# grow with the table. So a landed table's read model is a manifest (``<name>.manifest.json``)
# naming immutable Parquet parts in ``<name>.parts/``. Each part holds the rows whose
# ``landed_at`` lies in its range (after, upto]; a publish writes one part with the rows landed
# since the last one, then merges the newest parts while the older of the two is less than twice
# the newer's size (so a table of N rows has about log2(N) parts and each row is rewritten about
# log2(N) times over its life), and atomically replaces the manifest. A reader reads the
# manifest, then opens every part it names; parts are never changed, and parts that a newer
# manifest no longer names are deleted only after that manifest is in place, so a reader that
# meets a deleted part simply reads the newer manifest again.
#
# The manifest counts the rows it covers; a publish first checks that the table still holds
# exactly that many rows up to the manifest's ``upto`` (a migration that deduplicated rows, a
# fixture written around the lander, a changed column list) and publishes the whole table again
# when it does not.
# ---------------------------------------------------------------------------------------------

MANIFEST_FORMAT = 1
# A reader that keeps meeting parts a compaction removed gives up after this many manifests.
_READ_ATTEMPTS = 20
# Fault injection for the kill tests: "<point>" makes the publisher SIGKILL itself there.
READ_MODEL_FAULT_ENV_VAR = "CHURN_READ_MODEL_FAULT"
_READ_MODEL_FAULT_POINTS = ("before_manifest", "before_part_cleanup")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def manifest_path(read_models_dir: Path, name: str) -> Path:
    return read_models_dir / f"{name}.manifest.json"


def parts_dir(read_models_dir: Path, name: str) -> Path:
    return read_models_dir / f"{name}.parts"


def _single_path(read_models_dir: Path, name: str) -> Path:
    return read_models_dir / f"{name}.parquet"


class ReadModelChanging(RuntimeError):
    """A read model was replaced faster than a reader could open one version of it."""


@dataclass(frozen=True)
class PublishedParts:
    """What :func:`publish_read_model_parts` did: the read model's rows, the rows it wrote to
    new parts (the new rows, plus those of parts it merged), and its parts now."""

    rows: int
    written: int
    parts: int
    rebuilt: bool


def _load_manifest(read_models_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        text = manifest_path(read_models_dir, name).read_bytes()
    except FileNotFoundError:
        return None
    manifest = json.loads(text)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ReadModelChanging(
            f"read model {name!r} has a manifest of format {manifest.get('format')!r}; this code "
            f"reads format {MANIFEST_FORMAT}"
        )
    return manifest


@contextlib.contextmanager
def _open_version(read_models_dir: Path, name: str) -> Iterator[list[Any]]:
    """Open handles on every file of one published version of a read model."""
    for _ in range(_READ_ATTEMPTS):
        manifest = _load_manifest(read_models_dir, name)
        if manifest is None:
            single = _single_path(read_models_dir, name)
            try:
                handle = single.open("rb")
            except FileNotFoundError:
                if manifest_path(read_models_dir, name).exists():
                    continue  # published in parts meanwhile (its single file then removed)
                raise ReadModelMissing(
                    f"read model {name!r} has not been published yet ({single}); "
                    "materialise the asset that publishes it in Dagster"
                ) from None
            with handle:
                yield [handle]
            return
        folder = parts_dir(read_models_dir, name)
        handles: list[Any] = []
        try:
            try:
                for part in manifest["parts"]:
                    handles.append((folder / part["file"]).open("rb"))
            except FileNotFoundError:
                continue  # a newer manifest replaced these parts: read that one
            yield handles
            return
        finally:
            for handle in handles:
                handle.close()
    raise ReadModelChanging(
        f"read model {name!r} was republished {_READ_ATTEMPTS} times while it was being opened"
    )


def _fault(point: str) -> None:
    if os.environ.get(READ_MODEL_FAULT_ENV_VAR) == point:
        log.warning("fault injection: SIGKILL at %s", point)
        os.kill(os.getpid(), signal.SIGKILL)


def _timestamp(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=us)


def _write_part(
    con: duckdb.DuckDBPyConnection,
    folder: Path,
    table: str,
    order_by: str,
    after_us: int | None,
    upto_us: int | None,
) -> dict[str, Any]:
    """Write the rows of ``table`` with ``landed_at`` in (after, upto] as a new part."""
    where, params = [], []
    if after_us is not None:
        where.append("landed_at > ?")
        params.append(_timestamp(after_us))
    if upto_us is not None:
        where.append("landed_at <= ?")
        params.append(_timestamp(upto_us))
    condition = f"WHERE {' AND '.join(where)} " if where else ""
    file = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.parquet"
    tmp = folder / f".{file}.{os.getpid()}.tmp"
    con.execute(
        f"COPY (SELECT * FROM {table} {condition}ORDER BY {order_by}) "
        f"TO '{tmp.as_posix()}' (FORMAT parquet)",
        params,
    )
    with tmp.open("rb") as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    os.replace(tmp, folder / file)
    return {"file": file, "rows": rows, "after_us": after_us, "upto_us": upto_us}


def _coverage(con: duckdb.DuckDBPyConnection, table: str, upto_us: int | None) -> tuple[int, int]:
    """The rows of ``table`` landed up to ``upto_us``: their count and the sum of their
    ``landed_at`` in microseconds (a scan of one column: cheap beside writing the rows)."""
    count, total = con.execute(
        f"SELECT count(*), coalesce(sum(epoch_us(landed_at)), 0)::HUGEINT::VARCHAR FROM {table} "
        "WHERE landed_at <= ?",
        [_timestamp(upto_us) if upto_us is not None else None],
    ).fetchall()[0]
    return int(count), int(total)


def publish_read_model_parts(
    con: duckdb.DuckDBPyConnection, read_models_dir: Path, table: str, order_by: str
) -> PublishedParts:
    """Publish ``table`` (append-only, with a ``landed_at`` column) as a read model in parts:
    only the rows landed since the last publish are written, plus the merge of the newest parts
    (see the comment above). ``table`` and ``order_by`` are trusted SQL names, never user input.
    """
    read_models_dir.mkdir(parents=True, exist_ok=True)
    folder = parts_dir(read_models_dir, table)
    folder.mkdir(exist_ok=True)
    remove_stale_temp_files(read_models_dir)
    columns = _columns(con, table)
    old = _load_manifest(read_models_dir, table)
    parts: list[dict[str, Any]] = []
    rebuilt = True
    if old is not None and old["columns"] == columns and old["parts"]:
        upto = old["parts"][-1]["upto_us"]
        covered = _coverage(con, table, upto)
        if covered == (old["rows"], old.get("landed_at_sum")):
            parts, rebuilt = list(old["parts"]), False
        else:
            log.warning(
                "read model %s: the table's rows up to the last published one (%d, landed_at "
                "sum %s) are not the published ones (%d, %s): rows changed around the lander "
                "(e.g. a migration); publishing it whole again",
                table,
                *covered,
                old["rows"],
                old.get("landed_at_sum"),
            )
    newest = con.execute(f"SELECT epoch_us(max(landed_at)) FROM {table}").fetchall()[0][0]
    after = parts[-1]["upto_us"] if parts else None
    written = 0
    if not parts or (newest is not None and (after is None or newest > after)):
        # An empty part (the schema of a table published before it had rows) goes with new rows.
        parts = [p for p in parts if p["rows"]]
        after = parts[-1]["upto_us"] if parts else None
        part = _write_part(con, folder, table, order_by, after, newest)
        parts.append(part)
        written += part["rows"]
        while len(parts) >= 2 and parts[-2]["rows"] < 2 * parts[-1]["rows"]:
            merged = _write_part(
                con, folder, table, order_by, parts[-2]["after_us"], parts[-1]["upto_us"]
            )
            if merged["rows"] != parts[-2]["rows"] + parts[-1]["rows"]:
                raise ReadModelChanging(
                    f"merging the newest parts of read model {table} gave {merged['rows']} rows "
                    f"for {parts[-2]['rows']} + {parts[-1]['rows']}; rows changed while it "
                    "published (is a second lander running?)"
                )
            parts[-2:] = [merged]
            written += merged["rows"]
    if rebuilt or written:
        manifest = {
            "format": MANIFEST_FORMAT,
            "table": table,
            "columns": columns,
            "rows": sum(p["rows"] for p in parts),
            # With ``rows``, what tells the next publish that the published rows are unchanged.
            "landed_at_sum": _coverage(con, table, parts[-1]["upto_us"])[1],
            "parts": parts,
            "published_at": datetime.now(UTC).isoformat(),
        }
        _fault("before_manifest")
        tmp = manifest_path(read_models_dir, table).with_name(
            f".{table}.manifest.json.{os.getpid()}.tmp"
        )
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path(read_models_dir, table))
    _fault("before_part_cleanup")
    # The whole-file read model of earlier releases, and parts no manifest names any more.
    with contextlib.suppress(FileNotFoundError):
        _single_path(read_models_dir, table).unlink()
    named = {p["file"] for p in parts}
    for path in folder.iterdir():
        if path.suffix == ".parquet" and path.name not in named:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return PublishedParts(
        rows=sum(p["rows"] for p in parts), written=written, parts=len(parts), rebuilt=rebuilt
    )
