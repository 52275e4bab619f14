"""Customer segments: risk tiers and observed churn by cohort (the ``customer_segments`` asset's
logic, Dagster-free so tests and notebooks build the same table).

The cohorts come from the feature contract: the predicted risk tier, every category and boolean
feature, and bands of the contract's first integer feature (``<name>_band``), doubling in width
from the feature's minimum (0-5, 6-11, 12-23, 24-47, 48+ above a minimum of 0).
"""

import numpy as np
import pandas as pd

from churn_assets.contract import Contract, Feature
from churn_assets.schemas import DEFAULT_CONTRACT

__all__ = [
    "BAND_OFFSETS",
    "BAND_SUFFIX",
    "RISK_TIER",
    "RISK_TIERS",
    "band_feature",
    "cohort_types",
    "risk_tier",
    "segment_table",
    "with_cohorts",
]

RISK_TIER = "risk_tier"
RISK_TIERS = ((0.0, 0.05, "low"), (0.05, 0.15, "medium"), (0.15, 1.01, "high"))
# Upper ends of the bands above the banded feature's minimum; the last band is open.
BAND_OFFSETS = (5, 11, 23, 47)
BAND_SUFFIX = "_band"


def risk_tier(probability: np.ndarray) -> np.ndarray:
    """``low`` / ``medium`` / ``high`` per churn probability (:data:`RISK_TIERS`)."""
    tiers = np.empty(len(probability), dtype=object)
    for low, high, name in RISK_TIERS:
        tiers[(probability >= low) & (probability < high)] = name
    return tiers


def band_feature(contract: Contract) -> Feature | None:
    """The feature whose bands are a cohort: the contract's first integer feature, if any."""
    integers = contract.of_kind("integer")
    return integers[0] if integers else None


def cohort_types(contract: Contract) -> tuple[str, ...]:
    """The cohort types :func:`segment_table` publishes for ``contract``, in order."""
    banded = band_feature(contract)
    return (
        RISK_TIER,
        *(f.name for f in contract.of_kind("category", "boolean")),
        *((banded.name + BAND_SUFFIX,) if banded is not None else ()),
    )


def _bands(values: pd.Series, feature: Feature) -> pd.Series:
    low = int(feature.minimum or 0)
    uppers = [low + offset for offset in BAND_OFFSETS]
    lowers = [low, *(upper + 1 for upper in uppers)]
    labels = [f"{a}-{b}" for a, b in zip(lowers, uppers, strict=False)] + [f"{lowers[-1]}+"]
    edges = [-np.inf, *(upper + 0.5 for upper in uppers), np.inf]
    return pd.cut(values.astype(float), edges, labels=labels).astype(str)


def with_cohorts(customers: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """``customers`` (the contract's features and ``risk``, the model's probability) with a
    column per cohort type of :func:`cohort_types` that is not a feature already: the risk tier
    and the band of :func:`band_feature`."""
    frame = customers.assign(**{RISK_TIER: risk_tier(customers["risk"].to_numpy())})
    banded = band_feature(contract)
    if banded is not None:
        frame[banded.name + BAND_SUFFIX] = _bands(frame[banded.name], banded)
    return frame


def segment_table(
    customers: pd.DataFrame, model_version: str | None, contract: Contract | None = None
) -> pd.DataFrame:
    """One row per cohort value of :func:`cohort_types` (``contract``: the scoring model's,
    default the default contract): customers, observed churn rate and mean predicted risk.
    ``customers`` has the contract's features, ``risk`` (the model's probability) and
    ``churned`` (bool). Cohort values are text (a boolean's are ``True`` and ``False``)."""
    contract = DEFAULT_CONTRACT if contract is None else contract
    cohorts = cohort_types(contract)
    banded = band_feature(contract)
    needed = {"customer_id", "risk", "churned"} | {
        f.name for f in contract.of_kind("category", "boolean")
    }
    if banded is not None:
        needed.add(banded.name)
    missing = needed - set(customers.columns)
    if missing:
        raise ValueError(f"segment_table needs columns {sorted(missing)}")
    frame = with_cohorts(customers, contract)
    parts = []
    for cohort in cohorts:
        grouped = (
            frame.assign(cohort=frame[cohort].astype(str))
            .groupby("cohort")
            .agg(
                customers=("customer_id", "size"),
                observed_churn_rate=("churned", "mean"),
                mean_predicted_risk=("risk", "mean"),
            )
            .reset_index()
        )
        parts.append(grouped.assign(cohort_type=cohort))
    return pd.concat(parts, ignore_index=True)[
        ["cohort_type", "cohort", "customers", "observed_churn_rate", "mean_predicted_risk"]
    ].assign(model_version=model_version)
