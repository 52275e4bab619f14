"""Rollout figures from the warehouse: SQL over the landed ``ml.predictions`` and ``ml.feedback``.

Every serving process that mirrors (the ``churn serve`` router, and each Seldon predictor pod:
``serving.arm`` names its arm) sends each primary, canary and shadow answer to ``ml.predictions``,
and landing writes them to ``landed_predictions`` keyed by (request, arm, version). So:

* **Shadow pairs** are a join on ``request_id`` of the challenger's ``shadow`` rows with the
  champion's ``primary`` rows in the window (:data:`SHADOW_PAIRS_SQL`): agreement at the
  champion's decision threshold (the share of requests both versions decide alike) and the
  two-sample KS distance of the paired scores. Pairing needs both versions to see the same
  ``request_id``: the router gives its shadow the primary's; behind Seldon's shadow or mirror
  the caller's ``request_id`` is what both pods receive.
* **AUC** per version and arm (:data:`CANARY_PREDICTIONS_SQL`, :data:`FEEDBACK_SQL`): the
  champion's primary and the challenger's canary rows of the window joined to the feedback
  (:func:`~churn_assets.performance.join_outcomes`), realised where labels have arrived and the
  label-free estimate otherwise, picked as :func:`~churn_assets.evidence.auc.auc_pair` does.

Windows are ``[start, end]`` in epoch seconds on ``predicted_at``; every query is recorded with
its parameters beside the figure it produced.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import numpy as np

from churn_assets.evidence import Figure
from churn_assets.warehouse import ensure_schema

__all__ = [
    "CANARY_PREDICTIONS_SQL",
    "FEEDBACK_SQL",
    "SHADOW_PAIRS_SQL",
    "ShadowPairs",
    "WarehouseFigures",
]

SOURCE = "warehouse"

SHADOW_PAIRS_SQL = """
SELECT p.request_id, p.score AS champion_score, s.score AS challenger_score
FROM landed_predictions AS s
JOIN landed_predictions AS p
  ON p.request_id = s.request_id AND p.model_version = ? AND p.arm = 'primary'
     AND p.status = 'ok' AND p.score IS NOT NULL
WHERE s.model_version = ? AND s.arm = 'shadow' AND s.status = 'ok' AND s.score IS NOT NULL
  AND s.predicted_at BETWEEN to_timestamp(?) AND to_timestamp(?)
ORDER BY s.predicted_at, p.request_id
"""

CANARY_PREDICTIONS_SQL = """
SELECT request_id, customer_id, model_version, arm, score, status, predicted_at
FROM landed_predictions
WHERE predicted_at BETWEEN to_timestamp(?) AND to_timestamp(?)
  AND ((model_version = ? AND arm = 'primary') OR (model_version = ? AND arm = 'canary'))
"""

# Outcomes that can label a prediction of the window: after its start, known by its end.
FEEDBACK_SQL = """
SELECT customer_id, request_id, churned, outcome_time, observed_at
FROM landed_feedback
WHERE outcome_time > to_timestamp(?) AND observed_at <= to_timestamp(?)
"""


def _query(sql: str, params: list[Any]) -> str:
    """The SQL as recorded: one line, with its parameters."""
    return f"{' '.join(sql.split())} -- params {params}"


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


@dataclass(frozen=True)
class ShadowPairs:
    """Paired champion/challenger scores of the window and what they show."""

    pairs: int
    agreement_rate: float | None
    ks_statistic: float | None
    figures: dict[str, Figure]


class WarehouseFigures:
    """Computes the warehouse's rollout figures over one DuckDB connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection, horizon_days: int) -> None:
        self.con = con
        self.horizon_days = horizon_days

    def shadow_pairs(
        self, champion: str, challenger: str, threshold: float, start: float, end: float
    ) -> ShadowPairs:
        """Agreement (at ``threshold``) and score KS of the challenger's shadow answers against
        the champion's primary answers to the same requests in ``[start, end]``."""
        ensure_schema(self.con)
        params: list[Any] = [champion, challenger, start, end]
        rows = self.con.execute(SHADOW_PAIRS_SQL, params).fetchnumpy()
        query = _query(SHADOW_PAIRS_SQL, params)
        pairs = len(rows["request_id"])
        figures = {"shadow_requests": Figure(float(pairs), SOURCE, query)}
        if not pairs:
            return ShadowPairs(0, None, None, figures)
        from scipy.stats import ks_2samp

        champion_scores = np.asarray(rows["champion_score"], dtype=float)
        challenger_scores = np.asarray(rows["challenger_score"], dtype=float)
        agreement = float(
            np.mean((champion_scores >= threshold) == (challenger_scores >= threshold))
        )
        ks = float(ks_2samp(champion_scores, challenger_scores).statistic)
        figures["agreement_rate"] = Figure(
            agreement, SOURCE, f"{query}; share with (score >= {threshold:g}) equal on both"
        )
        figures["ks_statistic"] = Figure(
            ks, SOURCE, f"{query}; scipy.stats.ks_2samp(champion_score, challenger_score)"
        )
        return ShadowPairs(pairs, agreement, ks, figures)

    def canary_auc_rows(
        self, champion: str, challenger: str, start: float, end: float
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """AUC rows (``model_version``, ``arm``, ``kind``, ``roc_auc``, ``labelled``, ``rows``,
        ``positives``) of the champion's primary and the challenger's canary answers in
        ``[start, end]``, realised and estimated, and the queries behind them."""
        from churn_assets.performance import auc_rows, join_outcomes, performance_report

        ensure_schema(self.con)
        prediction_params: list[Any] = [start, end, champion, challenger]
        predictions = self.con.execute(CANARY_PREDICTIONS_SQL, prediction_params).df()
        feedback_params: list[Any] = [start, end]
        feedback = self.con.execute(FEEDBACK_SQL, feedback_params).df()
        queries = {
            "predictions": _query(CANARY_PREDICTIONS_SQL, prediction_params),
            "feedback": _query(FEEDBACK_SQL, feedback_params),
            "window": f"{_stamp(start)} .. {_stamp(end)}",
        }
        if predictions.empty:
            return [], queries
        joined = join_outcomes(
            predictions,
            feedback,
            horizon_days=self.horizon_days,
            as_of=datetime.fromtimestamp(end, UTC),
        )
        if joined.empty:
            return [], queries
        rows = auc_rows(performance_report(joined, period=None))
        return rows, queries
