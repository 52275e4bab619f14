"""Produce known messages, read back what landed, and check exactly-once delivery."""

import collections
from dataclasses import dataclass

from churn_assets.config import Settings
from churn_assets.kafka import make_producer
from churn_assets.schemas import Topics, encode_message
from churn_assets.simulator import SimulationConfig, Simulator
from churn_assets.warehouse import connect


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
