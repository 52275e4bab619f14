"""The ``router`` evidence source: one churn serving router's own counters and shadow pairs.

Shadow evidence comes from the serving API's ``GET /router/shadow-analysis`` (pairs where the
challenger shadowed the champion in that process); canary evidence from ``GET /router/metrics``
(the challenger's canary requests and errors since the step began, its recent p99 latency) and
from the ``performance`` section of the monitoring read model that ``live_performance`` publishes
(AUC per version and arm: realised when both arms have ``monitoring.min_labelled_rows`` labels,
the label-free estimate otherwise).

The counters live in the serving process's memory, so this source sees only what that process
routed: the embedded default. Where Seldon routes between per-version pods, use ``prometheus``.
"""

from collections.abc import Mapping
from typing import Any

import requests

from churn_assets.config import Settings
from churn_assets.evidence import Evidence, EvidenceError, EvidenceUnavailable, Figure
from churn_assets.evidence.auc import auc_fields, auc_pair
from churn_assets.monitoring import read_monitoring
from churn_assets.rollout import CanaryEvidence, Phase, RolloutState, ShadowEvidence

__all__ = ["RouterEvidence", "serving_url"]

SOURCE = "router"
MONITORING = "monitoring read model (live_performance)"


def serving_url(settings: Settings) -> str:
    """Base URL clients use to reach serving (evidence source, local deployment target,
    dashboard, `churn traffic`): ``serving.url``, else built from ``serving.host``/``http_port``."""
    if settings.serving.url:
        return settings.serving.url.rstrip("/")
    host = settings.serving.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{settings.serving.http_port}"


def _arm_counts(requests_by_key: Mapping[str, int], version: str, arm: str) -> tuple[int, int]:
    total = errors = 0
    for key, count in requests_by_key.items():
        key_version, key_arm, status = key.split("/")
        if key_version == version and key_arm == arm:
            total += int(count)
            errors += int(count) if status != "ok" else 0
    return total, errors


class RouterEvidence:
    """Evidence from the serving router at ``serving.url`` (see the module docstring)."""

    name = SOURCE

    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.base_url = serving_url(settings)
        self.timeout_s = timeout_s

    def describe(self) -> dict[str, Any]:
        return {"source": SOURCE, "url": self.base_url}

    def _get_json(self, path: str) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = requests.get(url, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise EvidenceUnavailable(
                f"GET {url} failed: {exc}; is the serving process up?"
            ) from exc
        if response.status_code != 200:
            raise EvidenceUnavailable(
                f"GET {url} answered HTTP {response.status_code}: {response.text[:300]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise EvidenceError(f"GET {url} answered non-JSON: {response.text[:200]}") from exc

    def collect(self, state: RolloutState, baseline: Mapping[str, Any], now: float) -> Evidence:
        metrics_path = "/router/metrics"
        metrics = self._get_json(metrics_path)
        counts = metrics.get("requests", {})
        raw: dict[str, Any] = {"url": self.base_url, "router_state": metrics.get("state")}
        if state.challenger is None:
            return Evidence(SOURCE, raw=raw)
        total, errors = _arm_counts(counts, state.challenger, "canary")
        raw["canary_requests_total"] = total
        raw["canary_errors_total"] = errors
        if state.phase in (Phase.SHADOW, Phase.BLUE_GREEN_READY):
            return self._shadow(state.challenger, raw)
        if state.phase is not Phase.CANARY:
            return Evidence(SOURCE, raw=raw)
        return self._canary(state, baseline, now, metrics, raw)

    def _shadow(self, challenger: str, raw: dict[str, Any]) -> Evidence:
        path = f"/router/shadow-analysis?version={challenger}"
        analysis = self._get_json(path)
        raw["shadow_analysis"] = analysis
        pairs, errors = int(analysis.get("pairs") or 0), int(analysis.get("errors") or 0)
        if not pairs and not errors:
            return Evidence(SOURCE, raw=raw, waiting=(f"no shadow pairs yet (GET {path})",))
        shadow = ShadowEvidence(
            requests=pairs,
            agreement_rate=float(analysis.get("agreement_rate", 0.0)),
            ks_statistic=float(analysis.get("ks_statistic", 0.0)),
            latency_overhead_ms=float(analysis.get("latency_overhead_ms", 0.0)),
            errors=errors,
        )
        query = f"GET {self.base_url}{path}"
        figures = {
            name: Figure(float(getattr(shadow, attribute)), SOURCE, query)
            for name, attribute in (
                ("shadow_requests", "requests"),
                ("shadow_errors", "errors"),
                ("agreement_rate", "agreement_rate"),
                ("ks_statistic", "ks_statistic"),
                ("latency_overhead_ms", "latency_overhead_ms"),
            )
        }
        return Evidence(SOURCE, shadow=shadow, figures=figures, raw=raw)

    def _canary(
        self,
        state: RolloutState,
        baseline: Mapping[str, Any],
        now: float,
        metrics: Mapping[str, Any],
        raw: dict[str, Any],
    ) -> Evidence:
        assert state.challenger is not None
        total, errors = raw["canary_requests_total"], raw["canary_errors_total"]
        base_requests = int(baseline.get("canary_requests_total", 0))
        base_errors = int(baseline.get("canary_errors_total", 0))
        if total < base_requests or errors < base_errors:
            # The counters went backwards: serving restarted during the step. Count from its start.
            raw["serving_restarted"] = True
            base_requests = base_errors = 0
        step_requests = max(total - base_requests, 0)
        step_errors = min(max(errors - base_errors, 0), step_requests)
        latency = metrics.get("latency_ms", {}).get(f"{state.challenger}/canary", {})
        rows = (read_monitoring(self.settings.read_models_dir).get("performance") or {}).get(
            "auc"
        ) or []
        pair = auc_pair(
            rows, state.champion, state.challenger, self.settings.monitoring.min_labelled_rows
        )
        raw["auc"] = pair
        started = state.step_started_at if state.step_started_at is not None else now
        canary = CanaryEvidence(
            requests=step_requests,
            errors=step_errors,
            p99_latency_ms=float(latency.get("p99", 0.0)),
            elapsed_s=max(now - started, 0.0),
            **auc_fields(pair),
        )
        counters = f"GET {self.base_url}/router/metrics (minus the step's first reading)"
        figures = {
            "requests": Figure(float(canary.requests), SOURCE, counters),
            "errors": Figure(float(canary.errors), SOURCE, counters),
            "p99_latency_ms": Figure(
                canary.p99_latency_ms, SOURCE, f"GET {self.base_url}/router/metrics latency_ms"
            ),
        }
        for name in ("champion_auc", "challenger_auc"):
            value = getattr(canary, name)
            if value is not None:
                figures[name] = Figure(value, "monitoring", f"{MONITORING}: performance.auc")
        return Evidence(SOURCE, canary=canary, figures=figures, raw=raw)
