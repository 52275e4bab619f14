"""The dashboard's data layer: read models, the model registry, the serving API, Dagster's
GraphQL API and the broker, each returning data or an :class:`Unavailable` that says why not.

No Panel and no Dagster here, so every function is unit-testable without a browser. Readers never
open the live DuckDB warehouse: they read the Parquet/JSON read models that Dagster assets publish
atomically (ARCHITECTURE.md, warehouse concurrency). Every network call has a short timeout, because
a page refresh must not hang on a dead dependency.
"""

import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import requests
from pydantic import ValidationError

from churn_assets.config import Settings
from churn_assets.contract import Contract, ContractError, Feature
from churn_assets.monitoring import read_monitoring
from churn_assets.rollout_control import serving_url
from churn_assets.schemas import features_schema
from churn_assets.warehouse import (
    LEGACY_EPOCH,
    ReadModelMissing,
    load_read_model,
    read_model_path,
)

__all__ = [
    "ADMIN_TOKEN_ENV",
    "ActionResult",
    "DAGSTER_RUNS_QUERY",
    "FormCheck",
    "FormContract",
    "FormField",
    "ReadModels",
    "ServingClient",
    "Unavailable",
    "dagster_graphql_url",
    "dagster_runs",
    "default_features",
    "feature_label",
    "form_contract",
    "form_fields",
    "kafka_lag",
    "open_alerts",
    "reference_sample",
    "registry_versions",
    "request_rate",
    "validate_features",
]

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "CHURN_ADMIN_TOKEN"
ROLLOUT_STATE_FILE = "rollout_state.json"
ROLLOUT_DECISIONS = "rollout_decisions"
HTTP_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Unavailable:
    """A source that cannot be shown, with the reason and what would fix it."""

    source: str
    reason: str
    hint: str = ""

    def message(self) -> str:
        text = f"{self.source} is unavailable: {self.reason}"
        return f"{text}. {self.hint}" if self.hint else text


# -- read models -----------------------------------------------------------------------------------


class ReadModels:
    """The published read models in ``settings.read_models_dir`` (Parquet and JSON)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = settings.read_models_dir

    def frame(self, name: str, *, what: str | None = None) -> pd.DataFrame | Unavailable:
        """Read model ``name`` as a DataFrame; missing, unreadable or empty -> Unavailable."""
        source = what or f"read model {name!r}"
        try:
            frame = _load_cached(self.directory, name)
        except ReadModelMissing:
            return Unavailable(
                source,
                f"it has not been published yet ({self.directory / (name + '.parquet')})",
                "Materialise the Dagster asset that publishes it.",
            )
        except (duckdb.Error, pa.ArrowException) as exc:  # read models are read by pyarrow
            return Unavailable(source, f"the file cannot be read ({exc})")
        if frame.empty:
            return Unavailable(source, "it holds no rows yet")
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


# -- model registry --------------------------------------------------------------------------------

METRIC_COLUMNS = {
    "test_roc_auc": "ROC-AUC",
    "test_pr_auc": "PR-AUC",
    "test_brier": "Brier",
    "test_log_loss": "log loss",
    "test_calibration_error": "calibration error",
}


def registry_versions(settings: Settings) -> pd.DataFrame | Unavailable:
    """Registered versions with their test metrics and aliases, newest first.

    The registry is read-only here (manifests and the alias file; hashes are verified by whoever
    loads an artefact).
    """
    from churn_assets.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(settings.registry_dir)
    try:
        versions = registry.versions()
        aliases = registry.aliases()
    except RegistryError as exc:
        return Unavailable("Model registry", str(exc))
    if not versions:
        return Unavailable(
            "Model registry",
            f"no model is registered in {settings.registry_dir}",
            "Run the Dagster training_job.",
        )
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for version in reversed(versions):
        metrics = version.metadata.get("metrics", {})
        row: dict[str, Any] = {
            "version": version.version,
            "aliases": ", ".join(sorted(by_version.get(version.version, []))) or "—",
            "registered_at": version.registered_at[:19].replace("T", " "),
        }
        for key, label in METRIC_COLUMNS.items():
            value = metrics.get(key)
            row[label] = None if value is None else round(float(value), 4)
        row["code"] = version.code_version[:10]
        rows.append(row)
    return pd.DataFrame(rows)


def reference_sample(settings: Settings, ref: str = "champion") -> pd.DataFrame | Unavailable:
    """The training reference sample stored with a registered version (what drift compares to)."""
    from churn_assets.outliers import REFERENCE_FILE, load_reference_frame
    from churn_assets.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(settings.registry_dir)
    try:
        version = registry.get(ref)
        if REFERENCE_FILE not in version.files:
            return Unavailable(
                "Reference sample", f"{version.version} was registered without {REFERENCE_FILE}"
            )
        data = registry.read_file(version.version, REFERENCE_FILE)
    except RegistryError as exc:
        return Unavailable("Reference sample", str(exc), "Run the Dagster training_job.")
    return load_reference_frame({REFERENCE_FILE: data})


# -- the prediction form ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FormContract:
    """The feature contract the prediction form is built from, and where it came from."""

    contract: Contract
    source: str


def form_contract(settings: Settings, ref: str = "champion") -> FormContract:
    """The contract ``ref`` (the champion) was trained with (its ``contract.json``; a version
    from before contracts was trained on the default contract), or the configured contract
    while no model is registered. A stored contract that cannot be read is an error: the form
    must not offer other features than the model takes."""
    from churn_assets.model import CONTRACT_FILE, stored_contract
    from churn_assets.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(settings.registry_dir)
    try:
        version = registry.get(ref)
    except RegistryError as exc:
        return FormContract(settings.contract, f"the configured contract ({exc})")
    try:
        contract = stored_contract(registry, version)
    except RegistryError as exc:
        raise ContractError(f"{version.version}'s {CONTRACT_FILE} cannot be used: {exc}") from exc
    default = "" if CONTRACT_FILE in version.files else " (the default)"
    return FormContract(contract, f"{version.version}'s contract{default}")


@dataclass(frozen=True)
class FormField:
    """One input of the prediction form: ``kind`` chooses the widget (integer and number:
    a number box within ``start``/``end``; category: a choice of ``options``; boolean: a
    checkbox). ``required`` is false where the contract fills a missing value."""

    name: str
    kind: str
    label: str
    default: Any
    options: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    required: bool = True


def feature_label(feature: Feature) -> str:
    """The form's label of a feature: its description (capitalised), else its name."""
    text = feature.description or feature.name.replace("_", " ")
    return text[:1].upper() + text[1:]


def form_fields(contract: Contract, reference: pd.DataFrame | None = None) -> list[FormField]:
    """One field per feature of ``contract``, in its order. Defaults: a number's median in
    ``reference`` (the model's training reference) when it has the column, else its minimum
    (or 0), within its bounds; a category's first value; false."""
    fields = []
    for feature in contract.features:
        default: Any
        if feature.kind in ("integer", "number"):
            default = _number_default(feature, reference)
        elif feature.kind == "category":
            default = next(iter(feature.categories))
        else:
            default = False
        fields.append(
            FormField(
                name=feature.name,
                kind=feature.kind,
                label=feature_label(feature),
                default=default,
                options=tuple(feature.categories),
                start=feature.minimum,
                end=feature.maximum,
                required=feature.missing == "reject",
            )
        )
    return fields


def _number_default(feature: Feature, reference: pd.DataFrame | None) -> int | float:
    value = 0.0
    if feature.minimum is not None:
        value = feature.minimum
    if reference is not None and feature.name in reference.columns:
        column = pd.to_numeric(reference[feature.name], errors="coerce").dropna()
        if not column.empty:
            value = float(column.median())
    if feature.minimum is not None:
        value = max(value, feature.minimum)
    if feature.maximum is not None:
        value = min(value, feature.maximum)
    if feature.kind == "integer":
        return int(round(value))
    return round(float(value), 2)


def default_features(contract: Contract, reference: pd.DataFrame | None = None) -> dict[str, Any]:
    """The form's starting values (:func:`form_fields`' defaults), by feature name."""
    return {field.name: field.default for field in form_fields(contract, reference)}


@dataclass(frozen=True)
class FormCheck:
    """The form's values validated with the platform's own feature schema."""

    features: dict[str, Any] | None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.features is not None


def validate_features(raw: Mapping[str, Any], contract: Contract) -> FormCheck:
    """Validate form values with ``contract``'s feature schema (the ranges and categories
    serving enforces); errors are keyed by feature and phrased for the form."""
    errors: dict[str, str] = {}
    for feature in contract.features:
        if feature.missing == "reject" and (raw.get(feature.name) in (None, "")):
            errors[feature.name] = "required"
    if not errors:
        values = {name: (None if raw.get(name) == "" else raw.get(name)) for name in contract.names}
        try:
            model = features_schema(contract).model_validate(values)
        except ValidationError as exc:
            for error in exc.errors():
                name = str(error["loc"][0]) if error["loc"] else "form"
                errors.setdefault(name, error["msg"])
        else:
            return FormCheck(model.model_dump())
    return FormCheck(None, errors)


# -- the serving API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionResult:
    """The outcome of an admin call: ``ok`` and a message to show."""

    ok: bool
    message: str
    body: Any = None


class ServingClient:
    """The serving process's REST API, with short timeouts.

    The admin token is read from ``CHURN_ADMIN_TOKEN`` in this (server-side) process and never
    reaches the browser.
    """

    def __init__(
        self, base_url: str, *, token: str | None = None, timeout_s: float = HTTP_TIMEOUT_S
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._session = requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> "ServingClient":
        """The serving API where the rollout reaches it too: ``serving.url``, else built from
        ``serving.host``/``http_port`` (:func:`churn_assets.rollout_control.serving_url`)."""
        return cls(serving_url(settings), token=os.environ.get(ADMIN_TOKEN_ENV) or None)

    @property
    def admin_enabled(self) -> bool:
        return bool(self.token)

    def _unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(
            "Serving API",
            f"{self.base_url} does not answer ({type(exc).__name__})",
            "Start it with `churn serve` (or `churn up`).",
        )

    def _get(self, path: str, *, admin: bool = False) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if admin and self.token else {}
        response = self._session.get(self.base_url + path, headers=headers, timeout=self.timeout_s)
        response.raise_for_status()
        return (
            response.json()
            if "json" in response.headers.get("content-type", "")
            else (response.text)
        )

    def _read(self, path: str, source: str, *, admin: bool = False) -> Any:
        try:
            return self._get(path, admin=admin)
        except requests.HTTPError as exc:
            return Unavailable(source, _http_detail(exc.response))
        except requests.RequestException as exc:
            return self._unreachable(exc)

    def health(self) -> dict[str, bool] | Unavailable:
        """Liveness and readiness of the server and of the router model."""
        result: dict[str, bool] = {}
        for name, path in (
            ("live", "/v2/health/live"),
            ("ready", "/v2/health/ready"),
            ("router ready", "/v2/models/churn-router/ready"),
        ):
            try:
                response = self._session.get(self.base_url + path, timeout=self.timeout_s)
            except requests.RequestException as exc:
                return self._unreachable(exc)
            result[name] = response.status_code == 200
        return result

    def router_metrics(self) -> dict[str, Any] | Unavailable:
        return self._read("/router/metrics", "Router metrics")

    def shadow_analysis(self) -> dict[str, Any] | Unavailable:
        return self._read("/router/shadow-analysis", "Shadow analysis")

    def prediction_counts(self) -> dict[str, float] | Unavailable:
        """``predictions_total`` summed by status, from the Prometheus exposition."""
        from prometheus_client.parser import text_string_to_metric_families

        text = self._read("/metrics", "Prometheus metrics")
        if isinstance(text, Unavailable):
            return text
        counts = {"ok": 0.0, "error": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name != "predictions":
                continue
            for sample in family.samples:
                if sample.name == "predictions_total":
                    status = sample.labels.get("status", "ok")
                    counts[status] = counts.get(status, 0.0) + sample.value
        return counts

    def audit(self) -> list[dict[str, Any]] | Unavailable:
        if not self.admin_enabled:
            return Unavailable(
                "Router audit log",
                f"the dashboard has no admin token ({ADMIN_TOKEN_ENV} is not set)",
            )
        return self._read("/router/audit", "Router audit log", admin=True)

    def predict(self, features: Mapping[str, Any], customer_id: str | None = None):
        """``POST /predict`` -> the routed prediction dict, or Unavailable."""
        return self._post_json("/predict", _request_body(features, customer_id), "Prediction")

    def explain(
        self, features: Mapping[str, Any], version: str, customer_id: str | None = None
    ) -> dict[str, Any] | Unavailable:
        """SHAP contributions of each of the form's features for ``version`` (as many as there
        are features)."""
        path = f"/explain?version={version}&top_k={len(features)}"
        body = _request_body(features, customer_id)
        return self._post_json(path, body, f"Explanation ({version})")

    def _post_json(self, path: str, body: Any, source: str) -> Any:
        try:
            # User-triggered, so it may wait longer than a refresh: the first explanation of a
            # version builds its SHAP explainer.
            response = self._session.post(
                self.base_url + path, json=body, timeout=self.timeout_s * 5
            )
        except requests.RequestException as exc:
            return self._unreachable(exc)
        if response.status_code != 200:
            return Unavailable(source, _http_detail(response))
        return response.json()

    # -- admin -------------------------------------------------------------------------------------
    def _admin(self, method: str, path: str, body: Any = None) -> ActionResult:
        if not self.admin_enabled:
            return ActionResult(
                False, f"admin actions are disabled: set {ADMIN_TOKEN_ENV} for the dashboard"
            )
        try:
            response = self._session.request(
                method,
                self.base_url + path,
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=self.timeout_s * 3,
            )
        except requests.RequestException as exc:
            return ActionResult(False, self._unreachable(exc).message())
        if response.status_code != 200:
            return ActionResult(False, f"refused: {_http_detail(response)}")
        return ActionResult(True, "done", response.json())

    def promote(self) -> ActionResult:
        return self._admin("POST", "/router/promote-v2")

    def rollback(self) -> ActionResult:
        return self._admin("POST", "/router/rollback")

    def set_policy(
        self, strategy: str, canary_weight: float | None = None, challenger: str | None = None
    ) -> ActionResult:
        body: dict[str, Any] = {"strategy": strategy}
        if canary_weight is not None:
            body["canary_weight"] = canary_weight
        if challenger is not None:
            body["challenger"] = challenger
        return self._admin("PUT", "/router/policy", body)


def _request_body(features: Mapping[str, Any], customer_id: str | None) -> dict[str, Any]:
    body = dict(features)
    if customer_id:
        body["customer_id"] = customer_id
    return body


def _http_detail(response: requests.Response | None) -> str:
    if response is None:
        return "no response"
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):
        detail = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg', '')}"
            for item in detail
        )
    return f"HTTP {response.status_code}: {str(detail)[:300]}"


def request_rate(
    previous: tuple[float, float] | None, current: tuple[float, float]
) -> float | None:
    """Requests per second between two ``(monotonic time, total requests)`` samples; ``None``
    until there are two samples, or when the counter went backwards (the server restarted)."""
    if previous is None:
        return None
    elapsed = current[0] - previous[0]
    delta = current[1] - previous[1]
    if elapsed <= 0 or delta < 0:
        return None
    return delta / elapsed


# -- Dagster ---------------------------------------------------------------------------------------

DAGSTER_RUNS_QUERY = """
query DashboardRuns($limit: Int) {
  runsOrError(limit: $limit) {
    __typename
    ... on Runs {
      results { runId jobName status creationTime startTime endTime }
    }
    ... on PythonError { message }
    ... on InvalidPipelineRunsFilterError { message }
  }
}
"""


def dagster_graphql_url(settings: Settings) -> str:
    """The Dagster webserver's GraphQL endpoint: under ``dagster.url`` when it is set (e.g. the
    webserver's service name in Docker Compose), else on this machine's ``webserver_port``."""
    base = settings.dagster.url or f"http://127.0.0.1:{settings.dagster.webserver_port}"
    return f"{base.rstrip('/')}/graphql"


def dagster_runs(settings: Settings, limit: int = 10) -> pd.DataFrame | Unavailable:
    """The most recent Dagster runs from the webserver's GraphQL API."""
    url = dagster_graphql_url(settings)
    source = "Dagster runs"
    try:
        response = requests.post(
            url,
            json={"query": DAGSTER_RUNS_QUERY, "variables": {"limit": limit}},
            timeout=HTTP_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        return Unavailable(
            source,
            f"the Dagster webserver at {url} does not answer ({type(exc).__name__})",
            "Start it with `churn up` or `dagster dev`.",
        )
    if response.status_code != 200:
        return Unavailable(source, _http_detail(response))
    try:
        payload = response.json()
    except ValueError:
        return Unavailable(source, f"{url} did not answer JSON")
    if payload.get("errors"):
        return Unavailable(source, "; ".join(e.get("message", "") for e in payload["errors"]))
    result = (payload.get("data") or {}).get("runsOrError") or {}
    if result.get("__typename") != "Runs":
        return Unavailable(source, result.get("message") or f"unexpected answer {result!r}")
    runs = result.get("results") or []
    if not runs:
        return Unavailable(source, "Dagster has no runs yet")
    rows = []
    for run in runs:
        started = run.get("startTime") or run.get("creationTime")
        ended = run.get("endTime")
        rows.append(
            {
                "run": run["runId"][:8],
                "job": run["jobName"],
                "status": run["status"],
                "started": _timestamp(started),
                "duration_s": None if not (started and ended) else round(ended - started, 1),
            }
        )
    return pd.DataFrame(rows)


def _timestamp(epoch_s: float | None) -> str:
    if not epoch_s:
        return "—"
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- Kafka lag -------------------------------------------------------------------------------------


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
            f"the broker cannot be reached ({_first_line(exc)})",
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
        return Unavailable(source, f"reading the topics failed ({_first_line(exc)})")
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


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
