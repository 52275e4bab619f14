"""Prometheus metrics of the serving process.

Every metric lives in a :class:`~prometheus_client.CollectorRegistry` owned by one
:class:`ServingMetrics`, never in the global default registry, so tests and several servers in one
process do not collide. Counter names are given without ``_total``: ``prometheus_client`` appends
it, and the exposed names are the ones the README lists (``predictions_total``, ...).
"""

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "LATENCY_BUCKETS_S",
    "MIRROR_DROP_REASONS",
    "ServingMetrics",
]

# 0.5 ms to 2.5 s: a warm XGBoost score is about a millisecond, a cold SHAP explanation seconds.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

# The label values of ``mirror_dropped_total{reason=...}``.
MIRROR_DROP_REASONS: tuple[str, ...] = (
    "buffer_full",
    "delivery_failed",
    "broker_unavailable",
    "encode_error",
)


class ServingMetrics:
    """The serving process's Prometheus metrics, registered in one dedicated registry.

    ``render()`` returns the exposition body and its content type for a ``/metrics`` endpoint.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.predictions_total = Counter(
            "predictions",
            "Predictions served, by model version, router arm and outcome (ok/error).",
            ["version", "arm", "status"],
            registry=self.registry,
        )
        self.prediction_latency_seconds = Histogram(
            "prediction_latency_seconds",
            "Time to score one request, by model version and router arm.",
            ["version", "arm"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.outliers_detected_total = Counter(
            "outliers_detected",
            "Requests flagged as outliers, by model version and detector.",
            ["version", "detector"],
            registry=self.registry,
        )
        self.drift_detected_total = Counter(
            "drift_detected",
            "Drift detections, by feature.",
            ["feature"],
            registry=self.registry,
        )
        self.router_weight = Gauge(
            "router_traffic_weight",
            "Share of traffic (0..1) the router sends to a model version on an arm.",
            ["version", "arm"],
            registry=self.registry,
        )
        self.mirror_events_total = Counter(
            "mirror_events",
            "Prediction events mirrored to Kafka, by outcome (delivered/dropped).",
            ["outcome"],
            registry=self.registry,
        )
        self.mirror_dropped_total = Counter(
            "mirror_dropped",
            "Prediction events the Kafka mirror dropped, by reason.",
            ["reason"],
            registry=self.registry,
        )
        # Monitoring figures, set from the monitoring read models that Dagster publishes.
        self.drift_p_value = Gauge(
            "drift_p_value",
            "Latest corrected drift p-value per feature (and 'prediction' for score drift).",
            ["feature"],
            registry=self.registry,
        )
        self.drift_flag = Gauge(
            "drift_flag",
            "1 when the latest drift report flags the feature, else 0.",
            ["feature"],
            registry=self.registry,
        )
        self.outlier_rate = Gauge(
            "outlier_rate",
            "Share of live rows flagged as outliers in the latest outlier report, by detector.",
            ["detector"],
            registry=self.registry,
        )
        self.model_roc_auc = Gauge(
            "model_roc_auc",
            "Live ROC-AUC per model version and arm; kind is 'realised' (labelled rows) or "
            "'estimated' (label-free, from calibrated probabilities).",
            ["version", "arm", "kind"],
            registry=self.registry,
        )
        self.model_quarantined = Gauge(
            "model_quarantined",
            "1 for a registered model version serving left out because it failed its "
            "integrity check (damaged or missing artefacts).",
            ["version"],
            registry=self.registry,
        )
        # Known label values start at zero, so rate() and alerts see the series before a drop.
        for outcome in ("delivered", "dropped"):
            self.mirror_events_total.labels(outcome=outcome)
        for reason in MIRROR_DROP_REASONS:
            self.mirror_dropped_total.labels(reason=reason)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
