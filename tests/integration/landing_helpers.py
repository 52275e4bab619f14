"""Produce known messages, read back what landed, and check exactly-once delivery."""

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
from confluent_kafka import KafkaError, TopicPartition

from churn_assets.broker import EmbeddedBroker
from churn_assets.config import Settings
from churn_assets.kafka import ensure_topics, make_consumer, make_producer, topic_partitions
from churn_assets.schemas import Topics, encode_message
from churn_assets.simulator import SimulationConfig, Simulator
from churn_assets.warehouse import connect


def restart_broker(settings: Settings, port: int = 0) -> None:
    """Stop the embedded broker and start a new one: a new, empty log (memory storage)."""
    broker = EmbeddedBroker(settings.run_dir, port=port)
    broker.stop()
    broker.start()
    ensure_topics(settings)


def simulated_customer_events(count: int, seed: int = 1) -> list[dict]:
    """The first ``count`` customer events of a seeded simulation."""
    simulator = Simulator(SimulationConfig(seed=seed, customers=max(count, 10), days=400))
    payloads: list[dict] = []
    for _, events in simulator.events():
        payloads += [p for topic, _, p in events if topic == Topics.CUSTOMERS]
        if len(payloads) >= count:
            return payloads[:count]
    raise AssertionError("simulator produced fewer events than asked for")


def produce_payloads(settings: Settings, payloads: list[dict]) -> list[str]:
    """Validate and produce customer events; returns their event ids in produce order."""
    producer = make_producer(settings)
    for payload in payloads:
        producer.produce(
            Topics.CUSTOMERS,
            key=payload["customer_id"].encode(),
            value=encode_message(Topics.CUSTOMERS, payload),
        )
    assert producer.flush(30) == 0
    return [p["event_id"] for p in payloads]


def produce_customer_events(settings: Settings, count: int, seed: int = 1) -> list[str]:
    return produce_payloads(settings, simulated_customer_events(count, seed))


def landed_event_ids(settings: Settings, table: str = "landed_customer_events") -> list[str]:
    with connect(settings.warehouse_path, read_only=True) as con:
        return [row[0] for row in con.execute(f"SELECT event_id FROM {table}").fetchall()]


@dataclass(frozen=True)
class DeliveryCheck:
    missing: set[str]
    duplicates: dict[str, int]
    unexpected: set[str]

    @property
    def exactly_once(self) -> bool:
        return not (self.missing or self.duplicates or self.unexpected)


def check_exactly_once(produced: list[str], landed: list[str]) -> DeliveryCheck:
    """Compare landed ids with produced ids: every produced id once, nothing else."""
    counts = collections.Counter(landed)
    expected = collections.Counter(produced)
    duplicates = {i: n for i, n in counts.items() if n > expected.get(i, 0) and i in expected}
    return DeliveryCheck(
        missing=set(expected) - set(counts),
        duplicates=duplicates,
        unexpected=set(counts) - set(expected),
    )


def corruptions(payload: dict) -> list[tuple[bytes | None, str]]:
    """(raw value, expected reason fragment) for each kind of bad message."""

    def changed(**changes):
        return orjson.dumps({**payload, **changes})

    missing = {k: v for k, v in payload.items() if k != "support_tickets"}
    return [
        (b"\x00\xffnot json at all", "not valid JSON"),
        (b'{"truncated": ', "not valid JSON"),
        (b"[1, 2, 3]", "expected a JSON object"),
        (None, "empty message"),
        (changed(monthly_charges="a lot"), "monthly_charges"),
        (changed(schema_version=9), "unsupported schema_version 9"),
        (changed(favourite_colour="teal"), "favourite_colour: Extra inputs are not permitted"),
        (orjson.dumps(missing), "support_tickets: Field required"),
        (changed(customer_tenure=-4), "customer_tenure"),
        (changed(contract_type="lifetime"), "contract_type"),
        (changed(event_time="2026-01-01 10:00"), "timezone"),
        (
            encode_message(Topics.CUSTOMERS, payload).replace(
                b'"login_frequency":', b'"login_frequency":NaN,"x":'
            ),
            "not valid JSON",
        ),
    ]


def read_topic_keys(settings: Settings, topic: str, timeout_s: float = 60.0) -> list[str]:
    """Every message key of ``topic``, read from offset 0 to EOF on every partition."""
    partitions = topic_partitions(settings, topic)
    consumer = make_consumer(settings, group_id=f"test-reader-{time.time_ns()}")
    keys: list[str] = []
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        at_eof: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(at_eof) < len(partitions) and time.monotonic() < deadline:
            for message in consumer.consume(1_000, 0.2):
                error = message.error()
                if error is None:
                    keys.append(message.key().decode())
                    at_eof.discard(message.partition())
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_eof.add(message.partition())
                else:
                    raise AssertionError(error)
    finally:
        consumer.close()
    assert len(at_eof) == len(partitions), f"{topic} was not read to its end"
    return keys


@dataclass(frozen=True)
class AtLeastOnceCheck:
    missing: set[str]
    unexpected: set[str]
    # Keys seen more than once (allowed: a consumer dedupes by key).
    repeated: dict[str, int]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected)


def check_at_least_once(expected: Iterable[str], consumed: Iterable[str]) -> AtLeastOnceCheck:
    """Compare consumed keys with expected ones: every expected key at least once, nothing else."""
    counts = collections.Counter(consumed)
    wanted = set(expected)
    return AtLeastOnceCheck(
        missing=wanted - set(counts),
        unexpected=set(counts) - wanted,
        repeated={k: n for k, n in counts.items() if n > 1},
    )
