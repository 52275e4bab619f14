"""Feeds the monitoring read model (drift, outliers, live AUC) into the serving metrics."""

import logging
import math
from pathlib import Path

from churn_assets.monitoring import MONITORING_FILE, read_monitoring
from serving.metrics import ServingMetrics

__all__ = ["MonitoringFeed"]

log = logging.getLogger(__name__)


class MonitoringFeed:
    """Reads ``monitoring_metrics.json`` when it changes and sets the monitoring gauges.

    ``drift_detected_total{feature}`` grows once per drift report that flags the feature.
    """

    def __init__(self, read_models_dir: Path, metrics: ServingMetrics) -> None:
        self.path = read_models_dir / MONITORING_FILE
        self.read_models_dir = read_models_dir
        self.metrics = metrics
        self._mtime: float | None = None
        self._seen_reports: set[str] = set()

    def refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        data = read_monitoring(self.read_models_dir)
        self._mtime = mtime
        drift = data.get("drift") or {}
        report_id = str(drift.get("report_id", ""))
        new_report = bool(report_id) and report_id not in self._seen_reports
        for feature, figures in (drift.get("features") or {}).items():
            p_value = figures.get("p_value")
            if p_value is not None and math.isfinite(p_value):
                self.metrics.drift_p_value.labels(feature=feature).set(p_value)
            flagged = bool(figures.get("drift"))
            self.metrics.drift_flag.labels(feature=feature).set(1.0 if flagged else 0.0)
            self.metrics.drift_detected_total.labels(feature=feature).inc(
                1 if flagged and new_report else 0
            )
        if new_report:
            self._seen_reports.add(report_id)
        for detector, rate in ((data.get("outliers") or {}).get("rates") or {}).items():
            self.metrics.outlier_rate.labels(detector=detector).set(rate)
        for row in (data.get("performance") or {}).get("auc") or []:
            value = row.get("roc_auc")
            if value is not None and math.isfinite(value):
                self.metrics.model_roc_auc.labels(
                    version=row["model_version"], arm=row["arm"], kind=row["kind"]
                ).set(value)
        log.info("monitoring figures refreshed (drift report %s)", report_id or "none")
