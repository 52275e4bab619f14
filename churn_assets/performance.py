"""Realised and estimated (label-free) model performance from landed predictions and feedback.

Three steps, all Dagster-free:

1. :func:`join_outcomes` labels each scored prediction the way training labels a snapshot: 1 when
   the customer churned in ``(predicted_at, predicted_at + horizon]``, 0 when it is known to have
   still been a customer after ``predicted_at + horizon``, pending (NaN) otherwise. Labels arrive
   late: a churn is known a few days after it happens, a non-churn only once the horizon is over,
   so recent windows are pending and, until they mature, over-represent churners.
2. :func:`realised_performance` scores the labelled rows per group and period (ROC-AUC, precision
   and recall at a threshold, calibration error, observed rate).
3. :func:`estimated_performance` estimates the same figures over *all* rows without labels,
   CBPE-style: assuming the scores are calibrated probabilities, each row is a positive with
   probability ``p``, and the expected confusion counts and the expected ROC-AUC follow exactly
   from the scores (:func:`expected_roc_auc`). When a labelled reference is at hand (the model's
   test set), ``calibration=(scores, labels)`` first maps scores through an isotonic regression
   fitted on it, so a model whose scores are monotone but miscalibrated can still be estimated.

**Tolerance.** On calibrated scores with at least 5,000 labelled rows per group (about 10 %
positives), the estimate tracks the realised figures within 0.03 ROC-AUC and 0.05 precision and
recall at a threshold that flags some 700 rows or more per group (0.3 on simulated customers;
``tests/unit/test_performance.py`` checks exactly this). The gaps are the sampling noise of the
realised figures: over ten seeds of 6,000 rows per group the worst were 0.013 AUC, 0.046
precision and 0.033 recall at 0.3, and 0.065 precision at 0.5, where only ~300 rows are flagged,
so judge precision on few flagged rows with care. The estimate
only sees the scores: under concept drift (outcomes no longer follow the scores) it stays high
while the realised AUC falls, which is why realised performance takes over once enough labels
have arrived (:func:`performance_alerts`).

Undefined figures are NaN, never 0.0: a group whose labelled rows hold one class only has a NaN
ROC-AUC and says why in ``auc_reason``; precision is NaN when nothing is flagged, recall when
there are no positives.
"""

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

from churn_assets.training import expected_calibration_error

__all__ = [
    "FEEDBACK_COLUMNS",
    "PERFORMANCE_COLUMNS",
    "PREDICTION_COLUMNS",
    "auc_rows",
    "estimated_performance",
    "expected_roc_auc",
    "fit_calibration",
    "join_outcomes",
    "performance_alerts",
    "performance_report",
    "realised_performance",
]

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("request_id", "customer_id", "score", "status", "predicted_at")
FEEDBACK_COLUMNS = ("customer_id", "request_id", "churned", "outcome_time", "observed_at")
METRIC_COLUMNS = (
    "rows",
    "labelled",
    "positives",
    "roc_auc",
    "auc_reason",
    "precision",
    "recall",
    "calibration_error",
    "mean_score",
    "observed_rate",
    "flagged_rate",
    "threshold",
)
PERFORMANCE_COLUMNS = ("kind", "period", *METRIC_COLUMNS)
OVERALL = "all"


# -- the label join ---------------------------------------------------------------------------


def _utc_timestamp(value: datetime | pd.Timestamp) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)


def _utc(column: pd.Series) -> pd.Series:
    """A timestamp column as nanosecond UTC, so merges never trip over units or zones."""
    return pd.to_datetime(column, utc=True).dt.as_unit("ns")


def _require(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{name} lacks the columns {missing}; it has {list(frame.columns)}")


def _has_request_id(column: pd.Series) -> np.ndarray:
    ids = column.astype("string")
    return (ids.notna() & ids.str.len().gt(0)).fillna(False).to_numpy(dtype=bool)


def _request_labels(predictions: pd.DataFrame, tagged: pd.DataFrame) -> pd.Series:
    """Labels from feedback that names its request: it labels every row of that request only."""
    label = pd.Series(np.nan, index=predictions.index)
    if tagged.empty or predictions.empty:
        return label
    left = pd.DataFrame(
        {
            "row": predictions.index,
            "request_id": predictions["request_id"].astype(str).to_numpy(),
            "start": predictions["predicted_at"].to_numpy(),
            "end": predictions["horizon_end"].to_numpy(),
        }
    )
    right = pd.DataFrame(
        {
            "request_id": tagged["request_id"].astype(str).to_numpy(),
            "churned": tagged["churned"].astype(bool).to_numpy(),
            "outcome_time": tagged["outcome_time"].to_numpy(),
        }
    )
    pairs = left.merge(right, on="request_id", how="inner")
    if pairs.empty:
        return label
    inside = (pairs["outcome_time"] > pairs["start"]) & (pairs["outcome_time"] <= pairs["end"])
    pairs["positive"] = pairs["churned"] & inside
    # An outcome (churn or not) after the horizon means the customer was still there at its end.
    pairs["alive_after"] = pairs["outcome_time"] > pairs["end"]
    flags = pairs.groupby("row")[["positive", "alive_after"]].any()
    decided = np.where(flags["positive"], 1.0, np.where(flags["alive_after"], 0.0, np.nan))
    label.loc[flags.index] = decided
    return label


def _customer_labels(predictions: pd.DataFrame, untagged: pd.DataFrame) -> pd.Series:
    """Labels from feedback without a request id, matched by customer and time."""
    label = pd.Series(np.nan, index=predictions.index)
    known = predictions.loc[predictions["customer_id"].notna()]
    if untagged.empty or known.empty:
        return label
    left = pd.DataFrame(
        {
            "row": known.index,
            "customer_id": known["customer_id"].astype(str).to_numpy(),
            "predicted_at": known["predicted_at"].to_numpy(),
            "horizon_end": known["horizon_end"].to_numpy(),
        }
    ).sort_values("predicted_at", kind="stable")
    feedback = pd.DataFrame(
        {
            "customer_id": untagged["customer_id"].astype(str).to_numpy(),
            "churned": untagged["churned"].astype(bool).to_numpy(),
            "outcome_time": untagged["outcome_time"].to_numpy(),
        }
    )
    churns = (
        feedback.loc[feedback["churned"], ["customer_id", "outcome_time"]]
        .rename(columns={"outcome_time": "next_churn"})
        .sort_values("next_churn", kind="stable")
    )
    # The first churn strictly after the prediction decides whether it fell inside the horizon.
    matched = pd.merge_asof(
        left,
        churns,
        left_on="predicted_at",
        right_on="next_churn",
        by="customer_id",
        direction="forward",
        allow_exact_matches=False,
    )
    last_outcome = feedback.groupby("customer_id")["outcome_time"].max()
    positive = (matched["next_churn"] <= matched["horizon_end"]).to_numpy()
    alive_after = (matched["customer_id"].map(last_outcome) > matched["horizon_end"]).to_numpy()
    label.loc[matched["row"].to_numpy()] = np.where(
        positive, 1.0, np.where(alive_after, 0.0, np.nan)
    )
    return label


def join_outcomes(
    predictions: pd.DataFrame,
    feedback: pd.DataFrame,
    *,
    horizon_days: int,
    as_of: datetime,
) -> pd.DataFrame:
    """Scored predictions with the label known at ``as_of``: 1, 0 or pending (NaN).

    ``predictions`` and ``feedback`` have the columns of ``landed_predictions`` and
    ``landed_feedback`` (at least :data:`PREDICTION_COLUMNS` and :data:`FEEDBACK_COLUMNS`).
    Only ``status == "ok"`` rows with a score made at or before ``as_of`` are kept, and only
    feedback observed (and whose outcome happened) at or before ``as_of`` counts.

    A prediction at ``t`` with horizon end ``e = t + horizon_days`` is labelled

    * 1 when a churn outcome happened in ``(t, e]``;
    * 0 when an outcome after ``e`` shows the customer was still there at ``e``: a non-churn
      outcome, or a churn that happened only after the horizon;
    * pending otherwise, so every prediction whose horizon is still open at ``as_of`` stays
      pending until a churn is reported.

    Feedback that carries a ``request_id`` labels the rows of that request only (primary and
    shadow rows share it) and wins over customer matching; where it decides nothing, customer
    matching applies. Feedback without one is matched by ``customer_id`` and time.

    Returns the kept prediction rows (input order, fresh index) plus ``horizon_end``, ``label``
    (float, NaN = pending), ``labelled`` (bool) and ``label_source`` ("request", "customer" or
    None while pending).
    """
    if horizon_days < 1:
        raise ValueError(f"horizon_days must be at least 1, got {horizon_days}")
    _require(predictions, PREDICTION_COLUMNS, "predictions")
    _require(feedback, FEEDBACK_COLUMNS, "feedback")
    cutoff = _utc_timestamp(as_of)

    scored = predictions.loc[(predictions["status"] == "ok") & predictions["score"].notna()].copy()
    scored["predicted_at"] = _utc(scored["predicted_at"])
    scored = scored.loc[scored["predicted_at"] <= cutoff].reset_index(drop=True)
    scored["score"] = scored["score"].astype(float)
    scored["horizon_end"] = scored["predicted_at"] + pd.Timedelta(days=horizon_days)

    known = feedback.copy()
    known["outcome_time"] = _utc(known["outcome_time"])
    known["observed_at"] = _utc(known["observed_at"])
    known = known.loc[(known["observed_at"] <= cutoff) & (known["outcome_time"] <= cutoff)]
    tagged = _has_request_id(known["request_id"])

    by_request = _request_labels(scored, known.loc[tagged])
    by_customer = _customer_labels(scored, known.loc[~tagged])
    from_request = by_request.notna().to_numpy()
    label = np.where(from_request, by_request.to_numpy(), by_customer.to_numpy())
    scored["label"] = label.astype(float)
    scored["labelled"] = ~np.isnan(label)
    label_source = np.full(len(scored), None, dtype=object)
    label_source[by_customer.notna().to_numpy()] = "customer"
    label_source[from_request] = "request"
    scored["label_source"] = label_source
    log.debug(
        "joined %d predictions as of %s: %d labelled", len(scored), cutoff, scored["labelled"].sum()
    )
    return scored


# -- grouping -----------------------------------------------------------------------------------


def _groups(
    joined: pd.DataFrame, by: Sequence[str], period: str | None
) -> Iterator[tuple[dict[str, Any], str, pd.DataFrame]]:
    """(group keys, period label, rows) per group and period, then the group's "all" row."""
    by = list(by)
    _require(joined, [*by, "score", "label", "labelled", "predicted_at"], "joined")
    frame = joined
    if period is not None:
        stamps = _utc(frame["predicted_at"]).dt.tz_localize(None)
        frame = frame.assign(_period=stamps.dt.to_period(period).astype(str).to_numpy())
    grouped = frame.groupby(by, dropna=False, sort=True) if by else [((), frame)]
    for keys, part in grouped:
        values = keys if isinstance(keys, tuple) else (keys,)
        group = dict(zip(by, values, strict=True))
        if period is not None:
            for label, rows in part.groupby("_period", sort=True):
                yield group, str(label), rows
        yield group, OVERALL, part


def _frame(records: list[dict[str, Any]], by: Sequence[str]) -> pd.DataFrame:
    columns = [*by, *PERFORMANCE_COLUMNS]
    frame = pd.DataFrame.from_records(records, columns=columns)
    for column in METRIC_COLUMNS:
        if column == "auc_reason":
            frame[column] = frame[column].astype(object)
        elif column in ("rows", "labelled"):
            frame[column] = frame[column].astype("int64")
        else:
            frame[column] = frame[column].astype(float)
    return frame


# -- realised -----------------------------------------------------------------------------------


def _realised(part: pd.DataFrame, threshold: float) -> dict[str, Any]:
    labelled = part.loc[part["labelled"].astype(bool)]
    y = labelled["label"].to_numpy(dtype=float).astype(int)
    s = labelled["score"].to_numpy(dtype=float)
    n = len(y)
    positives = int(y.sum())
    negatives = n - positives
    auc, reason = np.nan, None
    if n == 0:
        reason = "no labelled rows"
    elif positives == 0 or negatives == 0:
        reason = f"one class only: {positives} positives, {negatives} negatives labelled"
    else:
        auc = float(roc_auc_score(y, s))
    flagged = s >= threshold
    true_positives = int(np.sum(flagged & (y == 1)))
    return {
        "rows": len(part),
        "labelled": n,
        "positives": positives,
        "roc_auc": auc,
        "auc_reason": reason,
        "precision": true_positives / flagged.sum() if flagged.any() else np.nan,
        "recall": true_positives / positives if positives else np.nan,
        "calibration_error": expected_calibration_error(y, s) if n else np.nan,
        "mean_score": float(s.mean()) if n else np.nan,
        "observed_rate": positives / n if n else np.nan,
        "flagged_rate": float(flagged.mean()) if n else np.nan,
        "threshold": threshold,
    }


def realised_performance(
    joined: pd.DataFrame,
    *,
    threshold: float = 0.5,
    by: tuple[str, ...] = ("model_version", "arm"),
    period: str | None = "D",
) -> pd.DataFrame:
    """Performance on the labelled rows of :func:`join_outcomes`' output, per group and period.

    One row per ``by`` group and pandas period of ``predicted_at`` (UTC; ``"D"``, ``"W"``,
    ``"M"``...), plus an overall row per group with ``period == "all"``; ``period=None`` gives the
    overall rows only. Columns: the ``by`` keys, ``kind`` ("realised"), ``period``, ``rows`` (all
    scored rows), ``labelled``, ``positives``, ``roc_auc`` (NaN with ``auc_reason`` when one class
    or none is labelled), ``precision`` and ``recall`` of ``score >= threshold``,
    ``calibration_error`` (ECE, as in training), ``mean_score`` and ``observed_rate`` over the
    labelled rows, ``flagged_rate`` and ``threshold``. Recent periods are biased towards churners
    until their labels mature (churns are reported before non-churns can be).
    """
    records = [
        {**group, "kind": "realised", "period": label, **_realised(rows, threshold)}
        for group, label, rows in _groups(joined, by, period)
    ]
    return _frame(records, by)


# -- estimated ----------------------------------------------------------------------------------


def expected_roc_auc(scores: np.ndarray, probabilities: np.ndarray | None = None) -> float:
    """Expected ROC-AUC of ``scores`` when row ``i`` is a positive with probability ``p_i``.

    ``sum_ij p_i (1 - p_j) [s_i > s_j] (ties count half) / (sum p * sum (1 - p) - sum p (1 - p))``
    over pairs ``i != j``: the ratio of expected correctly ordered positive-negative pairs to
    expected pairs, exact in the limit of many rows, in O(n log n). ``probabilities`` defaults to
    the scores (calibrated scores), where it equals the simulator's ``expected_best_auc``.
    Raises ValueError when no positive-negative pair can be expected (all ``p`` in one class).
    """
    s = np.asarray(scores, dtype=float)
    p = s if probabilities is None else np.asarray(probabilities, dtype=float)
    if s.shape != p.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and probabilities {p.shape} must be equal 1-D shapes")
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(s)):
        raise ValueError("probabilities must lie in [0, 1] and scores must be finite")
    q = 1.0 - p
    pairs = p.sum() * q.sum() - np.sum(p * q)
    if len(s) < 2 or pairs <= 1e-12:
        raise ValueError(f"no positive-negative pairs expected among {len(s)} rows")
    order = np.argsort(s, kind="stable")
    s, p, q = s[order], p[order], q[order]
    cum_q = np.concatenate([[0.0], np.cumsum(q)])
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    lower_q = np.repeat(cum_q[first], counts)
    tie_q = np.repeat(cum_q[first + counts] - cum_q[first], counts)
    ordered = np.sum(p * (lower_q + 0.5 * (tie_q - q)))
    return float(ordered / pairs)


def fit_calibration(scores: np.ndarray, labels: np.ndarray) -> IsotonicRegression:
    """Isotonic map from scores to probabilities, fitted on a labelled reference set."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=float)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"calibration scores {s.shape} and labels {y.shape} must match")
    if not np.isin(y, (0.0, 1.0)).all() or len(np.unique(y)) < 2:
        raise ValueError("calibration labels must be 0/1 and hold both classes")
    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    return model.fit(s, y)


def _estimated(part: pd.DataFrame, threshold: float) -> dict[str, Any]:
    s = part["score"].to_numpy(dtype=float)
    p = part["_probability"].to_numpy(dtype=float)
    n = len(s)
    auc, reason = np.nan, None
    if n == 0:
        reason = "no rows"
    else:
        try:
            auc = expected_roc_auc(s, p)
        except ValueError as exc:
            reason = str(exc)
    flagged = s >= threshold
    expected_tp = float(p[flagged].sum())
    expected_positives = float(p.sum())
    return {
        "rows": n,
        "labelled": int(part["labelled"].astype(bool).sum()),
        "positives": expected_positives,
        "roc_auc": auc,
        "auc_reason": reason,
        "precision": expected_tp / flagged.sum() if flagged.any() else np.nan,
        "recall": expected_tp / expected_positives if expected_positives > 0 else np.nan,
        # Assumed, not estimated: the estimate rests on calibrated probabilities.
        "calibration_error": np.nan,
        "mean_score": float(s.mean()) if n else np.nan,
        "observed_rate": expected_positives / n if n else np.nan,
        "flagged_rate": float(flagged.mean()) if n else np.nan,
        "threshold": threshold,
    }


def estimated_performance(
    joined: pd.DataFrame,
    *,
    threshold: float = 0.5,
    by: tuple[str, ...] = ("model_version", "arm"),
    period: str | None = "D",
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Label-free performance estimate over all scored rows, labelled or not (CBPE-style).

    Treats each row as a positive with probability ``p`` (the score, or the isotonic map of the
    score fitted on ``calibration=(reference_scores, reference_labels)``, e.g. the model's test
    holdout) and reports expectations: ``roc_auc`` from :func:`expected_roc_auc` (ranking by the
    raw score), ``precision = sum(p | s >= t) / #(s >= t)``, ``recall = sum(p | s >= t) / sum(p)``,
    ``positives = sum(p)`` and ``observed_rate = mean(p)`` (the expected churn rate).
    ``calibration_error`` is NaN (calibration is the assumption, not a result); ``labelled``
    counts the rows that already have a label, for context. Same columns and grouping as
    :func:`realised_performance`, with ``kind == "estimated"``.
    """
    frame = joined.copy()
    scores = frame["score"].to_numpy(dtype=float)
    if calibration is not None:
        frame["_probability"] = fit_calibration(*calibration).predict(scores)
    else:
        frame["_probability"] = scores
    records = [
        {**group, "kind": "estimated", "period": label, **_estimated(rows, threshold)}
        for group, label, rows in _groups(frame, by, period)
    ]
    return _frame(records, by)


def performance_report(
    joined: pd.DataFrame,
    *,
    threshold: float = 0.5,
    by: tuple[str, ...] = ("model_version", "arm"),
    period: str | None = "D",
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Realised and estimated performance stacked in one frame (``kind`` tells them apart)."""
    realised = realised_performance(joined, threshold=threshold, by=by, period=period)
    estimated = estimated_performance(
        joined, threshold=threshold, by=by, period=period, calibration=calibration
    )
    return pd.concat([realised, estimated], ignore_index=True)


def auc_rows(report: pd.DataFrame) -> list[dict[str, Any]]:
    """The overall (period "all") ROC-AUC rows of a :func:`performance_report` by version and
    arm, JSON-safe: ``model_version``, ``arm``, ``kind``, ``roc_auc`` (None when undefined),
    ``labelled``, ``rows``, ``positives``."""
    overall = report.loc[report["period"].astype(str) == OVERALL]
    return [
        {
            "model_version": r["model_version"],
            "arm": r["arm"],
            "kind": r["kind"],
            "roc_auc": None if pd.isna(r["roc_auc"]) else float(r["roc_auc"]),
            "labelled": int(r.get("labelled", 0) or 0),
            "rows": int(r.get("rows", 0) or 0),
            "positives": None if pd.isna(r.get("positives")) else float(r["positives"]),
        }
        for r in overall.to_dict("records")
    ]


# -- alerts -------------------------------------------------------------------------------------


def performance_alerts(
    frame: pd.DataFrame,
    performance_threshold: float,
    *,
    min_labelled: int = 200,
    by: tuple[str, ...] = ("model_version", "arm"),
) -> list[dict[str, Any]]:
    """Groups whose overall ROC-AUC is below ``performance_threshold``.

    ``frame`` is :func:`performance_report`'s output (or either half of it). Per group the
    overall (``period == "all"``) realised AUC is judged when at least ``min_labelled`` rows are
    labelled and it is defined; otherwise the estimated AUC. A group with neither is not judged.
    Each alert holds the group keys, ``kind`` (which AUC was judged), ``roc_auc``,
    ``threshold``, ``labelled``, ``rows``, both AUCs where known, and a ``message``.
    """
    _require(frame, [*by, "kind", "period", "roc_auc", "labelled", "rows"], "frame")
    overall = frame.loc[frame["period"] == OVERALL]
    alerts: list[dict[str, Any]] = []
    for keys, part in overall.groupby(list(by), dropna=False, sort=True):
        values = keys if isinstance(keys, tuple) else (keys,)
        group = dict(zip(by, values, strict=True))
        rows = {kind: row for kind, row in zip(part["kind"], part.to_dict("records"), strict=True)}
        realised, estimated = rows.get("realised"), rows.get("estimated")
        if (
            realised is not None
            and realised["labelled"] >= min_labelled
            and not np.isnan(realised["roc_auc"])
        ):
            judged, kind = realised, "realised"
        elif estimated is not None and not np.isnan(estimated["roc_auc"]):
            judged, kind = estimated, "estimated"
        else:
            log.info("performance of %s not judged: no usable AUC", group)
            continue
        auc = float(judged["roc_auc"])
        if auc >= performance_threshold:
            continue
        labelled = int(judged["labelled"])
        alerts.append(
            {
                **group,
                "kind": kind,
                "roc_auc": auc,
                "threshold": float(performance_threshold),
                "labelled": labelled,
                "rows": int(judged["rows"]),
                "realised_roc_auc": float(realised["roc_auc"]) if realised else np.nan,
                "estimated_roc_auc": float(estimated["roc_auc"]) if estimated else np.nan,
                "message": (
                    f"{kind} ROC-AUC {auc:.3f} of {group} is below {performance_threshold:.3f} "
                    f"({labelled} labelled of {int(judged['rows'])} rows)"
                ),
            }
        )
    return alerts
