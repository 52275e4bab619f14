"""Kafka client configuration, topic administration and topic inspection.

Everything that talks to Kafka builds its client config here, so the embedded broker and a real
SASL/TLS cluster are one setting apart (``kafka.bootstrap_servers``).
"""

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from churn_assets.broker import resolve_bootstrap
from churn_assets.config import Settings
from churn_assets.schemas import ALL_TOPICS

__all__ = [
    "KafkaConfigError",
    "client_config",
    "make_producer",
    "make_consumer",
    "ensure_topics",
    "topic_partitions",
    "TopicLog",
    "topic_log",
    "PartitionExtent",
    "scan_topic",
    "committed_offsets",
    "has_new_data",
]

log = logging.getLogger(__name__)


class KafkaConfigError(RuntimeError):
    """Kafka cannot be reached or is configured inconsistently."""


def client_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings shared by producers, consumers and admin clients."""
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers or resolve_bootstrap(settings.run_dir)
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "security.protocol": kafka.security_protocol,
    }
    if kafka.security_protocol.startswith("SASL"):
        if not (kafka.sasl_mechanism and kafka.sasl_username and kafka.sasl_password):
            raise KafkaConfigError(
                f"kafka.security_protocol={kafka.security_protocol} needs kafka.sasl_mechanism, "
                "kafka.sasl_username and the password in CHURN_KAFKA__SASL_PASSWORD"
            )
        config["sasl.mechanism"] = kafka.sasl_mechanism
        config["sasl.username"] = kafka.sasl_username
        config["sasl.password"] = kafka.sasl_password.get_secret_value()
    if kafka.ssl_ca_location:
        config["ssl.ca.location"] = kafka.ssl_ca_location
    return config


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer (no duplicates from retries), batched for throughput."""
    config = {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "compression.type": "none",
        **overrides,
    }
    return Producer(config)


def message_position(message: Message) -> tuple[int, int]:
    """A consumed message's (partition, offset); only error events lack them."""
    partition, offset = message.partition(), message.offset()
    if partition is None or offset is None:
        raise KafkaException(f"a message without partition or offset: {message.error()}")
    return partition, offset


# How long a consumer waits before fetching a partition again once its prefetch queue went over
# its threshold (``queued.min.messages``). librdkafka's default is 1 s: a consumer whose caller
# pauses (landing's reader waits while the landing thread is a batch behind), or that the broker
# outruns, sat idle for it; a 1M-message landing run spent 4.6 s in ``consume`` against 0.9 s
# with 10 ms.
FETCH_QUEUE_BACKOFF_MS = 10


def make_consumer(settings: Settings, group_id: str | None = None, **overrides: Any) -> Consumer:
    """A consumer with auto-commit and auto offset store off; positions are the caller's job."""
    config = {
        **client_config(settings),
        "group.id": group_id or settings.kafka.consumer_group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        **overrides,
    }
    return Consumer(config)


def ensure_topics(
    settings: Settings, topics: Iterable[str] = ALL_TOPICS, timeout_s: float = 15.0
) -> dict[str, str]:
    """Create missing topics with the configured partitions; returns topic -> created|exists."""
    admin = AdminClient(client_config(settings))
    wanted = list(topics)
    existing = admin.list_topics(timeout=timeout_s).topics
    result: dict[str, str] = {}
    to_create = []
    for topic in wanted:
        if topic in existing:
            have = len(existing[topic].partitions)
            if have != settings.kafka.partitions:
                log.warning(
                    "topic %s has %d partitions, config asks for %d; leaving it as it is",
                    topic,
                    have,
                    settings.kafka.partitions,
                )
            result[topic] = "exists"
        else:
            to_create.append(
                NewTopic(topic, settings.kafka.partitions, settings.kafka.replication_factor)
            )
    if to_create:
        futures = admin.create_topics(to_create, operation_timeout=timeout_s)
        for topic, future in futures.items():
            try:
                future.result(timeout=timeout_s)
                result[topic] = "created"
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    result[topic] = "exists"
                else:
                    raise KafkaConfigError(f"could not create topic {topic}: {exc}") from exc
    return result


def topic_partitions(settings: Settings, topic: str, timeout_s: float = 10.0) -> list[int]:
    """Partition ids of ``topic``; raises if the topic does not exist."""
    admin = AdminClient(client_config(settings))
    metadata = admin.list_topics(topic=topic, timeout=timeout_s)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        detail = info.error if info is not None else "not found"
        raise KafkaConfigError(
            f"topic {topic} is not available ({detail}); create it with `churn topics create`"
        )
    return sorted(info.partitions)


# The all-zero Kafka Uuid: what a broker without topic ids answers.
_NULL_TOPIC_ID = "AAAAAAAAAAAAAAAAAAAAAA"


@dataclass(frozen=True)
class TopicLog:
    """Which log a topic's offsets count in: the cluster, the topic's incarnation, its partitions.

    Offsets only mean something within one log. The embedded broker gets a fresh cluster id at
    every start (its in-memory log starts empty), and a deleted and recreated topic gets a fresh
    topic id, so ``epoch`` changes exactly when offsets start again from the beginning.
    """

    topic: str
    cluster_id: str
    topic_id: str | None
    partitions: tuple[int, ...]

    @property
    def epoch(self) -> str:
        return f"{self.cluster_id}/{self.topic_id}" if self.topic_id else self.cluster_id


def topic_log(
    settings: Settings,
    topic: str,
    timeout_s: float = 10.0,
    *,
    admin: AdminClient | None = None,
) -> TopicLog:
    """The topic's log identity and partitions, from the broker's metadata.

    The topic id comes from the admin API's topic description (Kafka 2.8+ and Tansu have one);
    a broker that answers the all-zero id has none, and the cluster id alone is the epoch.
    """
    if admin is None:  # not `admin or ...`: a client with nothing queued has len() 0
        admin = AdminClient(client_config(settings))
    metadata = admin.list_topics(topic=topic, timeout=timeout_s)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        detail = info.error if info is not None else "not found"
        raise KafkaConfigError(
            f"topic {topic} is not available ({detail}); create it with `churn topics create`"
        )
    if not metadata.cluster_id:
        raise KafkaConfigError(
            f"the broker at {client_config(settings)['bootstrap.servers']} reports no cluster id, "
            "so landing cannot tell one log of offsets from another; use a broker that does "
            "(Kafka 0.10.1+)"
        )
    try:
        description = admin.describe_topics(TopicCollection([topic]))[topic].result(
            timeout=timeout_s
        )
    except KafkaException as exc:
        raise KafkaConfigError(
            f"describing topic {topic} (for its topic id) failed: {exc}"
        ) from exc
    topic_id = str(description.topic_id) if description.topic_id is not None else None
    return TopicLog(
        topic=topic,
        cluster_id=metadata.cluster_id,
        topic_id=None if topic_id in (None, "", _NULL_TOPIC_ID) else topic_id,
        partitions=tuple(sorted(info.partitions)),
    )


@dataclass(frozen=True)
class PartitionExtent:
    partition: int
    messages: int
    first_offset: int | None
    last_offset: int | None


def scan_topic(settings: Settings, topic: str, timeout_s: float = 60.0) -> list[PartitionExtent]:
    """Count messages per partition by reading to partition EOF.

    The embedded broker's ListOffsets answer is not a reliable end offset (see ARCHITECTURE.md),
    so counts come from reading, which runs at about a million messages a second.
    """
    partitions = topic_partitions(settings, topic)
    consumer = make_consumer(settings, group_id=f"churn-status-{time.time_ns()}")
    counts = {p: 0 for p in partitions}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        pending = set(partitions)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise KafkaConfigError(f"scanning {topic} did not reach the end in {timeout_s}s")
            for message in consumer.consume(50_000, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(message.partition())
                        continue
                    raise KafkaException(error)
                p, offset = message_position(message)
                counts[p] += 1
                first.setdefault(p, offset)
                last[p] = offset
    finally:
        consumer.close()
    return [PartitionExtent(p, counts[p], first.get(p), last.get(p)) for p in partitions]


def committed_offsets(
    settings: Settings, topic: str, group_id: str | None = None
) -> dict[int, int]:
    """The consumer group's committed next-offset per partition (-1 where none)."""
    partitions = topic_partitions(settings, topic)
    consumer = make_consumer(settings, group_id=group_id)
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in committed}


def has_new_data(settings: Settings, topic: str, group_id: str | None = None) -> dict[int, int]:
    """Partitions with messages past the group's committed offset, as partition -> watermark.

    Uses the watermark only as an 'is there anything new' signal: a partition has news when its
    reported high watermark exceeds the committed offset (or when nothing is committed and it
    holds data). The values make deterministic sensor run keys.

    Landing commits each offset with its log epoch as the commit metadata; an offset committed
    in another epoch (a recreated topic whose group offsets survived) counts as nothing
    committed, so any message of the new log is news. Brokers that drop commit metadata (Tansu)
    lose a restarted log's group offsets anyway.
    """
    log_now = topic_log(settings, topic)
    partitions = log_now.partitions
    consumer = make_consumer(settings, group_id=group_id)
    news: dict[int, int] = {}
    try:
        committed = {
            tp.partition: tp.offset
            for tp in consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
            if not tp.metadata or tp.metadata == log_now.epoch
        }
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            done = committed.get(p, -1)
            if high > max(done, low, 0):
                news[p] = high
    finally:
        consumer.close()
    return news
