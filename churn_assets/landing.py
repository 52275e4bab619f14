"""Kafka -> DuckDB landing with an exactly-once effect.

How a drain works (ARCHITECTURE.md §4):

1. Read each partition's next offset from ``landing_offsets`` in the warehouse and assign the
   consumer there (offsets in Kafka are never the source of truth).
2. Consume in batches bounded by count and time, until every partition reports EOF (or the drain's
   time budget runs out).
3. For each batch, in ONE DuckDB transaction: insert valid rows keyed by (topic, partition,
   offset) with ``ON CONFLICT DO NOTHING``, insert invalid ones into ``dead_letters`` with the
   reason, and move ``landing_offsets`` past the batch. Commit.
4. After the DuckDB commit: mirror dead letters to the dead-letter topic and commit the offsets to
   the Kafka consumer group, for lag visibility only.

A crash anywhere loses nothing and duplicates nothing: before the DuckDB commit the batch is simply
consumed again; after it, the stored offsets skip it.
"""

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb
import orjson
import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from churn_assets.config import Settings
from churn_assets.kafka import make_consumer, make_producer, topic_partitions
from churn_assets.schemas import (
    DATA_TOPICS,
    DeadLetter,
    MessageError,
    Topics,
    decode_message,
    encode_message,
)
from churn_assets.warehouse import (
    LANDING_TABLES,
    connect,
    ensure_schema,
    publish_read_model,
)

__all__ = [
    "FAULT_ENV_VAR",
    "LandingError",
    "LandingReport",
    "Lander",
    "publish_landing_read_models",
    "stored_offsets",
]

log = logging.getLogger(__name__)

# Fault injection for the crash tests: "<point>:<batch number>", e.g. "after_db_commit:3" makes
# the lander SIGKILL itself right after the third batch's DuckDB commit. Points: "in_transaction"
# (rows inserted, not committed) and "after_db_commit" (committed to DuckDB, not to Kafka).
FAULT_ENV_VAR = "CHURN_LANDING_FAULT"
FAULT_POINTS = ("in_transaction", "after_db_commit")
RAW_VALUE_LIMIT = 100_000


class LandingError(RuntimeError):
    """Landing cannot proceed (bad topic, broker error); nothing was committed for the batch."""


@dataclass
class LandingReport:
    """What one drain did; also the Dagster materialisation metadata."""

    topic: str
    rows_landed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    offset_ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    reached_eof: bool = False
    kafka_commit_failures: int = 0
    duration_s: float = 0.0
    # Row counts of the read models published at the end of the drain (table name -> rows).
    published: dict[str, int] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return self.rows_landed + self.dead_lettered

    def describe_ranges(self) -> str:
        return (
            ", ".join(f"p{p}: {lo}..{hi}" for p, (lo, hi) in sorted(self.offset_ranges.items()))
            or "none"
        )


def stored_offsets(con: duckdb.DuckDBPyConnection, topic: str) -> dict[int, int]:
    rows = con.execute(
        "SELECT kafka_partition, next_offset FROM landing_offsets WHERE topic = ?", [topic]
    ).fetchall()
    return {int(p): int(o) for p, o in rows}


def _parse_fault(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, batch = spec.partition(":")
    if point not in FAULT_POINTS or not batch.isdigit():
        raise LandingError(
            f"{FAULT_ENV_VAR}={spec!r} is not '<point>:<batch>' with point in {FAULT_POINTS}"
        )
    return point, int(batch)


def _row_of(topic: str, message: Any) -> dict[str, Any]:
    row = message.model_dump()
    row.pop("schema_version", None)
    if topic == Topics.PREDICTIONS and row.get("features") is not None:
        row["features"] = orjson.dumps(row["features"]).decode()
    return row


class Lander:
    """Drains one data topic into its landing table. One lander per topic at a time."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        *,
        on_batch: Callable[[LandingReport], None] | None = None,
        max_messages: int | None = None,
    ) -> None:
        if topic not in DATA_TOPICS:
            raise LandingError(f"{topic!r} is not a data topic; landable topics: {DATA_TOPICS}")
        self.settings = settings
        self.topic = topic
        self.table = LANDING_TABLES[topic]
        self.on_batch = on_batch
        self.max_messages = max_messages
        self._fault = _parse_fault(os.environ.get(FAULT_ENV_VAR))

    def run(self) -> LandingReport:
        """Drain the topic to EOF (bounded by ``landing.drain_max_seconds``), then publish the
        read models on the same connection, so no other process ever needs the live file."""
        started = time.monotonic()
        report = LandingReport(topic=self.topic)
        partitions = topic_partitions(self.settings, self.topic)
        with connect(self.settings.warehouse_path) as con:
            ensure_schema(con)
            positions = stored_offsets(con, self.topic)
            consumer = make_consumer(self.settings, **{"fetch.wait.max.ms": 100})
            dlq_producer = None
            try:
                consumer.assign(
                    [
                        TopicPartition(self.topic, p, positions.get(p, OFFSET_BEGINNING))
                        for p in partitions
                    ]
                )
                dlq_producer = make_producer(self.settings, **{"linger.ms": 5})
                self._drain(con, consumer, dlq_producer, set(partitions), report, started)
            finally:
                consumer.close()
                if dlq_producer is not None:
                    dlq_producer.flush(10)
            report.published = publish_landing_read_models(con, self.settings, self.topic)
        report.duration_s = time.monotonic() - started
        return report

    def _drain(self, con, consumer, dlq_producer, partitions: set[int], report, started) -> None:
        limits = self.settings.landing
        at_eof: set[int] = set()
        while True:
            batch: list[Message] = []
            opened = time.monotonic()
            budget = limits.batch_max_messages
            if self.max_messages is not None:
                budget = min(budget, self.max_messages - report.messages)
            while (
                len(batch) < budget
                and time.monotonic() - opened < limits.batch_max_seconds
                and at_eof != partitions
            ):
                for message in consumer.consume(min(budget - len(batch), 10_000), 0.1):
                    error = message.error()
                    if error is None:
                        batch.append(message)
                        at_eof.discard(message.partition())
                    elif error.code() == KafkaError._PARTITION_EOF:
                        at_eof.add(message.partition())
                    else:
                        raise LandingError(f"consuming {self.topic} failed: {error}")
            if batch:
                self._land_batch(con, consumer, dlq_producer, batch, report)
                if self.on_batch is not None:
                    self.on_batch(report)
            if at_eof == partitions:
                report.reached_eof = True
                return
            if self.max_messages is not None and report.messages >= self.max_messages:
                return
            if time.monotonic() - started > limits.drain_max_seconds:
                log.warning(
                    "landing %s stopped after %.0fs with data still arriving; the next run "
                    "continues from the stored offsets",
                    self.topic,
                    limits.drain_max_seconds,
                )
                return

    def _land_batch(self, con, consumer, dlq_producer, batch: list[Message], report) -> None:
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        row_partitions: list[int] = []
        row_offsets: list[int] = []
        dead: list[dict[str, Any]] = []
        first_offsets: dict[int, int] = {}
        last_offsets: dict[int, int] = {}
        for message in batch:
            p, offset = message.partition(), message.offset()
            first_offsets.setdefault(p, offset)
            last_offsets[p] = offset  # a partition's messages arrive in offset order
            raw = message.value()
            try:
                decoded = decode_message(self.topic, raw)
            except MessageError as exc:
                key = message.key()
                dead.append(
                    {
                        "kafka_topic": self.topic,
                        "kafka_partition": p,
                        "kafka_offset": offset,
                        "message_key": key.decode("utf-8", "replace") if key else None,
                        "raw_value": raw.decode("utf-8", "replace")[:RAW_VALUE_LIMIT]
                        if raw is not None
                        else None,
                        "reason": str(exc),
                        "landed_at": now,
                    }
                )
                continue
            rows.append(_row_of(self.topic, decoded))
            row_partitions.append(p)
            row_offsets.append(offset)
        for p, first in first_offsets.items():
            lo, hi = report.offset_ranges.get(p, (first, last_offsets[p]))
            report.offset_ranges[p] = (min(lo, first), max(hi, last_offsets[p]))
        next_offsets = {p: last + 1 for p, last in last_offsets.items()}

        batch_number = report.batches + 1
        con.begin()
        try:
            if rows:
                landed = pa.Table.from_pylist(rows)
                landed = (
                    landed.append_column("kafka_topic", pa.array([self.topic] * len(rows)))
                    .append_column("kafka_partition", pa.array(row_partitions, pa.int32()))
                    .append_column("kafka_offset", pa.array(row_offsets, pa.int64()))
                    .append_column(
                        "landed_at", pa.array([now] * len(rows), pa.timestamp("us", tz="UTC"))
                    )
                )
                columns = ", ".join(landed.column_names)
                con.execute(
                    f"INSERT INTO {self.table} ({columns}) SELECT {columns} FROM landed "
                    "ON CONFLICT DO NOTHING"
                )
            if dead:
                dead_rows = pa.Table.from_pylist(dead)  # noqa: F841 - read by DuckDB below
                columns = ", ".join(dead_rows.column_names)
                con.execute(
                    f"INSERT INTO dead_letters ({columns}) SELECT {columns} FROM dead_rows "
                    "ON CONFLICT DO NOTHING"
                )
            con.executemany(
                "INSERT INTO landing_offsets VALUES (?, ?, ?, ?) "
                "ON CONFLICT (topic, kafka_partition) DO UPDATE SET "
                "next_offset = excluded.next_offset, updated_at = excluded.updated_at",
                [[self.topic, p, o, now] for p, o in sorted(next_offsets.items())],
            )
            self._maybe_fault("in_transaction", batch_number)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self._maybe_fault("after_db_commit", batch_number)

        report.batches = batch_number
        report.rows_landed += len(rows)
        report.dead_lettered += len(dead)
        for row in dead:
            self._mirror_dead_letter(dlq_producer, row)
        try:
            consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, o in next_offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            # Offsets live in DuckDB; the group offset only feeds lag displays.
            report.kafka_commit_failures += 1
            log.warning(
                "committing %s offsets to Kafka failed (lag view only): %s", self.topic, exc
            )

    def _mirror_dead_letter(self, producer, row: dict[str, Any]) -> None:
        letter = DeadLetter(
            source_topic=row["kafka_topic"],
            source_partition=row["kafka_partition"],
            source_offset=row["kafka_offset"],
            reason=row["reason"],
            raw_value=row["raw_value"],
            dead_lettered_at=row["landed_at"],
        )
        key = f"{row['kafka_topic']}/{row['kafka_partition']}/{row['kafka_offset']}".encode()
        producer.produce(
            Topics.DEAD_LETTER, key=key, value=encode_message(Topics.DEAD_LETTER, letter)
        )
        producer.poll(0)

    def _maybe_fault(self, point: str, batch_number: int) -> None:
        if self._fault == (point, batch_number):
            log.warning("fault injection: SIGKILL at %s of batch %d", point, batch_number)
            os.kill(os.getpid(), signal.SIGKILL)


_READ_MODEL_QUERIES = {
    "landing_offsets": "SELECT * FROM landing_offsets ORDER BY topic, kafka_partition",
    "dead_letters": (
        "SELECT * FROM dead_letters ORDER BY kafka_topic, kafka_partition, kafka_offset"
    ),
}


def publish_landing_read_models(
    con: duckdb.DuckDBPyConnection, settings: Settings, topic: str
) -> dict[str, int]:
    """Publish the topic's landing table, the offsets and the DLQ as Parquet read models."""
    table = LANDING_TABLES[topic]
    queries = {table: f"SELECT * FROM {table} ORDER BY kafka_partition, kafka_offset"}
    queries.update(_READ_MODEL_QUERIES)
    return {
        name: publish_read_model(con, settings.read_models_dir, name, query)[1]
        for name, query in queries.items()
    }
