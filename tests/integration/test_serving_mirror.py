"""The prediction mirror against a real embedded broker: delivery, a lost broker, no broker."""

import logging
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, TopicPartition

from churn_assets.broker import EmbeddedBroker
from churn_assets.config import Settings, load_settings
from churn_assets.kafka import ensure_topics, make_consumer, scan_topic, topic_partitions
from churn_assets.schemas import PredictionEvent, Topics, decode_message
from serving.metrics import ServingMetrics
from serving.mirror import PredictionMirror

pytestmark = pytest.mark.integration


def make_events(count: int) -> list[PredictionEvent]:
    """Primary and shadow predictions as serving mirrors them, a few milliseconds apart."""
    start = datetime.now(UTC)
    run = uuid.uuid4().hex[:8]
    return [
        PredictionEvent(
            request_id=f"req-{run}-{i:05d}",
            customer_id=f"CUST-{i // 2:06d}",
            model_name="churn",
            model_version="v1",
            arm="primary" if i % 2 == 0 else "shadow",
            score=round((i * 0.0371) % 1.0, 4),
            latency_ms=1.5 + (i % 7) * 0.25,
            status="ok",
            predicted_at=start + timedelta(milliseconds=3 * i),
        )
        for i in range(count)
    ]


def read_predictions(settings: Settings) -> list[tuple[bytes | None, PredictionEvent]]:
    """Every message on ml.predictions, decoded, with its key."""
    partitions = topic_partitions(settings, Topics.PREDICTIONS)
    consumer = make_consumer(settings, group_id=f"test-mirror-{uuid.uuid4().hex}")
    found: list[tuple[bytes | None, PredictionEvent]] = []
    try:
        consumer.assign([TopicPartition(Topics.PREDICTIONS, p, 0) for p in partitions])
        pending = set(partitions)
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    pending.discard(message.partition())
                    continue
                event = decode_message(Topics.PREDICTIONS, message.value())
                assert isinstance(event, PredictionEvent)
                found.append((message.key(), event))
        assert not pending, f"partitions {pending} did not reach their end"
    finally:
        consumer.close()
    return found


def rdkafka_threads() -> int:
    """librdkafka's native threads in this process (they name themselves rdk:...)."""
    return sum(
        1 for comm in Path("/proc/self/task").glob("*/comm") if comm.read_text().startswith("rdk:")
    )


def mirror_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prediction-mirror-poll"]


def sample(metrics: ServingMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_published_event_arrives_on_ml_predictions(broker_settings):
    metrics = ServingMetrics()
    events = make_events(200)
    native_before = rdkafka_threads()
    with PredictionMirror(broker_settings, metrics) as mirror:
        assert all(mirror.publish(event) for event in events)
        assert mirror.flush(10.0) == 0
        assert (mirror.delivered, mirror.dropped) == (200, 0)
    assert mirror_threads() == []
    assert rdkafka_threads() == native_before

    assert sample(metrics, "mirror_events_total", outcome="delivered") == 200
    assert sample(metrics, "mirror_events_total", outcome="dropped") == 0
    assert sum(extent.messages for extent in scan_topic(broker_settings, Topics.PREDICTIONS)) == 200

    received = read_predictions(broker_settings)
    assert len(received) == 200
    for key, event in received:
        assert key == event.request_id.encode()  # keyed by request id
    by_id = {event.request_id: event for _, event in received}
    assert set(by_id) == {event.request_id for event in events}
    for sent in (events[0], events[1], events[137], events[199]):
        got = by_id[sent.request_id]
        assert got == sent
        assert (got.model_name, got.model_version, got.status) == ("churn", "v1", "ok")
        assert got.predicted_at.tzinfo is not None
    assert {event.arm for event in by_id.values()} == {"primary", "shadow"}


def test_broker_lost_after_start_never_blocks_and_counts_every_drop(broker_settings, caplog):
    caplog.set_level(logging.DEBUG, logger="serving.mirror")
    metrics = ServingMetrics()
    mirror = PredictionMirror(broker_settings, metrics, delivery_timeout_ms=1000)
    try:
        warm_ups, events = make_events(10), make_events(50)
        # A new idempotent producer needs up to a second for its producer id, as long as this
        # delivery timeout, so warm up until one event is delivered: connected, id assigned.
        for warm_up in warm_ups:
            assert mirror.publish(warm_up)
            assert mirror.flush(10.0) == 0
            if mirror.delivered:
                break
        drops = [r.getMessage() for r in caplog.records if "dropped prediction" in r.getMessage()]
        assert mirror.delivered == 1, drops
        warm_up_drops = mirror.dropped

        EmbeddedBroker(broker_settings.run_dir).stop()
        durations = []
        for event in events:
            started = time.perf_counter()
            accepted = mirror.publish(event)
            durations.append(time.perf_counter() - started)
            assert accepted  # queued; its delivery fails later
        assert max(durations) < 0.050, f"publish blocked for {max(durations) * 1000:.1f} ms"

        assert mirror.flush(10.0) == 0  # each event times out after delivery_timeout_ms
        assert (mirror.delivered, mirror.dropped - warm_up_drops) == (1, 50)
        text = metrics.render()[0].decode()
        failed = 50 + warm_up_drops
        assert f'mirror_dropped_total{{reason="delivery_failed"}} {failed}.0' in text
        assert f'mirror_events_total{{outcome="dropped"}} {failed}.0' in text
        assert 'mirror_events_total{outcome="delivered"} 1.0' in text
    finally:
        mirror.close()
    assert mirror_threads() == []


def test_full_buffer_drops_at_once_with_its_own_reason(broker_settings):
    metrics = ServingMetrics()
    with PredictionMirror(
        broker_settings, metrics, buffer_messages=5, delivery_timeout_ms=1000
    ) as mirror:
        EmbeddedBroker(broker_settings.run_dir).stop()
        accepted = [mirror.publish(event) for event in make_events(8)]
        assert accepted == [True] * 5 + [False] * 3
        assert sample(metrics, "mirror_dropped_total", reason="buffer_full") == 3
        assert mirror.flush(10.0) == 0
        assert mirror.dropped == 8
        assert sample(metrics, "mirror_dropped_total", reason="delivery_failed") == 5


def test_no_broker_at_start_disables_the_mirror_without_raising(settings_path, caplog):
    settings = load_settings(settings_path)
    metrics = ServingMetrics()
    with caplog.at_level(logging.DEBUG, logger="serving.mirror"):
        with PredictionMirror(settings, metrics) as mirror:
            assert not mirror.connected
            results = [mirror.publish(event) for event in make_events(3)]
            assert mirror.flush(1.0) == 0
    assert results == [False, False, False]
    assert (mirror.dropped, mirror.delivered) == (3, 0)
    assert sample(metrics, "mirror_dropped_total", reason="broker_unavailable") == 3
    assert sample(metrics, "mirror_events_total", outcome="dropped") == 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "not running" in warnings[0].getMessage()
    debug_drops = [r for r in caplog.records if r.getMessage().startswith("dropped prediction")]
    assert len(debug_drops) == 3
    assert mirror_threads() == []


def test_a_broker_that_starts_later_is_used(settings_path):
    settings = load_settings(settings_path)
    metrics = ServingMetrics()
    broker = EmbeddedBroker(settings.run_dir)
    mirror = PredictionMirror(settings, metrics, retry_interval_s=0.2)
    try:
        first, *later = make_events(200)
        assert not mirror.publish(first)
        broker.start()
        ensure_topics(settings)
        deadline = time.monotonic() + 10
        while not mirror.connected and time.monotonic() < deadline:
            assert not mirror.publish(later.pop())  # at most one retry per interval
            time.sleep(0.05)
        assert mirror.connected
        dropped_while_disabled = mirror.dropped
        assert mirror.publish(later.pop())
        assert mirror.flush(10.0) == 0
        assert (mirror.delivered, mirror.dropped) == (1, dropped_while_disabled)
        unavailable = sample(metrics, "mirror_dropped_total", reason="broker_unavailable")
        assert unavailable == dropped_while_disabled
    finally:
        mirror.close()
        broker.stop()
    assert mirror_threads() == []
