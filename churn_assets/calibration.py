"""Predicted against realised churn over the model's horizon, by score decile and by segment
(the ``calibration`` asset's logic and read model, Dagster-free).

Like with like: both rates are about the same customers, the same scoring time and the same
horizon. The scoring rows are the training set's newest fully labelled test rows
(:func:`scoring_rows`): each customer's features as of the scoring time ``t`` and its label,
churn within ``(t, t + horizon]`` (``churn_assets/training.py``), for the customers whose
horizon has fully elapsed (known to be still a customer after ``t + horizon``) or who churned
within it. ``predicted_rate`` is the mean of the model's churn probabilities over the horizon,
``observed_rate`` the share that churned within it.

``tolerance`` is the band within which a calibrated model's observed rate falls: the half-width
of a 95 % interval of the group's observed rate under the model's own probabilities (the
Poisson-binomial variance ``sum p (1 - p) / n²``, normal approximation), simultaneous across the
groups of one grouping (Bonferroni: ten deciles are ten chances to miss), plus the model's
expected calibration error on its holdout.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from churn_assets.contract import Contract
from churn_assets.segments import cohort_types, with_cohorts
from churn_assets.training import GROUPED_SPLIT

__all__ = [
    "CALIBRATION_COLUMNS",
    "CONFIDENCE",
    "DECILE",
    "DECILES",
    "SEGMENT",
    "CalibrationError",
    "calibration_table",
    "scoring_rows",
    "segment_label",
]

DECILE = "decile"
SEGMENT = "segment"
DECILES = 10
CONFIDENCE = 0.95
# The read model's columns, in order, with their DuckDB types (a contract with the dashboard).
CALIBRATION_COLUMNS = {
    "grouping": "VARCHAR",
    "group_label": "VARCHAR",
    "customers": "BIGINT",
    "predicted_rate": "DOUBLE",
    "observed_rate": "DOUBLE",
    "tolerance": "DOUBLE",
    "horizon_days": "INTEGER",
    "model_version": "VARCHAR",
}
_DTYPES: Mapping[str, Any] = {
    "grouping": object,
    "group_label": object,
    "customers": "int64",
    "predicted_rate": "float64",
    "observed_rate": "float64",
    "tolerance": "float64",
    "horizon_days": "int32",
    "model_version": object,
}


class CalibrationError(ValueError):
    """The rows cannot give a calibration table (the message says why)."""


def segment_label(cohort_type: str, cohort: str) -> str:
    """A segment's ``group_label``: ``<cohort type>=<value>``, e.g. ``risk_tier=high``, a
    category feature's ``<feature>=<value>`` or a band's ``<feature>_band=0-5``."""
    return f"{cohort_type}={cohort}"


def scoring_rows(training_frame: pd.DataFrame) -> pd.DataFrame:
    """The rows a calibration table is computed on: of a stored training set (the
    ``training_set`` asset's table), the test rows of its newest snapshot for a time split (each
    customer once, at the newest time whose horizon and label grace have fully elapsed), all its
    test rows for a split by customer (snapshot data: each customer at its observation time)."""
    test = training_frame.loc[training_frame["split"] == "test"]
    if test.empty:
        raise CalibrationError("the training set has no test rows to score")
    grouped = "split_method" in test.columns and test["split_method"].iloc[0] == GROUPED_SPLIT
    if grouped:
        return test.reset_index(drop=True)
    return test.loc[test["snapshot_time"] == test["snapshot_time"].max()].reset_index(drop=True)


def calibration_table(
    rows: pd.DataFrame,
    risk: np.ndarray,
    *,
    contract: Contract,
    model_version: str,
    horizon_days: int,
    calibration_error: float,
) -> pd.DataFrame:
    """One row per score decile (``1`` lowest predicted risk .. ``10`` highest, equal counts)
    and per segment (:func:`churn_assets.segments.cohort_types` of ``contract``, labelled by
    :func:`segment_label`), with the columns of :data:`CALIBRATION_COLUMNS`.

    ``rows`` has ``customer_id``, ``label`` (1 churned within the horizon, 0 not) and the
    contract's features; ``risk`` the model's churn probability over ``horizon_days`` for each
    row; ``calibration_error`` is added to every tolerance (see the module docstring).
    """
    risk = np.asarray(risk, dtype=float)
    if len(rows) == 0:
        raise CalibrationError("no scored rows: nothing to compare")
    if len(risk) != len(rows):
        raise CalibrationError(f"{len(risk)} probabilities for {len(rows)} rows")
    if not np.all((risk >= 0) & (risk <= 1)):
        raise CalibrationError("probabilities must lie in [0, 1]")
    labels = rows["label"].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise CalibrationError("labels must be 0 or 1 (censored rows have no place here)")
    if not (np.isfinite(calibration_error) and calibration_error >= 0):
        raise CalibrationError(f"calibration_error must be >= 0, got {calibration_error!r}")

    order = np.argsort(risk, kind="stable")
    deciles = [chunk for chunk in np.array_split(order, DECILES) if len(chunk)]
    groups: list[tuple[str, str, np.ndarray]] = [
        (DECILE, str(i), chunk) for i, chunk in enumerate(deciles, start=1)
    ]
    frame = with_cohorts(rows.assign(risk=risk).reset_index(drop=True), contract)
    for cohort_type in cohort_types(contract):
        values = frame[cohort_type].astype(str)
        for value, index in values.groupby(values, sort=True).groups.items():
            groups.append((SEGMENT, segment_label(cohort_type, str(value)), np.asarray(index)))

    counts = {DECILE: 0, SEGMENT: 0}
    for grouping, _, _ in groups:
        counts[grouping] += 1
    records = []
    for grouping, label, index in groups:
        p, y = risk[index], labels[index]
        # Two-sided, simultaneous over the grouping's groups.
        z = float(norm.ppf(1 - (1 - CONFIDENCE) / (2 * counts[grouping])))
        spread = float(np.sqrt(np.sum(p * (1 - p)))) / len(index)
        records.append(
            {
                "grouping": grouping,
                "group_label": label,
                "customers": len(index),
                "predicted_rate": float(p.mean()),
                "observed_rate": float(y.mean()),
                "tolerance": z * spread + float(calibration_error),
                "horizon_days": horizon_days,
                "model_version": model_version,
            }
        )
    table = pd.DataFrame.from_records(records, columns=list(CALIBRATION_COLUMNS))
    return table.astype(_DTYPES)
