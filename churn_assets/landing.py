"""Kafka -> DuckDB landing with an exactly-once effect.

How a drain works (ARCHITECTURE.md §4):

1. Ask the broker which log the topic's offsets count in (its epoch: the cluster id, and the
   topic id where the broker has one), read each partition's next offset in that epoch from
   ``landing_offsets`` in the warehouse and assign the consumer there (offsets in Kafka are never
   the source of truth). A new epoch (a restarted embedded broker, a recreated topic) starts at
   the beginning of its log; the rows landed from earlier logs stay as they are.
2. Consume in batches bounded by count and time, until every partition reports EOF (or the drain's
   time budget runs out). A reader thread consumes the next batch and a decoder thread decodes it
   while the landing thread writes the current one: a batch is parsed at once and checked by
   column (:func:`churn_assets.batch_decode.decode_batch`); only messages the column checks do
   not take are decoded row by row, which names a bad message's reason. While draining, DuckDB
   checkpoints only at the end (see ``_drain_settings``).
3. For each batch, check that the broker still serves the same log (the query is sent once the
   batch is consumed and answered while it is decoded), then in ONE DuckDB transaction: insert
   valid rows keyed by (epoch, topic, partition, offset), unique by their message's own id
   (``BUSINESS_KEYS``): a plain insert first; when the unique indexes refuse it (a message that
   landed before, or twice in the batch), the transaction is rolled back and run again with the
   batch deduplicated by id (the lowest partition, then offset, wins) and inserted with
   ``ON CONFLICT (<id>) DO NOTHING``, the valid messages not inserted counted as replays in
   ``landing_replays``; insert invalid ones into ``dead_letters`` with the reason and
   ``published_at`` NULL; mark the dead letters whose delivery to the dead-letter topic was
   confirmed since the last batch as published; move the epoch's ``landing_offsets`` past the
   batch. Commit.
4. After the DuckDB commit: produce the batch's dead letters to the dead-letter topic (delivery
   reports collect the confirmed ones) and, at most once a second and after the run's last
   batch, commit the offsets to the Kafka consumer group, for lag views and the landing sensor
   only.
5. At the end, publish the read models: the landed table in parts (the rows landed since the last
   publish, see :func:`churn_assets.warehouse.publish_read_model_parts`), the offsets, dead
   letters and replay counts whole.

Before draining, a run republishes its topic's dead letters that were never confirmed (any epoch);
at the end it waits (bounded) for the outstanding deliveries, marks them and reports how many are
still pending. So the dead-letter topic holds every dead letter at least once (after a crash, some
twice, under the same key ``topic/partition/offset@epoch``).

A crash anywhere loses nothing and duplicates nothing in the warehouse: before the DuckDB commit
the batch is simply consumed again; after it, the stored offsets skip it. The same message in a new
log (a restarted broker) or produced twice is a replay: counted, never a second row.
"""

import contextlib
import functools
import gc
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from confluent_kafka import (
    OFFSET_BEGINNING,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from churn_assets.batch_decode import DecodedBatch, decode_batch
from churn_assets.config import Settings
from churn_assets.kafka import (
    TopicLog,
    client_config,
    make_consumer,
    make_producer,
    message_position,
    topic_log,
)
from churn_assets.schemas import (
    DATA_TOPICS,
    DeadLetter,
    MessageError,
    Topics,
    decode_message,
    encode_message,
)
from churn_assets.warehouse import (
    BUSINESS_KEYS,
    LANDING_TABLES,
    LEGACY_EPOCH,
    connect,
    ensure_schema,
    publish_read_model,
    publish_read_model_parts,
    remove_stale_temp_files,
)

__all__ = [
    "FAULT_ENV_VAR",
    "LandingError",
    "LandingReport",
    "Lander",
    "dead_letter_key",
    "latest_epoch",
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
# Each data topic's unique message id, which tells whether two logs hold the same message.
MESSAGE_ID_COLUMNS = {
    Topics.CUSTOMERS: "event_id",
    Topics.PREDICTIONS: "request_id",
    Topics.FEEDBACK: "event_id",
}
# Bound on reading the few messages that decide whether legacy offsets belong to the broker's log.
LEGACY_CHECK_TIMEOUT_S = 60.0
# Bound on waiting, at the end of a run, for the dead-letter topic to confirm outstanding
# deliveries; what is still unconfirmed then stays unpublished and the next run republishes it.
DLQ_FLUSH_TIMEOUT_S = 10.0
# Bound on waiting for room in the producer's local queue before leaving a dead letter unsent.
DLQ_QUEUE_TIMEOUT_S = 10.0
_LANDED_AT = pa.timestamp("us", tz="UTC")
# How often, at most, landing commits its offsets to the Kafka consumer group (and after the last
# batch of a run).
KAFKA_COMMIT_INTERVAL_S = 1.0
# The WAL a drain lets grow before DuckDB checkpoints (see ``_drain_settings``); a million
# customer events take about 210 MB.
DRAIN_CHECKPOINT_THRESHOLD = "1GB"
# The most messages one ``consume`` call returns (a batch takes one call or a few), and how long
# it waits for them: a call returns when it has them all or its wait is over, so the call that
# meets the partitions' ends (their EOF events follow the last messages at once) waits it out;
# a short one ends the drain soon after the last message. Batches stay bounded by
# ``landing.batch_max_seconds``.
CONSUME_MAX = 100_000
CONSUME_WAIT_S = 0.01


@dataclass
class _Batch:
    """A consumed batch, decoded, with the broker's answer to a log query sent after it was
    consumed (see ``Lander._check_same_log``)."""

    # The messages that are dead-lettered (by position): the others are dropped once decoded.
    refused: dict[int, Message]
    partitions: np.ndarray
    offsets: np.ndarray
    decoded: DecodedBatch
    # The valid rows with their Kafka coordinates (``landed_at`` is added when they land).
    landed: pa.Table | None
    # Each partition's first and last offset in the batch.
    extents: dict[int, tuple[int, int]]
    checked: Future[TopicLog]
    # The drain's last batch (its end, its message budget or its time budget reached).
    last: bool


@dataclass(frozen=True)
class _End:
    """The reader thread's last word: why the drain ended."""

    reached_eof: bool


class LandingError(RuntimeError):
    """Landing cannot proceed (bad topic, broker error); nothing was committed for the batch."""


@dataclass
class LandingReport:
    """What one drain did; also the Dagster materialisation metadata."""

    topic: str
    # The log the drain read (``TopicLog.epoch``); every row it landed carries it.
    kafka_epoch: str = ""
    rows_landed: int = 0
    dead_lettered: int = 0
    # Valid messages not inserted because their message id had landed already (from this or an
    # earlier log) or came earlier in the same batch.
    replayed: int = 0
    # ``replayed`` of every run and epoch of this topic, as stored in ``landing_replays``.
    replayed_total: int = 0
    # Dead letters of earlier runs whose delivery to the dead-letter topic was never confirmed,
    # produced again at the start of this run.
    dead_letters_republished: int = 0
    # Dead letters whose delivery this run confirmed and marked published.
    dead_letters_published: int = 0
    # This topic's dead letters still unconfirmed at the end of the run (the next run retries).
    dead_letters_pending: int = 0
    batches: int = 0
    offset_ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    reached_eof: bool = False
    kafka_commit_failures: int = 0
    duration_s: float = 0.0
    # Row counts of the read models published at the end of the drain (table name -> rows).
    published: dict[str, int] = field(default_factory=dict)
    # The landed table's read model (published in parts): rows written to new parts by this run
    # (its new rows, plus those of merged parts; all rows when it was published whole again),
    # and how many parts it has now.
    read_model_rows_written: int = 0
    read_model_parts: int = 0

    @property
    def messages(self) -> int:
        """Messages consumed: landed, dead-lettered or replayed."""
        return self.rows_landed + self.dead_lettered + self.replayed

    def describe_ranges(self) -> str:
        return (
            ", ".join(f"p{p}: {lo}..{hi}" for p, (lo, hi) in sorted(self.offset_ranges.items()))
            or "none"
        )


def stored_offsets(con: duckdb.DuckDBPyConnection, topic: str, epoch: str) -> dict[int, int]:
    """Each partition's next offset to land in ``epoch`` (empty for an epoch never seen)."""
    rows = con.execute(
        "SELECT kafka_partition, next_offset FROM landing_offsets "
        "WHERE kafka_epoch = ? AND topic = ?",
        [epoch, topic],
    ).fetchall()
    return {int(p): int(o) for p, o in rows}


def latest_epoch(con: duckdb.DuckDBPyConnection, topic: str) -> str | None:
    """The epoch whose offsets moved last for ``topic``: the log landing read most recently."""
    rows = con.execute(
        "SELECT arg_max(kafka_epoch, updated_at) FROM landing_offsets WHERE topic = ?", [topic]
    ).fetchall()
    return rows[0][0] if rows else None


def dead_letter_key(epoch: str, topic: str, partition: int, offset: int) -> str:
    """The dead-letter topic's message key: one per dead letter, repeated by a republish."""
    return f"{topic}/{partition}/{offset}@{epoch}"


# A dead letter's identity in the warehouse: (kafka_epoch, kafka_topic, kafka_partition,
# kafka_offset).
_Coordinates = tuple[str, str, int, int]


class _DeadLetterOutbox:
    """Dead letters on their way to the dead-letter topic: an outbox in the warehouse.

    The warehouse row is the record, written with ``published_at`` NULL in the batch's
    transaction. It is produced after the commit; its delivery report (served by ``poll``) adds
    its coordinates to ``delivered``, and ``mark_published`` records those in a later
    transaction. A failed or missing delivery report leaves the row unpublished, so a later run
    produces it again: at least once, never silently lost.
    """

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.delivered: list[_Coordinates] = []
        self.failures = 0
        self.last_error: str | None = None
        self.unsent = 0

    def _on_delivery(self, coordinates: _Coordinates, error: KafkaError | None, _message) -> None:
        if error is None:
            self.delivered.append(coordinates)
        else:
            self.failures += 1
            self.last_error = str(error)

    def send(self, row: dict[str, Any]) -> None:
        coordinates = (
            row["kafka_epoch"],
            row["kafka_topic"],
            row["kafka_partition"],
            row["kafka_offset"],
        )
        letter = DeadLetter(
            source_topic=row["kafka_topic"],
            source_partition=row["kafka_partition"],
            source_offset=row["kafka_offset"],
            reason=row["reason"],
            raw_value=row["raw_value"],
            dead_lettered_at=row["landed_at"],
        )
        value = encode_message(Topics.DEAD_LETTER, letter)
        deadline = time.monotonic() + DLQ_QUEUE_TIMEOUT_S
        while True:
            try:
                self.producer.produce(
                    Topics.DEAD_LETTER,
                    key=dead_letter_key(*coordinates).encode(),
                    value=value,
                    on_delivery=functools.partial(self._on_delivery, coordinates),
                )
                break
            except BufferError:
                if time.monotonic() > deadline:
                    self.unsent += 1  # stays unpublished; the next run sends it
                    return
                self.producer.poll(0.1)
        self.producer.poll(0)

    def mark_published(self, con: duckdb.DuckDBPyConnection, now: datetime) -> tuple[int, int]:
        """Inside the caller's transaction: set ``published_at`` of the confirmed dead letters.

        Returns (confirmations taken, rows marked); call ``forget(taken)`` after the commit.
        """
        self.producer.poll(0)
        taken = len(self.delivered)
        if not taken:
            return 0, 0
        epochs, topics, partitions, offsets = zip(*self.delivered[:taken], strict=True)
        delivered = pa.table(  # noqa: F841 - read by DuckDB below
            {
                "kafka_epoch": pa.array(epochs, pa.string()),
                "kafka_topic": pa.array(topics, pa.string()),
                "kafka_partition": pa.array(partitions, pa.int32()),
                "kafka_offset": pa.array(offsets, pa.int64()),
            }
        )
        marked = con.execute(
            "UPDATE dead_letters SET published_at = ? FROM delivered AS d "
            "WHERE dead_letters.kafka_epoch = d.kafka_epoch "
            "AND dead_letters.kafka_topic = d.kafka_topic "
            "AND dead_letters.kafka_partition = d.kafka_partition "
            "AND dead_letters.kafka_offset = d.kafka_offset "
            "AND dead_letters.published_at IS NULL",
            [now],
        ).fetchall()[0][0]
        return taken, int(marked)

    def forget(self, taken: int) -> None:
        del self.delivered[:taken]

    def drop_undelivered(self) -> None:
        """Purge what Kafka has not confirmed (it stays unpublished in the warehouse, and the
        next run sends it again) and serve the purge reports, so the producer holds no callback
        of this outbox and goes away with the run instead of delivering behind its back."""
        self.producer.purge()
        self.producer.flush(0)


@contextlib.contextmanager
def _drain_settings(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """DuckDB settings for a drain, restored after it (they are the database instance's).

    Checkpoints wait for the end of the drain (or ``DRAIN_CHECKPOINT_THRESHOLD`` of WAL). At the
    default 16 MiB one ran every two or three batches of 20,000 events, recompressing the newest
    row group and writing the indexes' changes each time: 1M events into the landed table took
    8.5 s of inserts and commits on a busy machine, against 2.9 s (and 0.7 s for the one
    checkpoint at the end) with them deferred. Every commit is still durable in the WAL. One
    DuckDB thread: a second one costs more CPU than it saves time while the reader and decoder
    threads want the other core.
    """
    saved = {
        name: con.execute("SELECT current_setting(?)", [name]).fetchall()[0][0]
        for name in ("checkpoint_threshold", "threads")
    }

    def restore() -> None:
        con.execute(f"SET checkpoint_threshold = '{saved['checkpoint_threshold']}'")
        con.execute(f"SET threads = {int(saved['threads'])}")

    con.execute(f"SET checkpoint_threshold = '{DRAIN_CHECKPOINT_THRESHOLD}'")
    con.execute("SET threads = 1")
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):  # the drain's own error is the one to report
            restore()
        raise
    restore()


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for a drain, then resumed as it was.

    A drain allocates a few objects per message (the consumer's messages, their values) that
    live for a batch, long enough to be promoted; the collector then walked the process's whole
    heap again and again. Reference counting still frees every one of them at once; cycles made
    meanwhile wait for the collector to resume at the drain's end.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_fault(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, batch = spec.partition(":")
    if point not in FAULT_POINTS or not batch.isdigit():
        raise LandingError(
            f"{FAULT_ENV_VAR}={spec!r} is not '<point>:<batch>' with point in {FAULT_POINTS}"
        )
    return point, int(batch)


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
        # Customer events (and the features predictions carry) are validated against the
        # configured feature contract; the landed table's feature columns follow it.
        self.contract = settings.contract
        self.on_batch = on_batch
        self.max_messages = max_messages
        self._fault = _parse_fault(os.environ.get(FAULT_ENV_VAR))

    def run(self) -> LandingReport:
        """Drain the topic to EOF (bounded by ``landing.drain_max_seconds``), then publish the
        read models on the same connection, so no other process ever needs the live file."""
        started = time.monotonic()
        # Temporary read-model files of killed publishers go first, whether or not this run
        # gets as far as publishing.
        remove_stale_temp_files(self.settings.read_models_dir)
        admin = AdminClient(client_config(self.settings))
        # The broker is asked which log it serves while the warehouse opens.
        asking = ThreadPoolExecutor(1, thread_name_prefix=f"landing-log-{self.topic}")
        asked = asking.submit(topic_log, self.settings, self.topic, admin=admin)
        asking.shutdown(wait=False)
        with connect(self.settings.warehouse_path) as con:
            ensure_schema(con, self.contract)
            log_now = asked.result()
            report = LandingReport(topic=self.topic, kafka_epoch=log_now.epoch)
            partitions = log_now.partitions
            positions = self._positions(con, log_now)
            # Each batch lands later than every row before it, even if the clock stepped back:
            # the read model publishes the rows landed after its last published ``landed_at``.
            newest = con.execute(f"SELECT max(landed_at) FROM {self.table}").fetchall()
            self._landed_floor: datetime | None = newest[0][0]
            fetch: dict[str, Any] = {"fetch.wait.max.ms": 100}
            consumer = make_consumer(self.settings, **fetch)
            outbox = _DeadLetterOutbox(make_producer(self.settings, **{"linger.ms": 5}))
            # Offsets landed but not committed to the consumer group yet, and when it last was.
            self._uncommitted: dict[int, int] = {}
            self._committed_at = time.monotonic()
            # Asks the broker for the topic's log while a batch is decoded.
            self._checker = ThreadPoolExecutor(1, thread_name_prefix=f"landing-log-{self.topic}")
            self._decoder = ThreadPoolExecutor(1, thread_name_prefix=f"landing-decode-{self.topic}")
            try:
                consumer.assign(
                    [
                        TopicPartition(self.topic, p, positions.get(p, OFFSET_BEGINNING))
                        for p in partitions
                    ]
                )
                self._log_now, self._admin = log_now, admin
                self._republish_dead_letters(con, outbox, report)
                with _drain_settings(con), _no_cyclic_gc():
                    self._drain(con, consumer, outbox, set(partitions), report, started)
            finally:
                self._decoder.shutdown(wait=True, cancel_futures=True)
                self._checker.shutdown(wait=True, cancel_futures=True)
                consumer.close()
                self._settle_dead_letters(con, outbox, report)
            report.replayed_total = int(
                con.execute(
                    "SELECT coalesce(sum(replayed), 0) FROM landing_replays WHERE topic = ?",
                    [self.topic],
                ).fetchall()[0][0]
            )
            report.published = publish_landing_read_models(con, self.settings, self.topic, report)
        report.duration_s = time.monotonic() - started
        return report

    def _republish_dead_letters(
        self, con: duckdb.DuckDBPyConnection, outbox: _DeadLetterOutbox, report: LandingReport
    ) -> None:
        """Produce this topic's dead letters (any epoch) whose delivery was never confirmed."""
        cursor = con.execute(
            "SELECT kafka_epoch, kafka_topic, kafka_partition, kafka_offset, reason, raw_value, "
            "landed_at FROM dead_letters WHERE kafka_topic = ? AND published_at IS NULL "
            "ORDER BY landed_at, kafka_epoch, kafka_partition, kafka_offset",
            [self.topic],
        )
        columns = [d[0] for d in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        if not rows:
            return
        log.warning(
            "%s: republishing %d dead letters whose delivery to %s was never confirmed (a crash "
            "or an unreachable topic in an earlier run); consumers dedupe by key",
            self.topic,
            len(rows),
            Topics.DEAD_LETTER,
        )
        for row in rows:
            outbox.send(row)
        report.dead_letters_republished = len(rows)

    def _mark_dead_letters_published(
        self, con: duckdb.DuckDBPyConnection, outbox: _DeadLetterOutbox, report: LandingReport
    ) -> None:
        """Record the confirmed deliveries in a transaction of their own."""
        con.begin()
        try:
            taken, marked = outbox.mark_published(con, datetime.now(UTC))
            con.commit()
        except BaseException:
            con.rollback()
            raise
        outbox.forget(taken)
        report.dead_letters_published += marked

    def _settle_dead_letters(
        self, con: duckdb.DuckDBPyConnection, outbox: _DeadLetterOutbox, report: LandingReport
    ) -> None:
        """Wait (bounded) for outstanding deliveries, record them, and count what is pending."""
        outstanding = outbox.producer.flush(DLQ_FLUSH_TIMEOUT_S)
        failures, last_error = outbox.failures, outbox.last_error
        if outstanding:
            outbox.drop_undelivered()
        self._mark_dead_letters_published(con, outbox, report)
        report.dead_letters_pending = int(
            con.execute(
                "SELECT count(*) FROM dead_letters WHERE kafka_topic = ? AND published_at IS NULL",
                [self.topic],
            ).fetchall()[0][0]
        )
        if report.dead_letters_pending:
            log.warning(
                "%s: %d dead letters are not confirmed on %s yet (%d deliveries failed, last "
                "error: %s; %d still in flight after %.0fs; %d not sent); they stay in the "
                "warehouse unpublished and the next landing run of %s republishes them",
                self.topic,
                report.dead_letters_pending,
                Topics.DEAD_LETTER,
                failures,
                last_error or "none",
                outstanding,
                DLQ_FLUSH_TIMEOUT_S,
                outbox.unsent,
                self.topic,
            )

    def _positions(self, con: duckdb.DuckDBPyConnection, log_now: TopicLog) -> dict[int, int]:
        """Where to read each partition of the broker's log; opens the epoch if it is new.

        A new epoch's offsets are stored at once (in one transaction), so the offsets read model
        shows the log landing reads now even before a message of it has landed.
        """
        positions = stored_offsets(con, self.topic, log_now.epoch)
        if positions:
            return positions
        previous = latest_epoch(con, self.topic)
        positions = {p: 0 for p in log_now.partitions}
        if previous == LEGACY_EPOCH:
            legacy = stored_offsets(con, self.topic, LEGACY_EPOCH)
            mismatch = self._legacy_mismatch(con, log_now, legacy)
            if mismatch is None:
                positions.update(legacy)
                log.warning(
                    "%s: the offsets landed before log epochs were recorded continue on this "
                    "broker's log (epoch %s); landing resumes at %s",
                    self.topic,
                    log_now.epoch,
                    positions,
                )
            else:
                log.warning(
                    "%s: the offsets landed before log epochs were recorded belong to an earlier "
                    "log (%s); landing this broker's log (epoch %s) from its beginning; the "
                    "rows landed before keep kafka_epoch %r",
                    self.topic,
                    mismatch,
                    log_now.epoch,
                    LEGACY_EPOCH,
                )
        elif previous is not None:
            log.warning(
                "%s: new log epoch %s (the broker was restarted or the topic recreated; landing "
                "read epoch %s before, whose rows stay); landing it from offset 0",
                self.topic,
                log_now.epoch,
                previous,
            )
        else:
            log.info("%s: first landing, log epoch %s", self.topic, log_now.epoch)
        now = datetime.now(UTC)
        con.begin()
        try:
            con.executemany(
                "INSERT INTO landing_offsets "
                "(kafka_epoch, topic, kafka_partition, next_offset, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [[log_now.epoch, self.topic, p, o, now] for p, o in sorted(positions.items())],
            )
            con.commit()
        except BaseException:
            con.rollback()
            raise
        return positions

    def _legacy_mismatch(
        self, con: duckdb.DuckDBPyConnection, log_now: TopicLog, legacy: dict[int, int]
    ) -> str | None:
        """Why the broker's log is not the one the legacy offsets were landed from, or None.

        The legacy log is this log when, in every partition, the message at the last landed
        offset is the one landed there (same message id, or the same raw value for a dead
        letter). Reading starts where the message surely is (the watermark, which the embedded
        broker may under-report, bounds it), so a shorter log ends in EOF and never stalls.
        """
        wanted = {p: n - 1 for p, n in legacy.items() if n > 0 and p in log_now.partitions}
        gone = sorted(set(legacy) - set(log_now.partitions))
        if gone:
            return f"partitions {gone} no longer exist"
        if not wanted:
            return None
        consumer = make_consumer(
            self.settings,
            group_id=f"churn-landing-epoch-check-{time.time_ns()}",
            **{"fetch.wait.max.ms": 100},
        )
        found: dict[int, Message | None] = {}
        try:
            assignment = []
            for p, offset in wanted.items():
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=10
                )
                start = offset if high > offset else max(low, high - 1, 0)
                assignment.append(TopicPartition(self.topic, p, start))
            consumer.assign(assignment)
            deadline = time.monotonic() + LEGACY_CHECK_TIMEOUT_S
            while len(found) < len(wanted):
                if time.monotonic() > deadline:
                    raise LandingError(
                        f"checking whether the legacy offsets of {self.topic} belong to the "
                        f"broker's log did not finish in {LEGACY_CHECK_TIMEOUT_S:.0f}s; "
                        "nothing was landed"
                    )
                for consumed in consumer.consume(1_000, 0.2):
                    partition = consumed.partition()
                    if partition is None or partition in found:
                        continue
                    error = consumed.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            found[partition] = None
                            continue
                        raise LandingError(f"reading {self.topic} p{partition} failed: {error}")
                    _, at = message_position(consumed)
                    if at >= wanted[partition]:
                        found[partition] = consumed if at == wanted[partition] else None
        finally:
            consumer.close()
        for p, offset in sorted(wanted.items()):
            message = found[p]
            if message is None:
                return f"p{p} has no message at offset {offset}"
            if self._landed_identity(con, p, offset) != self._identity(message):
                return f"p{p} holds a different message at offset {offset}"
        return None

    def _identity(self, message: Message) -> tuple[str, str | None]:
        raw = message.value()
        try:
            decoded = decode_message(self.topic, raw, self.contract)
        except MessageError:
            text = raw.decode("utf-8", "replace")[:RAW_VALUE_LIMIT] if raw is not None else None
            return ("dead letter", text)
        return ("row", getattr(decoded, MESSAGE_ID_COLUMNS[self.topic]))

    def _landed_identity(
        self, con: duckdb.DuckDBPyConnection, partition: int, offset: int
    ) -> tuple[str, str | None] | None:
        key = [LEGACY_EPOCH, self.topic, partition, offset]
        where = "kafka_epoch = ? AND kafka_topic = ? AND kafka_partition = ? AND kafka_offset = ?"
        rows = con.execute(
            f"SELECT {MESSAGE_ID_COLUMNS[self.topic]} FROM {self.table} WHERE {where}", key
        ).fetchall()
        if rows:
            return ("row", rows[0][0])
        rows = con.execute(f"SELECT raw_value FROM dead_letters WHERE {where}", key).fetchall()
        return ("dead letter", rows[0][0]) if rows else None

    def _check_same_log(self, checked: Future[TopicLog]) -> None:
        """Refuse a batch if the broker's log changed since the drain began.

        ``checked`` is the broker's answer to a log query sent after the batch was consumed (it
        runs while the batch is decoded): if the broker still reports the drain's epoch, every
        message consumed before the query came from that log (an epoch never returns).
        """
        now = checked.result()
        if now.epoch != self._log_now.epoch:
            raise LandingError(
                f"the broker's log of {self.topic} changed during the landing run (epoch "
                f"{self._log_now.epoch} -> {now.epoch}: restarted broker or recreated topic); "
                "the batch in hand was not committed; the next run lands the new log from its "
                "beginning"
            )

    def _drain(self, con, consumer, outbox, partitions: set[int], report, started) -> None:
        """Land batches as the reader thread hands them over: while one batch is written to
        DuckDB, the next one is consumed and decoded."""
        handover: queue.Queue[Future[_Batch] | _End | BaseException] = queue.Queue(maxsize=1)
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read,
            args=(consumer, partitions, handover, stop, started),
            name=f"landing-reader-{self.topic}",
            daemon=True,
        )
        reader.start()
        try:
            while True:
                item = handover.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _End):
                    report.reached_eof = item.reached_eof
                    return
                self._land_batch(con, consumer, outbox, item.result(), report)
                if self.on_batch is not None:
                    self.on_batch(report)
        finally:
            stop.set()
            while reader.is_alive():
                with contextlib.suppress(queue.Empty):  # unblock a reader waiting to hand over
                    handover.get(timeout=0.05)
            reader.join()

    def _read(self, consumer, partitions: set[int], handover, stop, started) -> None:
        """The reader thread: consume batches bounded by count and time, decode each, ask the
        broker for the topic's log once the batch is consumed, and hand it over (one at most
        waits). Ends with an :class:`_End` or the exception that stopped it."""
        limits = self.settings.landing
        at_eof: set[int] = set()
        consumed = 0

        def hand_over(item) -> bool:
            while not stop.is_set():
                try:
                    handover.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not stop.is_set():
                batch: list[Message] = []
                opened = time.monotonic()
                budget = limits.batch_max_messages
                if self.max_messages is not None:
                    budget = min(budget, self.max_messages - consumed)
                while (
                    len(batch) < budget
                    and time.monotonic() - opened < limits.batch_max_seconds
                    and at_eof != partitions
                    and not stop.is_set()
                ):
                    messages = consumer.consume(
                        min(budget - len(batch), CONSUME_MAX), CONSUME_WAIT_S
                    )
                    # Error events (partition EOF, mostly) come at the ends of partitions:
                    # only a call that returned one is looked at message by message.
                    if not any(map(Message.error, messages)):
                        batch.extend(messages)
                        if at_eof:
                            at_eof.difference_update(map(Message.partition, messages))
                        continue
                    for message in messages:
                        error = message.error()
                        if error is None:
                            batch.append(message)
                            at_eof.discard(message.partition())
                        elif error.code() == KafkaError._PARTITION_EOF:
                            at_eof.add(message.partition())
                        else:
                            raise LandingError(f"consuming {self.topic} failed: {error}")
                if batch:
                    consumed += len(batch)
                    last = (
                        at_eof == partitions
                        or (self.max_messages is not None and consumed >= self.max_messages)
                        or time.monotonic() - started > limits.drain_max_seconds
                    )
                    # Asked now that the batch is consumed; answered while it is decoded.
                    checked = self._checker.submit(
                        topic_log, self.settings, self.topic, admin=self._admin
                    )
                    # Decoded on a thread of its own while the next batch is consumed.
                    decoding = self._decoder.submit(self._decode, batch, checked, last)
                    if not hand_over(decoding):
                        return
                if at_eof == partitions:
                    hand_over(_End(reached_eof=True))
                    return
                if self.max_messages is not None and consumed >= self.max_messages:
                    hand_over(_End(reached_eof=False))
                    return
                if time.monotonic() - started > limits.drain_max_seconds:
                    log.warning(
                        "landing %s stopped after %.0fs with data still arriving; the next run "
                        "continues from the stored offsets",
                        self.topic,
                        limits.drain_max_seconds,
                    )
                    hand_over(_End(reached_eof=False))
                    return
        except BaseException as exc:  # handed to the landing thread, which raises it
            hand_over(exc)

    def _decode(self, batch: list[Message], checked: Future[TopicLog], last: bool) -> "_Batch":
        count = len(batch)
        partitions = np.fromiter(map(Message.partition, batch), np.int32, count)
        offsets = np.fromiter(map(Message.offset, batch), np.int64, count)
        extents: dict[int, tuple[int, int]] = {}
        for p in np.unique(partitions).tolist():
            # A partition's messages arrive in offset order.
            in_partition = offsets[partitions == p]
            extents[p] = (int(in_partition[0]), int(in_partition[-1]))
        # Valid messages as one Arrow table (parsed and checked by column), invalid ones with
        # the row decoder's reason (:mod:`churn_assets.batch_decode`).
        decoded = decode_batch(self.topic, list(map(Message.value, batch)), self.contract)
        valid = len(decoded.rows)
        landed = None
        if valid:
            positions = pa.array(decoded.positions)
            landed = (
                decoded.rows.append_column(
                    "kafka_epoch", pa.repeat(pa.scalar(self._log_now.epoch, pa.string()), valid)
                )
                .append_column("kafka_topic", pa.repeat(pa.scalar(self.topic), valid))
                .append_column("kafka_partition", pa.array(partitions).take(positions))
                .append_column("kafka_offset", pa.array(offsets).take(positions))
            )
        refused = {position: batch[position] for position in decoded.errors}
        return _Batch(refused, partitions, offsets, decoded, landed, extents, checked, last)

    def _land_batch(self, con, consumer, outbox, batch: "_Batch", report) -> None:
        now = datetime.now(UTC)
        if self._landed_floor is not None and now <= self._landed_floor:
            now = self._landed_floor + timedelta(microseconds=1)
        self._landed_floor = now
        partitions, offsets, decoded = batch.partitions, batch.offsets, batch.decoded
        next_offsets: dict[int, int] = {}
        for p, (first, last) in batch.extents.items():
            lo, hi = report.offset_ranges.get(p, (first, last))
            report.offset_ranges[p] = (min(lo, first), max(hi, last))
            next_offsets[p] = last + 1
        epoch = self._log_now.epoch
        dead: list[dict[str, Any]] = []
        for position, error in sorted(decoded.errors.items()):
            message = batch.refused[position]
            key, raw = message.key(), message.value()
            dead.append(
                {
                    "kafka_epoch": epoch,
                    "kafka_topic": self.topic,
                    "kafka_partition": int(partitions[position]),
                    "kafka_offset": int(offsets[position]),
                    "message_key": key.decode("utf-8", "replace") if key else None,
                    "raw_value": raw.decode("utf-8", "replace")[:RAW_VALUE_LIMIT]
                    if raw is not None
                    else None,
                    "reason": str(error),
                    "landed_at": now,
                }
            )
        valid = len(decoded.rows)
        landed = batch.landed
        if landed is not None:
            landed = landed.append_column("landed_at", pa.repeat(pa.scalar(now, _LANDED_AT), valid))

        self._check_same_log(batch.checked)
        batch_number = report.batches + 1
        try:
            # Most batches hold no message landed before: a plain insert, which the unique
            # indexes refuse when one did; then the batch goes again with the replay rules.
            taken, marked, inserted = self._commit_batch(
                con, outbox, landed, dead, next_offsets, now, batch_number, replays=False
            )
        except duckdb.ConstraintException:
            try:
                taken, marked, inserted = self._commit_batch(
                    con, outbox, landed, dead, next_offsets, now, batch_number, replays=True
                )
            except duckdb.ConstraintException as exc:
                raise LandingError(
                    f"landing a batch of {self.topic} into {self.table} broke a constraint "
                    f"({exc}); a primary-key conflict means the warehouse holds other rows at "
                    "Kafka coordinates past its stored offsets; the batch was not committed"
                ) from exc
        self._maybe_fault("after_db_commit", batch_number)

        outbox.forget(taken)
        report.dead_letters_published += marked
        report.batches = batch_number
        report.rows_landed += inserted
        report.replayed += valid - inserted
        report.dead_lettered += len(dead)
        for row in dead:
            outbox.send(row)
        # The group offsets only feed lag displays and the landing sensor (the warehouse's are
        # the truth): committed at most every KAFKA_COMMIT_INTERVAL_S and after the drain's last
        # batch, each time synchronously, so no commit is in flight when the run ends (closing a
        # consumer waits for one, without end, if the broker stopped answering).
        self._uncommitted.update(next_offsets)
        if batch.last or time.monotonic() - self._committed_at >= KAFKA_COMMIT_INTERVAL_S:
            self._commit_kafka(consumer, self._uncommitted, report)
            self._uncommitted = {}
            self._committed_at = time.monotonic()

    def _commit_batch(
        self,
        con: duckdb.DuckDBPyConnection,
        outbox: _DeadLetterOutbox,
        landed: pa.Table | None,
        dead: list[dict[str, Any]],
        next_offsets: dict[int, int],
        now: datetime,
        batch_number: int,
        *,
        replays: bool,
    ) -> tuple[int, int, int]:
        """One DuckDB transaction: the batch's rows, its dead letters, the confirmed dead
        letters' marks and the offsets past the batch. Returns (confirmations taken, dead
        letters marked, rows inserted); rolled back on any error."""
        epoch = self._log_now.epoch
        inserted = 0
        con.begin()
        try:
            taken, marked = outbox.mark_published(con, now)
            if landed is not None:
                columns = ", ".join(landed.column_names)
                if replays:
                    # Within the batch the lowest (partition, offset) of an id wins; against the
                    # table the row landed first wins. The conflict target is the business key:
                    # DuckDB 2.0 makes a target-less ON CONFLICT over two unique indexes
                    # quadratic, and a primary-key conflict (rows past the stored offsets) must
                    # not pass quietly.
                    key = ", ".join(BUSINESS_KEYS[self.table])
                    statement = (
                        f"INSERT INTO {self.table} ({columns}) SELECT {columns} FROM landed "
                        f"QUALIFY row_number() OVER (PARTITION BY {key} "
                        "ORDER BY kafka_partition, kafka_offset) = 1 "
                        f"ON CONFLICT ({key}) DO NOTHING"
                    )
                else:
                    statement = f"INSERT INTO {self.table} ({columns}) SELECT {columns} FROM landed"
                inserted = con.execute(statement).fetchall()[0][0]
                if inserted < len(landed):
                    con.execute(
                        "INSERT INTO landing_replays (kafka_epoch, topic, replayed, updated_at) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (kafka_epoch, topic) DO UPDATE SET "
                        "replayed = landing_replays.replayed + excluded.replayed, "
                        "updated_at = excluded.updated_at",
                        [epoch, self.topic, len(landed) - inserted, now],
                    )
            if dead:
                dead_rows = pa.Table.from_pylist(dead)  # noqa: F841 - read by DuckDB below
                columns = ", ".join(dead_rows.column_names)
                con.execute(
                    f"INSERT INTO dead_letters ({columns}) SELECT {columns} FROM dead_rows "
                    "ON CONFLICT DO NOTHING"
                )
            # One statement for every partition (``executemany`` runs one per row).
            moved = sorted(next_offsets.items())
            con.execute(
                "INSERT INTO landing_offsets "
                "(kafka_epoch, topic, kafka_partition, next_offset, updated_at) "
                f"VALUES {', '.join(['(?, ?, ?, ?, ?)'] * len(moved))} "
                "ON CONFLICT (kafka_epoch, topic, kafka_partition) DO UPDATE SET "
                "next_offset = excluded.next_offset, updated_at = excluded.updated_at",
                [value for p, o in moved for value in (epoch, self.topic, p, o, now)],
            )
            self._maybe_fault("in_transaction", batch_number)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        return taken, marked, inserted

    def _commit_kafka(self, consumer, offsets: dict[int, int], report: LandingReport) -> None:
        epoch = self._log_now.epoch
        try:
            # The epoch as commit metadata lets lag readers ignore another log's offsets.
            consumer.commit(
                offsets=[
                    TopicPartition(self.topic, p, o, metadata=epoch)
                    for p, o in sorted(offsets.items())
                ],
                asynchronous=False,
            )
        except KafkaException as exc:
            # Offsets live in DuckDB; the group offset only feeds lag displays.
            report.kafka_commit_failures += 1
            log.warning(
                "committing %s offsets to Kafka failed (lag view only): %s", self.topic, exc
            )

    def _maybe_fault(self, point: str, batch_number: int) -> None:
        if self._fault == (point, batch_number):
            log.warning("fault injection: SIGKILL at %s of batch %d", point, batch_number)
            os.kill(os.getpid(), signal.SIGKILL)


# A landed table's read model is in the order rows landed.
LANDED_ORDER = "landed_at, kafka_epoch, kafka_partition, kafka_offset"
# ``landing_offsets`` shows where landing stands: each topic's latest epoch only, one row per
# partition (earlier epochs' logs are gone; their offsets stay in the warehouse table).
_READ_MODEL_QUERIES = {
    "landing_offsets": """
SELECT o.topic, o.kafka_partition, o.next_offset, o.updated_at, o.kafka_epoch
FROM landing_offsets AS o
JOIN (
    SELECT topic, arg_max(kafka_epoch, updated_at) AS kafka_epoch
    FROM landing_offsets GROUP BY topic
) AS latest ON o.topic = latest.topic AND o.kafka_epoch = latest.kafka_epoch
ORDER BY o.topic, o.kafka_partition
""",
    "dead_letters": (
        "SELECT * FROM dead_letters "
        "ORDER BY landed_at, kafka_epoch, kafka_topic, kafka_partition, kafka_offset"
    ),
    # Replays per topic and epoch: valid messages whose id had landed already.
    "landing_replays": (
        "SELECT topic, kafka_epoch, replayed, updated_at FROM landing_replays "
        "ORDER BY topic, updated_at, kafka_epoch"
    ),
}


def publish_landing_read_models(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    topic: str,
    report: LandingReport | None = None,
) -> dict[str, int]:
    """Publish the topic's landing table (in parts: only the rows landed since the last publish
    are written, see :func:`churn_assets.warehouse.publish_read_model_parts`), then the offsets,
    the DLQ and the replay counts as whole Parquet read models. Returns each one's rows; what the
    parts publish wrote goes to ``report`` when given."""
    table = LANDING_TABLES[topic]
    landed = publish_read_model_parts(con, settings.read_models_dir, table, LANDED_ORDER)
    if report is not None:
        report.read_model_rows_written, report.read_model_parts = landed.written, landed.parts
    published = {table: landed.rows}
    published.update(
        {
            name: publish_read_model(con, settings.read_models_dir, name, query)[1]
            for name, query in _READ_MODEL_QUERIES.items()
        }
    )
    return published
