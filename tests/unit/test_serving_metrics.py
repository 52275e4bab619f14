"""Serving metrics: exact exposed names and labels, in a registry of their own."""

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import MIRROR_DROP_REASONS, ServingMetrics

pytestmark = pytest.mark.unit


def samples(metrics: ServingMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_every_metric_is_exposed_under_its_exact_name_and_labels():
    metrics = ServingMetrics()
    metrics.predictions_total.labels(version="v1", arm="primary", status="ok").inc()
    metrics.predictions_total.labels(version="v2", arm="shadow", status="error").inc(2)
    metrics.prediction_latency_seconds.labels(version="v1", arm="primary").observe(0.0007)
    metrics.outliers_detected_total.labels(version="v1", detector="isolation_forest").inc()
    metrics.drift_detected_total.labels(feature="monthly_charges").inc()
    metrics.router_weight.labels(version="v2", arm="canary").set(0.25)
    metrics.mirror_events_total.labels(outcome="delivered").inc(3)
    metrics.mirror_dropped_total.labels(reason="buffer_full").inc()

    got = samples(metrics)

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("predictions_total", version="v1", arm="primary", status="ok") == 1
    assert value("predictions_total", version="v2", arm="shadow", status="error") == 2
    assert value("prediction_latency_seconds_count", version="v1", arm="primary") == 1
    assert value("prediction_latency_seconds_bucket", version="v1", arm="primary", le="0.0005") == 0
    assert value("prediction_latency_seconds_bucket", version="v1", arm="primary", le="0.001") == 1
    assert value("prediction_latency_seconds_bucket", version="v1", arm="primary", le="2.5") == 1
    assert value("outliers_detected_total", version="v1", detector="isolation_forest") == 1
    assert value("drift_detected_total", feature="monthly_charges") == 1
    assert value("router_traffic_weight", version="v2", arm="canary") == 0.25
    assert value("mirror_events_total", outcome="delivered") == 3
    assert value("mirror_events_total", outcome="dropped") == 0
    assert value("mirror_dropped_total", reason="buffer_full") == 1
    for reason in set(MIRROR_DROP_REASONS) - {"buffer_full"}:
        assert value("mirror_dropped_total", reason=reason) == 0

    text = metrics.render()[0].decode()
    assert "# TYPE predictions_total counter" in text
    assert "# TYPE prediction_latency_seconds histogram" in text
    assert "# TYPE router_traffic_weight gauge" in text
    assert "_total_total" not in text


def test_latency_buckets_span_half_a_millisecond_to_two_and_a_half_seconds():
    metrics = ServingMetrics()
    metrics.prediction_latency_seconds.labels(version="v1", arm="primary").observe(1.0)
    bounds = sorted(
        float(labels["le"])
        for (name, label_set), _ in samples(metrics).items()
        if name == "prediction_latency_seconds_bucket"
        for labels in [dict(label_set)]
    )
    assert bounds[0] == 0.0005
    assert bounds[-2] == 2.5
    assert bounds[-1] == float("inf")


def test_instances_use_their_own_registries():
    first, second = ServingMetrics(), ServingMetrics()  # would raise on a shared registry
    labels = {"version": "v1", "arm": "primary", "status": "ok"}
    first.predictions_total.labels(**labels).inc()
    assert second.registry is not first.registry
    assert first.registry.get_sample_value("predictions_total", labels) == 1
    assert second.registry.get_sample_value("predictions_total", labels) is None
    assert REGISTRY.get_sample_value("predictions_total", labels) is None

    registry = CollectorRegistry()
    assert ServingMetrics(registry).registry is registry
