"""The read models that Dagster assets publish atomically (Parquet and JSON) in
``storage.read_models_dir``; the dashboard never opens the live DuckDB warehouse."""

import json
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from churn_assets.config import Settings
from churn_assets.monitoring import read_monitoring
from churn_assets.warehouse import (
    ReadModelMissing,
    ReadModelUnreadable,
    load_read_model,
    read_model_path,
)
from dashboards.sources import Unavailable

__all__ = ["ReadModels", "open_alerts"]

ROLLOUT_STATE_FILE = "rollout_state.json"
ROLLOUT_DECISIONS = "rollout_decisions"
CALIBRATION = "calibration"
# The calibration read model's contract (one row per group of customers).
CALIBRATION_COLUMNS = (
    "grouping",  # 'decile' (group_label '1'..'10') or 'segment'
    "group_label",
    "customers",
    "predicted_rate",  # mean predicted churn probability over the horizon
    "observed_rate",  # realised churn within the same horizon after scoring
    "tolerance",  # half-width of the calibration error band
    "horizon_days",
    "model_version",
)


class ReadModels:
    """The published read models in ``settings.read_models_dir`` (Parquet and JSON)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = settings.read_models_dir

    def frame(
        self, name: str, *, what: str | None = None, missing: Unavailable | None = None
    ) -> pd.DataFrame | Unavailable:
        """Read model ``name`` as a DataFrame; missing, unreadable or empty -> Unavailable
        (``missing``, when given, for one that is not published or has no rows yet)."""
        source = what or f"read model {name!r}"
        try:
            frame = _load_cached(self.directory, name)
        except ReadModelMissing:
            return missing or Unavailable(
                source,
                f"it has not been published yet ({self.directory / (name + '.parquet')})",
                "Materialise the Dagster asset that publishes it.",
            )
        except ReadModelUnreadable as exc:
            return Unavailable(source, f"the file cannot be read ({exc})")
        if frame.empty:
            return missing or Unavailable(source, "it holds no rows yet")
        return frame

    def monitoring(self) -> dict[str, Any] | Unavailable:
        """The monitoring read model (drift, outliers, performance sections)."""
        try:
            data = read_monitoring(self.directory)
        except (OSError, ValueError) as exc:
            return Unavailable("monitoring_metrics.json", f"it cannot be read ({exc})")
        if not data:
            return Unavailable(
                "Monitoring figures",
                "no monitoring report has been published yet",
                "Materialise drift_report, outlier_report and live_performance in Dagster.",
            )
        return data

    def drift_history(self) -> pd.DataFrame | Unavailable:
        frame = self.frame("drift_history", what="Drift history")
        if isinstance(frame, Unavailable):
            return frame
        frame["computed_at"] = pd.to_datetime(frame["computed_at"], utc=True)
        return frame.sort_values(["computed_at", "feature"], ignore_index=True)

    def calibration(self) -> pd.DataFrame | Unavailable:
        """Observed vs predicted churn over the model's horizon, by score decile and by segment
        (:data:`CALIBRATION_COLUMNS`); until it is published, a "waiting for" explanation.
        One model version and one horizon, or an explanation of the mix."""
        source = "Calibration"
        frame = self.frame(
            CALIBRATION,
            what=source,
            missing=Unavailable(
                source,
                f"waiting for the {CALIBRATION!r} read model "
                f"({self.directory / (CALIBRATION + '.parquet')} is not published yet)",
                "It is published once the customers a model scored have been followed for "
                "its horizon, so observed churn can be set beside predicted risk.",
            ),
        )
        if isinstance(frame, Unavailable):
            return frame
        absent = [column for column in CALIBRATION_COLUMNS if column not in frame.columns]
        if absent:
            return Unavailable(source, f"the read model has no column {', '.join(absent)}")
        for column in ("horizon_days", "model_version"):
            values = sorted(frame[column].astype(str).unique())
            if len(values) > 1:
                return Unavailable(
                    source, f"the read model mixes {column} values ({', '.join(values)})"
                )
        return frame

    def live_window(self) -> pd.DataFrame | Unavailable:
        """Landed customer events of the last ``monitoring.live_window_days`` (the drift
        report's live window)."""
        frame = self.frame("landed_customer_events", what="Landed customer events")
        if isinstance(frame, Unavailable):
            return frame
        times = pd.to_datetime(frame["event_time"], utc=True)
        start = times.max() - pd.Timedelta(days=self.settings.monitoring.live_window_days)
        return frame.loc[times > start].reset_index(drop=True)

    def rollout_state(self) -> dict[str, Any] | Unavailable:
        path = self.directory / ROLLOUT_STATE_FILE
        if not path.is_file():
            return Unavailable(
                "Rollout state",
                "no rollout yet",
                "The rollout_decision asset publishes it once a challenger is rolled out.",
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return Unavailable("Rollout state", f"{path} cannot be read ({exc})")
        if not isinstance(data, dict) or "phase" not in data:
            return Unavailable("Rollout state", f"{path} does not hold a rollout state")
        return data

    def rollout_decisions(self) -> pd.DataFrame | Unavailable:
        frame = self.frame(ROLLOUT_DECISIONS, what="Rollout decisions")
        if isinstance(frame, Unavailable):
            return Unavailable("Rollout decisions", "no rollout yet", frame.reason)
        frame["decided_at"] = pd.to_datetime(frame["decided_at"], utc=True)
        frame["reasons"] = [_json_list(value) for value in frame["reasons"]]
        return frame.sort_values("decided_at", ascending=False, ignore_index=True)


_CACHE: dict[tuple[str, str], tuple[tuple[int, int], pd.DataFrame]] = {}
_CACHE_LOCK = threading.Lock()


def _load_cached(directory: Path, name: str) -> pd.DataFrame:
    """``load_read_model`` cached per file version: publishers replace read models atomically,
    so (mtime, size) of the path identifies what was read. Callers get a copy to change."""
    path = read_model_path(directory, name)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return load_read_model(directory, name)  # raises ReadModelMissing with its message
    key, version = (str(directory), name), (stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is None or cached[0] != version:
        cached = (version, load_read_model(directory, name))
        with _CACHE_LOCK:
            _CACHE[key] = cached
    return cached[1].copy()


def _json_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return [str(value)]
    return [str(item) for item in parsed] if isinstance(parsed, list) else [str(parsed)]


def open_alerts(settings: Settings, monitoring: Mapping[str, Any]) -> list[dict[str, str]]:
    """Alerts that the latest monitoring figures raise: drifted features, multivariate drift,
    outlier rates above twice the expected contamination, live AUC below the retraining
    threshold. Each is ``{"kind", "subject", "detail"}``."""
    alerts: list[dict[str, str]] = []
    drift = monitoring.get("drift") or {}
    threshold = settings.monitoring.drift_detection.threshold
    for feature, figures in sorted((drift.get("features") or {}).items()):
        if figures.get("drift"):
            alerts.append(
                {
                    "kind": "drift",
                    "subject": feature,
                    "detail": f"corrected p = {figures['p_value']:.2g} < {threshold}",
                }
            )
    multivariate = drift.get("multivariate") or {}
    if multivariate.get("drift"):
        alerts.append(
            {
                "kind": "drift",
                "subject": "multivariate (MMD)",
                "detail": f"p = {multivariate.get('p_value', float('nan')):.2g}",
            }
        )
    outliers = monitoring.get("outliers") or {}
    expected = outliers.get("expected")
    for detector, rate in sorted((outliers.get("rates") or {}).items()):
        if expected is not None and rate > 2 * expected:
            alerts.append(
                {
                    "kind": "outliers",
                    "subject": detector,
                    "detail": f"rate {rate:.2%} against {expected:.2%} expected",
                }
            )
    minimum = settings.retraining.performance_threshold
    for row in (monitoring.get("performance") or {}).get("auc") or []:
        auc = row.get("roc_auc")
        if auc is not None and auc < minimum:
            alerts.append(
                {
                    "kind": "performance",
                    "subject": f"{row['model_version']}/{row['arm']}",
                    "detail": f"{row['kind']} ROC-AUC {auc:.3f} < {minimum}",
                }
            )
    return alerts
