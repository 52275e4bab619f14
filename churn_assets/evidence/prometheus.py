"""The ``prometheus`` evidence source: PromQL over the serving metrics, SQL over the warehouse.

Every serving process (the ``churn serve`` router and each Seldon predictor pod) exports
``predictions_total{version, arm, status}`` and the ``prediction_latency_seconds{version, arm}``
histogram; Prometheus scrapes them (job ``prometheus.job``: the ServiceMonitor's). Over the
decision's window ``W`` (the current phase or canary step, whole seconds, ending at the
decision's time):

================================  =============================================================
figure                            from
================================  =============================================================
canary ``requests``, ``errors``   ``sum by (status) (increase(predictions_total{job, version=
                                  challenger, arm="canary"}[W]))``, rounded
canary ``p99_latency_ms``         ``histogram_quantile(0.99, sum by (le) (increase(
                                  prediction_latency_seconds_bucket{..., arm="canary"}[W])))``
shadow ``shadow_errors``          as canary errors, ``arm="shadow"``
shadow ``latency_overhead_ms``    mean latency (``_sum`` / ``_count`` increases) of the
                                  challenger's shadow arm minus the champion's primary arm
agreement, score KS, shadow       the warehouse (:mod:`churn_assets.evidence.warehouse`)
requests, AUC per version/arm
================================  =============================================================

``increase()`` handles counter resets (a restarted pod) and extrapolates to the window's edges,
so counts are rounded; a series that is absent in the window ("no data yet": Prometheus has not
scraped the arm, or it served nothing) gives no evidence and the rollout waits. A version and
arm whose ``status="ok"`` series exists but which has no ``status="error"`` series has had no
errors: serving creates the error series at the first error (Seldon predictor pods, which know
their arm, create both at start). Prometheus unreachable, timing out or answering an HTTP error
raises :class:`~churn_assets.evidence.EvidenceUnavailable`: the rollout holds. Kafka
unreachable (or landing behind): nothing lands for the window, the warehouse figures are
missing, and the decision waits, saying how many answers Prometheus counted that have not landed.
"""

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import duckdb
import requests

from churn_assets.config import Settings
from churn_assets.evidence import (
    Evidence,
    EvidenceError,
    EvidenceUnavailable,
    Figure,
    window_of,
)
from churn_assets.evidence.auc import auc_fields, auc_pair
from churn_assets.evidence.warehouse import WarehouseFigures
from churn_assets.registry import ModelRegistry, RegistryError
from churn_assets.rollout import CanaryEvidence, Phase, RolloutState, ShadowEvidence

__all__ = ["PrometheusClient", "PrometheusWarehouseEvidence", "promql"]

log = logging.getLogger(__name__)

SOURCE = "prometheus+warehouse"
PROMETHEUS = "prometheus"

COUNTS = "sum by (status) (increase(predictions_total{{{selector}}}[{window}s]))"
P99 = (
    "histogram_quantile(0.99, sum by (le) "
    "(increase(prediction_latency_seconds_bucket{{{selector}}}[{window}s])))"
)
MEAN_LATENCY = (
    "sum(increase(prediction_latency_seconds_sum{{{selector}}}[{window}s])) / "
    "sum(increase(prediction_latency_seconds_count{{{selector}}}[{window}s]))"
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def promql(template: str, *, job: str, version: str, arm: str, window_s: int) -> str:
    """``template`` for one job, version and arm over the last ``window_s`` seconds."""
    selector = f'job="{_label(job)}", version="{_label(version)}", arm="{_label(arm)}"'
    return template.format(selector=selector, window=window_s)


class PrometheusClient:
    """Instant queries against Prometheus's HTTP API (``GET /api/v1/query``), with a timeout
    and bounded retries of failed connections."""

    def __init__(
        self, url: str, *, timeout_s: float = 5.0, retries: int = 2, backoff_s: float = 0.5
    ) -> None:
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise EvidenceError("timeout_s must be > 0, retries and backoff_s >= 0")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def query(self, expression: str, at: float) -> list[dict[str, Any]]:
        """The instant vector ``expression`` evaluates to at ``at`` (epoch seconds): a list of
        ``{"metric": {...}, "value": float}``; empty when no series matches."""
        endpoint = f"{self.url}/api/v1/query"
        params = {"query": expression, "time": f"{at:.3f}"}
        for attempt in range(self.retries + 1):
            try:
                response = requests.get(endpoint, params=params, timeout=self.timeout_s)
                break
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.retries:
                    raise EvidenceUnavailable(
                        f"Prometheus at {self.url} did not answer {expression!r} after "
                        f"{attempt + 1} attempt(s): {exc}"
                    ) from exc
                log.warning("Prometheus query failed (%s); retrying", exc)
                time.sleep(self.backoff_s * 2**attempt)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 400 and isinstance(body, dict):
            # A query Prometheus cannot parse or evaluate: a bug here, not an outage.
            raise EvidenceError(f"Prometheus refused {expression!r}: {body.get('error')}")
        if response.status_code != 200 or not isinstance(body, dict):
            raise EvidenceUnavailable(
                f"Prometheus at {self.url} answered HTTP {response.status_code} to "
                f"{expression!r}: {response.text[:300]}"
            )
        if body.get("status") != "success" or body["data"]["resultType"] != "vector":
            raise EvidenceError(f"Prometheus answered {expression!r} with {body!r:.300}")
        return [
            {"metric": item["metric"], "value": float(item["value"][1])}
            for item in body["data"]["result"]
        ]


class PrometheusWarehouseEvidence:
    """Evidence from Prometheus (counts, latency) and the warehouse (pairs, agreement, KS, AUC)."""

    name = SOURCE

    def __init__(
        self,
        client: PrometheusClient,
        warehouse: WarehouseFigures,
        *,
        job: str,
        registry: ModelRegistry,
        min_labelled_rows: int,
    ) -> None:
        self.client = client
        self.warehouse = warehouse
        self.job = job
        self.registry = registry
        self.min_labelled_rows = min_labelled_rows

    @classmethod
    def from_settings(
        cls, settings: Settings, con: duckdb.DuckDBPyConnection
    ) -> "PrometheusWarehouseEvidence":
        url = settings.prometheus.url
        if not url:
            raise EvidenceError("the prometheus evidence source needs prometheus.url")
        client = PrometheusClient(
            url, timeout_s=settings.prometheus.timeout_s, retries=settings.prometheus.retries
        )
        return cls(
            client,
            WarehouseFigures(con, settings.training.horizon_days),
            job=settings.prometheus.job,
            registry=ModelRegistry(settings.registry_dir),
            min_labelled_rows=settings.monitoring.min_labelled_rows,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": SOURCE,
            "prometheus": self.client.url,
            "job": self.job,
            "timeout_s": self.client.timeout_s,
        }

    # -- Prometheus figures ---------------------------------------------------------------------
    def _counts(
        self, version: str, arm: str, window_s: int, at: float
    ) -> tuple[dict[str, int] | None, str]:
        """Requests by status of one version and arm in the window; None when no series."""
        query = promql(COUNTS, job=self.job, version=version, arm=arm, window_s=window_s)
        result = self.client.query(query, at)
        if not result:
            return None, query
        counts: dict[str, int] = {}
        for item in result:
            status = item["metric"].get("status", "")
            value = item["value"]
            if not math.isfinite(value):
                raise EvidenceError(f"Prometheus answered {value} for {query!r}")
            counts[status] = counts.get(status, 0) + int(round(value))
        return counts, query

    def _scalar(
        self, template: str, version: str, arm: str, window_s: int, at: float
    ) -> tuple[float | None, str]:
        """A one-series expression's value, None when absent or NaN (nothing observed)."""
        query = promql(template, job=self.job, version=version, arm=arm, window_s=window_s)
        result = self.client.query(query, at)
        if len(result) > 1:
            raise EvidenceError(f"{query!r} gave {len(result)} series, expected one")
        value = result[0]["value"] if result else math.nan
        return (value if math.isfinite(value) else None), query

    # -- evidence -------------------------------------------------------------------------------
    def collect(self, state: RolloutState, baseline: Mapping[str, Any], now: float) -> Evidence:
        start, end = window_of(state, now)
        window_s = int(end - start)
        raw: dict[str, Any] = {
            **self.describe(),
            "window": {"start": start, "end": end, "seconds": window_s},
        }
        if state.challenger is None or state.phase not in (
            Phase.SHADOW,
            Phase.BLUE_GREEN_READY,
            Phase.CANARY,
        ):
            return Evidence(SOURCE, raw=raw)
        if window_s < 1:
            return Evidence(SOURCE, raw=raw, waiting=("the window is under a second old",))
        if state.phase is Phase.CANARY:
            return self._canary(state, start, end, window_s, raw)
        return self._shadow(state, start, end, window_s, raw)

    def _threshold(self, version: str) -> float:
        try:
            metrics = self.registry.get(version).metadata.get("metrics", {})
        except RegistryError as exc:
            raise EvidenceError(f"champion {version} is not in the registry: {exc}") from exc
        return float(metrics.get("test_threshold", 0.5))

    def _shadow(
        self, state: RolloutState, start: float, end: float, window_s: int, raw: dict[str, Any]
    ) -> Evidence:
        assert state.challenger is not None
        champion, challenger = state.champion, state.challenger
        counts, count_query = self._counts(challenger, "shadow", window_s, end)
        if counts is None:
            return Evidence(
                SOURCE,
                raw=raw,
                waiting=(f"Prometheus has no {challenger} shadow series yet: {count_query}",),
            )
        errors = counts.get("error", 0)
        shadow_mean, shadow_query = self._scalar(MEAN_LATENCY, challenger, "shadow", window_s, end)
        primary_mean, primary_query = self._scalar(MEAN_LATENCY, champion, "primary", window_s, end)
        pairs = self.warehouse.shadow_pairs(
            champion, challenger, self._threshold(champion), start, end
        )
        raw["prometheus_counts"] = counts
        figures = dict(pairs.figures)
        figures["shadow_errors"] = Figure(float(errors), PROMETHEUS, count_query)
        waiting = []
        if shadow_mean is None or primary_mean is None:
            waiting.append(f"Prometheus has no latency yet: {shadow_query}; {primary_query}")
        if not pairs.pairs:
            waiting.append(
                f"no shadow pairs landed in the window (ml.predictions) although Prometheus "
                f"counted {sum(counts.values())} {challenger} shadow answers: the mirror, Kafka "
                "or landing is behind"
            )
        if pairs.pairs and shadow_mean is not None and primary_mean is not None:
            overhead_ms = (shadow_mean - primary_mean) * 1000.0
            figures["latency_overhead_ms"] = Figure(
                overhead_ms, PROMETHEUS, f"({shadow_query}) - ({primary_query}), in ms"
            )
            assert pairs.agreement_rate is not None and pairs.ks_statistic is not None
            shadow = ShadowEvidence(
                requests=pairs.pairs,
                agreement_rate=pairs.agreement_rate,
                ks_statistic=pairs.ks_statistic,
                latency_overhead_ms=overhead_ms,
                errors=errors,
            )
            return Evidence(SOURCE, shadow=shadow, figures=figures, raw=raw)
        if errors and not pairs.pairs:
            # A challenger that fails every request leaves no pairs; its errors are judged on
            # any sample, and with no pairs (below any min_shadow_requests, which is >= 1) the
            # policy never reaches the placeholder agreement, KS and overhead.
            shadow = ShadowEvidence(
                requests=pairs.pairs,
                agreement_rate=0.0,
                ks_statistic=0.0,
                latency_overhead_ms=0.0,
                errors=errors,
            )
            raw["judged_on"] = "shadow scoring errors only (no pairs or latency yet)"
            return Evidence(SOURCE, shadow=shadow, figures=figures, raw=raw)
        return Evidence(SOURCE, figures=figures, waiting=tuple(waiting), raw=raw)

    def _canary(
        self, state: RolloutState, start: float, end: float, window_s: int, raw: dict[str, Any]
    ) -> Evidence:
        assert state.challenger is not None
        counts, count_query = self._counts(state.challenger, "canary", window_s, end)
        if counts is None:
            return Evidence(
                SOURCE,
                raw=raw,
                waiting=(f"Prometheus has no {state.challenger} canary series yet: {count_query}",),
            )
        requests_in_window = sum(counts.values())
        errors = counts.get("error", 0)
        p99_s, p99_query = self._scalar(P99, state.challenger, "canary", window_s, end)
        rows, queries = self.warehouse.canary_auc_rows(state.champion, state.challenger, start, end)
        pair = auc_pair(rows, state.champion, state.challenger, self.min_labelled_rows)
        raw["prometheus_counts"] = counts
        raw["auc"] = pair
        raw["auc_queries"] = queries
        figures = {
            "requests": Figure(float(requests_in_window), PROMETHEUS, count_query),
            "errors": Figure(float(errors), PROMETHEUS, count_query),
        }
        if p99_s is None:
            return Evidence(
                SOURCE,
                figures=figures,
                raw=raw,
                waiting=(f"Prometheus has no canary latency yet: {p99_query}",),
            )
        figures["p99_latency_ms"] = Figure(p99_s * 1000.0, PROMETHEUS, f"{p99_query} * 1000")
        waiting = []
        if not rows:
            waiting.append(
                f"no canary predictions landed in the window (ml.predictions) although "
                f"Prometheus counted {requests_in_window}: the mirror, Kafka or landing is behind"
            )
        fields = auc_fields(pair)
        auc_query = f"{queries['predictions']}; {queries['feedback']}; {pair.get('kind')} AUC"
        for name in ("champion_auc", "challenger_auc"):
            if fields[name] is not None:
                figures[name] = Figure(fields[name], "warehouse", auc_query)
        canary = CanaryEvidence(
            requests=requests_in_window,
            errors=min(errors, requests_in_window),
            p99_latency_ms=p99_s * 1000.0,
            elapsed_s=end - start,
            **fields,
        )
        return Evidence(SOURCE, canary=canary, figures=figures, waiting=tuple(waiting), raw=raw)
