"""The serving plane's reports: latency percentiles and the primary-vs-shadow comparison
(``/router/metrics``, ``/router/shadow``, the rollout's shadow gate)."""

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["percentiles", "shadow_report"]


def shadow_report(
    pairs: Sequence[dict[str, Any]], errors: int, version: str | None = None
) -> dict[str, Any]:
    """Primary-vs-shadow comparison over ``pairs`` (one per shadowed record: both scores,
    agreement at the champion's threshold, both latencies), with ``errors`` failed shadow
    scorings; ``version`` only names the shadow version asked about."""
    if not pairs:
        return {
            "pairs": 0,
            "errors": errors,
            "message": "no shadow traffic yet (strategy must be 'shadow' "
            "with a challenger loaded)" + (f" for {version}" if version is not None else ""),
        }
    primary = np.array([p["primary"] for p in pairs])
    shadow = np.array([p["shadow"] for p in pairs])
    from scipy.stats import ks_2samp

    ks = ks_2samp(primary, shadow)
    return {
        "pairs": len(pairs),
        "errors": errors,
        "primary_version": pairs[-1]["primary_version"],
        "shadow_version": pairs[-1]["shadow_version"],
        "agreement_rate": float(np.mean([p["agree"] for p in pairs])),
        "latency_overhead_ms": float(
            np.mean([p["shadow_latency_ms"] - p["primary_latency_ms"] for p in pairs])
        ),
        "mean_abs_score_difference": float(np.mean(np.abs(primary - shadow))),
        "mean_primary_score": float(primary.mean()),
        "mean_shadow_score": float(shadow.mean()),
        "ks_statistic": float(ks.statistic),
        "ks_p_value": float(ks.pvalue),
        "primary_latency_ms": percentiles([p["primary_latency_ms"] for p in pairs]),
        "shadow_latency_ms": percentiles([p["shadow_latency_ms"] for p in pairs]),
    }


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "count": len(ordered),
        "p50": float(np.percentile(ordered, 50)),
        "p99": float(np.percentile(ordered, 99)),
        "mean": float(statistics.fmean(ordered)),
    }
