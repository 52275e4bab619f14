"""The calibration table: predicted against realised churn over the horizon, by decile and by
segment, and the band a calibrated model stays within."""

import numpy as np
import pandas as pd
import pytest

from churn_assets.calibration import (
    CALIBRATION_COLUMNS,
    DECILE,
    SEGMENT,
    CalibrationError,
    calibration_table,
    scoring_rows,
)
from churn_assets.schemas import DEFAULT_CONTRACT
from churn_assets.segments import cohort_types
from churn_assets.simulator import sample_customers
from churn_assets.training import GROUPED_SPLIT, TIME_SPLIT

pytestmark = [pytest.mark.unit]

HORIZON = 14


def table(rows: pd.DataFrame, risk: np.ndarray, calibration_error: float = 0.0) -> pd.DataFrame:
    return calibration_table(
        rows,
        risk,
        contract=DEFAULT_CONTRACT,
        model_version="v3",
        horizon_days=HORIZON,
        calibration_error=calibration_error,
    )


def outside(frame: pd.DataFrame) -> pd.DataFrame:
    gaps = (frame["observed_rate"] - frame["predicted_rate"]).abs()
    return frame.loc[gaps > frame["tolerance"]]


@pytest.fixture(scope="module")
def customers() -> pd.DataFrame:
    """Customers whose 14-day churn is drawn from the simulator's true probability."""
    return sample_customers(20_000, seed=7, horizon_days=HORIZON)


def test_columns_and_groups(customers):
    result = table(customers, customers["true_probability"].to_numpy())
    assert list(result.columns) == list(CALIBRATION_COLUMNS)
    assert dict(result.dtypes.astype(str)) == {
        "grouping": "object",
        "group_label": "object",
        "customers": "int64",
        "predicted_rate": "float64",
        "observed_rate": "float64",
        "tolerance": "float64",
        "horizon_days": "int32",
        "model_version": "object",
    }
    deciles = result.loc[result["grouping"] == DECILE]
    assert list(deciles["group_label"]) == [str(i) for i in range(1, 11)]
    assert deciles["customers"].tolist() == [2_000] * 10
    assert deciles["predicted_rate"].is_monotonic_increasing  # 1 lowest risk .. 10 highest
    segments = result.loc[result["grouping"] == SEGMENT]
    assert set(segments["group_label"]) >= {
        "contract_type=month-to-month",
        "contract_type=one_year",
        "contract_type=two_year",
        "payment_method=electronic_check",
        "customer_tenure_band=0-5",
        "risk_tier=high",
    }
    per_type = segments["group_label"].str.split("=").str[0].value_counts()
    assert set(per_type.index) == set(cohort_types(DEFAULT_CONTRACT))
    for cohort_type in per_type.index:  # every customer in exactly one group of each type
        mine = segments.loc[segments["group_label"].str.startswith(f"{cohort_type}=")]
        assert mine["customers"].sum() == len(customers), cohort_type
    assert set(result["horizon_days"]) == {HORIZON} and set(result["model_version"]) == {"v3"}
    contract = segments.set_index("group_label").loc["contract_type=two_year"]
    two_year = customers["contract_type"] == "two_year"
    assert contract["customers"] == two_year.sum()
    assert contract["observed_rate"] == pytest.approx(customers.loc[two_year, "label"].mean())
    assert contract["predicted_rate"] == pytest.approx(
        customers.loc[two_year, "true_probability"].mean()
    )


def test_a_calibrated_model_stays_within_the_band_and_a_miscalibrated_one_does_not(customers):
    truth = customers["true_probability"].to_numpy()
    calibrated = table(customers, truth)
    assert outside(calibrated).empty, outside(calibrated)
    # The band is the binomial spread of a calibrated model's observed rate, nothing more.
    deciles = calibrated.loc[calibrated["grouping"] == DECILE]
    assert (deciles["tolerance"] < 0.25 * deciles["predicted_rate"] + 0.01).all()

    # Off by a factor of two: every decile whose true churn rate is 2 % or more falls outside
    # (below that, 2,000 customers cannot tell a rate from its double).
    clear = (deciles["predicted_rate"] >= 0.02).to_numpy()
    assert clear.sum() >= 6
    for wrong in (np.minimum(2 * truth, 1.0), truth / 2):
        result = table(customers, wrong)
        wrong_deciles = result.loc[result["grouping"] == DECILE]
        missed = outside(wrong_deciles)["group_label"]
        assert set(wrong_deciles["group_label"][clear]) <= set(missed), wrong_deciles


def test_the_models_calibration_error_widens_every_band(customers):
    truth = customers["true_probability"].to_numpy()
    plain = table(customers, truth)
    widened = table(customers, truth, calibration_error=0.02)
    np.testing.assert_allclose(widened["tolerance"] - plain["tolerance"], 0.02)


def test_bands_are_simultaneous_over_the_groups_of_a_grouping():
    """Every decile and every segment here predicts 0.1 over 1,000 customers: the decile band
    uses the two-sided 95 % quantile for 10 groups, z = 2.807."""
    rows = sample_customers(10_000, seed=1).assign(label=0)
    result = table(rows, np.full(10_000, 0.1))
    deciles = result.loc[result["grouping"] == DECILE]
    spread = np.sqrt(1_000 * 0.1 * 0.9) / 1_000
    np.testing.assert_allclose(deciles["tolerance"], 2.807 * spread, rtol=1e-3)


def test_scoring_rows_are_the_newest_test_snapshot_or_every_test_row_of_a_grouped_split():
    times = pd.to_datetime(["2026-03-01", "2026-03-04", "2026-03-07"], utc=True)
    frame = pd.DataFrame(
        {
            "customer_id": ["a", "b", "a", "b", "a", "b"],
            "snapshot_time": [times[0], times[0], times[1], times[1], times[2], times[2]],
            "split": ["train", "train", "test", "test", "test", "test"],
            "label": [0, 1, 0, 1, 1, 0],
            "split_method": TIME_SPLIT,
        }
    )
    newest = scoring_rows(frame)
    assert newest["snapshot_time"].tolist() == [times[2], times[2]]
    assert newest["customer_id"].tolist() == ["a", "b"]
    grouped = scoring_rows(frame.assign(split_method=GROUPED_SPLIT))
    assert len(grouped) == 4
    with pytest.raises(CalibrationError, match="no test rows"):
        scoring_rows(frame.assign(split="train"))


def test_bad_inputs_are_refused_by_name(customers):
    rows = customers.head(100)
    risk = rows["true_probability"].to_numpy()
    cases = [
        ((rows.iloc[:0], risk[:0]), {}, "no scored rows"),
        ((rows, risk[:50]), {}, "50 probabilities for 100 rows"),
        ((rows, risk + 1), {}, r"probabilities must lie in \[0, 1\]"),
        ((rows.assign(label=-1), risk), {}, "labels must be 0 or 1"),
        ((rows, risk), {"calibration_error": float("nan")}, "calibration_error must be >= 0"),
    ]
    for arguments, options, message in cases:
        with pytest.raises(CalibrationError, match=message):
            table(*arguments, **options)
