"""The broker: messages past the landed offsets (Kafka lag), per data topic and partition."""

import os
import time
from collections.abc import Mapping

import pandas as pd

from churn_assets.config import Settings
from churn_assets.warehouse import LEGACY_EPOCH
from dashboards.sources import Unavailable, first_line

__all__ = ["kafka_lag"]


def kafka_lag(
    settings: Settings, offsets: pd.DataFrame | Unavailable, budget_s: float = 2.0
) -> pd.DataFrame | Unavailable:
    """Messages on the broker past the landed offsets, per data topic and partition.

    The embedded broker's watermark answer is not a reliable end offset (ARCHITECTURE.md), so the
    lag is counted by reading from each partition's landed offset to partition EOF, within
    ``budget_s``; a partition that does not reach EOF in time reports a lower bound
    (``exact`` false). Reading past the landed offsets only touches the unlanded messages.

    Offsets count within one log (``kafka_epoch``: cluster id + topic id); offsets landed from
    another epoch (a restarted embedded broker, a recreated topic) count as nothing for the
    broker's current log. Offsets from before epochs were recorded (``legacy``) are taken to
    belong to the current log, as landing does once it has checked them.
    """
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    from churn_assets.kafka import make_consumer, topic_log
    from churn_assets.schemas import DATA_TOPICS

    source = "Kafka lag"
    try:
        logs = {t: topic_log(settings, t, timeout_s=budget_s) for t in DATA_TOPICS}
        partitions = {t: list(log_.partitions) for t, log_ in logs.items()}
        landed = _landed_offsets(offsets, {t: log_.epoch for t, log_ in logs.items()})
        consumer = make_consumer(
            settings, group_id=f"churn-dashboard-lag-{os.getpid()}", **{"log_level": 2}
        )
    except Exception as exc:  # broker down, not started, or misconfigured: explain it
        return Unavailable(
            source,
            f"the broker cannot be reached ({first_line(exc)})",
            "Start it with `churn broker start` or `churn up`.",
        )
    counts: dict[tuple[str, int], int] = {}
    try:
        assignment = [
            TopicPartition(topic, p, landed.get((topic, p), 0))
            for topic, ps in partitions.items()
            for p in ps
        ]
        counts = {(tp.topic, tp.partition): 0 for tp in assignment}
        pending = set(counts)
        consumer.assign(assignment)
        deadline = time.monotonic() + budget_s
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(10_000, 0.2):
                key = (message.topic(), message.partition())
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(key)
                        continue
                    raise KafkaException(error)
                counts[key] += 1
    except KafkaException as exc:
        return Unavailable(source, f"reading the topics failed ({first_line(exc)})")
    finally:
        consumer.close()
    rows = [
        {
            "topic": topic,
            "partition": partition,
            "landed_next_offset": landed.get((topic, partition), 0),
            "lag": lag,
            "exact": (topic, partition) not in pending,
        }
        for (topic, partition), lag in sorted(counts.items())
    ]
    return pd.DataFrame(rows)


def _landed_offsets(
    offsets: pd.DataFrame | Unavailable, epochs: Mapping[str, str]
) -> dict[tuple[str, int], int]:
    """(topic, partition) -> next offset to land, in each topic's current epoch."""
    if isinstance(offsets, Unavailable):
        return {}
    landed: dict[tuple[str, int], int] = {}
    for row in offsets.to_dict("records"):
        epoch = row.get("kafka_epoch")
        if epoch is not None and epoch not in (epochs.get(row["topic"]), LEGACY_EPOCH):
            continue
        key = (row["topic"], int(row["kafka_partition"]))
        if epoch == LEGACY_EPOCH and key in landed:
            continue  # the current epoch's offset wins over a legacy one
        landed[key] = int(row["next_offset"])
    return landed
