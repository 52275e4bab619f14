"""The monitoring figures that the serving process exports to Prometheus.

Dagster's monitoring assets compute drift, outlier and performance reports; they publish the
latest figures here as one small JSON read model (atomic replace). The serving process reads it on
each ``/metrics`` scrape (``serving.monitoring.MonitoringFeed``), so Prometheus sees drift
p-values, flags, outlier rates and live AUC next to the serving metrics, and
``drift_detected_total`` moves when a new report flags a feature.
"""

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MONITORING_FILE", "publish_monitoring_section", "read_monitoring"]

MONITORING_FILE = "monitoring_metrics.json"


def _path(read_models_dir: Path) -> Path:
    return read_models_dir / MONITORING_FILE


def read_monitoring(read_models_dir: Path) -> dict[str, Any]:
    path = _path(read_models_dir)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def publish_monitoring_section(read_models_dir: Path, section: str, payload: Any) -> Path:
    """Replace one section (``drift``, ``outliers`` or ``performance``) of the monitoring file."""
    read_models_dir.mkdir(parents=True, exist_ok=True)
    data = read_monitoring(read_models_dir)
    data[section] = payload
    path = _path(read_models_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, allow_nan=False, indent=1, default=str))
    os.replace(tmp, path)
    return path
