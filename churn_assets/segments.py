"""Customer segments: risk tiers and observed churn by cohort (the ``customer_segments`` asset's
logic, Dagster-free so tests and notebooks build the same table)."""

import numpy as np
import pandas as pd

__all__ = ["COHORTS", "RISK_TIERS", "TENURE_BANDS", "risk_tier", "segment_table"]

RISK_TIERS = ((0.0, 0.05, "low"), (0.05, 0.15, "medium"), (0.15, 1.01, "high"))
TENURE_BANDS = ([-1, 5, 11, 23, 47, 10_000], ["0-5", "6-11", "12-23", "24-47", "48+"])
COHORTS = ("risk_tier", "contract_type", "tenure_band", "payment_method")


def risk_tier(probability: np.ndarray) -> np.ndarray:
    """``low`` / ``medium`` / ``high`` per churn probability (:data:`RISK_TIERS`)."""
    tiers = np.empty(len(probability), dtype=object)
    for low, high, name in RISK_TIERS:
        tiers[(probability >= low) & (probability < high)] = name
    return tiers


def segment_table(customers: pd.DataFrame, model_version: str | None) -> pd.DataFrame:
    """One row per cohort value of :data:`COHORTS`: customers, observed churn rate and mean
    predicted risk. ``customers`` has the features, ``risk`` (the model's probability) and
    ``churned`` (bool)."""
    missing = {"customer_id", "risk", "churned", "customer_tenure"} - set(customers.columns)
    if missing:
        raise ValueError(f"segment_table needs columns {sorted(missing)}")
    frame = customers.assign(
        risk_tier=risk_tier(customers["risk"].to_numpy()),
        tenure_band=pd.cut(
            customers["customer_tenure"], TENURE_BANDS[0], labels=TENURE_BANDS[1]
        ).astype(str),
    )
    parts = []
    for cohort in COHORTS:
        grouped = (
            frame.groupby(cohort)
            .agg(
                customers=("customer_id", "size"),
                observed_churn_rate=("churned", "mean"),
                mean_predicted_risk=("risk", "mean"),
            )
            .reset_index()
            .rename(columns={cohort: "cohort"})
        )
        parts.append(grouped.assign(cohort_type=cohort))
    return pd.concat(parts, ignore_index=True)[
        ["cohort_type", "cohort", "customers", "observed_churn_rate", "mean_predicted_risk"]
    ].assign(model_version=model_version)
