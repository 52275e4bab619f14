"""Rollout evidence: what the rollout policy judges, from one source chosen by ``rollout.evidence``.

A source turns the state of a rollout into :class:`~churn_assets.rollout.ShadowEvidence` or
:class:`~churn_assets.rollout.CanaryEvidence`, and says where every figure came from:

* ``router`` (:class:`RouterEvidence`): the churn serving router's in-memory counters and shadow
  pairs (``GET /router/metrics``, ``/router/shadow-analysis`` at ``serving.url``) and the live
  AUC of the monitoring read model. Right for the embedded default, where one ``churn serve``
  process routes both versions.
* ``prometheus`` (:class:`PrometheusWarehouseEvidence`): error counts and latency per version and
  arm from PromQL over the metrics every serving process exports (``predictions_total``,
  ``prediction_latency_seconds``) at ``prometheus.url``, and agreement, score KS and AUC per
  version and arm from SQL over the landed ``ml.predictions`` and ``ml.feedback`` in the
  warehouse. Right wherever the versions run in separate processes (Seldon's predictors).

Every figure is a :class:`Figure` with the source and the exact query (PromQL, SQL or HTTP
request) behind it; the audit table records them beside the decision. A source that cannot be
reached raises :class:`EvidenceUnavailable`: the rollout then holds (it never promotes on missing
evidence) and resumes once the source answers again. A source that answers but has nothing yet
for the decision's window returns no evidence and says so in ``waiting`` (the rollout waits).

The window of every figure is the current phase or canary step: from the state's
``step_started_at`` (the decision that started it) to the decision's ``now``.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import duckdb

from churn_assets.config import Settings
from churn_assets.rollout import CanaryEvidence, RolloutState, ShadowEvidence

__all__ = [
    "Evidence",
    "EvidenceError",
    "EvidenceSource",
    "EvidenceUnavailable",
    "Figure",
    "evidence_source",
    "window_of",
]


class EvidenceError(RuntimeError):
    """The evidence cannot be computed from what the source answered (a bug or a bad setup)."""


class EvidenceUnavailable(EvidenceError):
    """The evidence source cannot be reached or did not answer in time; the rollout holds."""


@dataclass(frozen=True)
class Figure:
    """One input figure, the source that produced it and the query it came from."""

    value: float
    source: str
    query: str

    def record(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "query": self.query}


@dataclass(frozen=True)
class Evidence:
    """What a source found for one decision.

    ``figures`` are the inputs behind ``shadow`` / ``canary``; ``waiting`` says why there is no
    evidence yet (no data in the window); ``raw`` is anything else worth recording (router
    counters the next step's baseline reads, window bounds, row counts).
    """

    source: str
    shadow: ShadowEvidence | None = None
    canary: CanaryEvidence | None = None
    figures: Mapping[str, Figure] = field(default_factory=dict)
    waiting: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON-safe record kept in the audit table's ``evidence`` column."""
        return {
            **self.raw,
            "source": self.source,
            "figures": {name: figure.record() for name, figure in self.figures.items()},
            **({"waiting": list(self.waiting)} if self.waiting else {}),
        }

    def provenance(self) -> str:
        """One line naming, per source, the figures it gave (for a decision's reasons)."""
        by_source: dict[str, list[str]] = {}
        for name, figure in self.figures.items():
            by_source.setdefault(figure.source, []).append(name)
        parts = [f"{source}: {', '.join(names)}" for source, names in by_source.items()]
        return f"evidence from {self.source} ({'; '.join(parts) or 'no figures'})"


@runtime_checkable
class EvidenceSource(Protocol):
    """Something that turns a rollout's state into evidence for its next decision."""

    name: str

    def collect(self, state: RolloutState, baseline: Mapping[str, Any], now: float) -> Evidence:
        """Evidence for ``state``'s phase at ``now``; ``baseline`` is the evidence recorded by
        the decision that started the phase or step. Raises :class:`EvidenceUnavailable`."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts about the source (no secrets)."""
        ...


def window_of(state: RolloutState, now: float) -> tuple[float, float]:
    """``(start, end)`` in epoch seconds of the current phase or step up to ``now``."""
    start = state.step_started_at if state.step_started_at is not None else now
    return min(start, now), now


def evidence_source(settings: Settings, con: duckdb.DuckDBPyConnection) -> EvidenceSource:
    """The source ``rollout.evidence`` names; ``con`` is the warehouse (the ``prometheus``
    source reads the landed predictions and feedback through it)."""
    if settings.rollout.evidence == "router":
        from churn_assets.evidence.router import RouterEvidence

        return RouterEvidence(settings)
    from churn_assets.evidence.prometheus import PrometheusWarehouseEvidence

    return PrometheusWarehouseEvidence.from_settings(settings, con)
