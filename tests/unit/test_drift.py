"""Drift reports on simulated windows: detection, false alarms, delay, corrections, validation."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import false_discovery_control, ks_2samp

from churn_assets.contract import contract_from_dict
from churn_assets.drift import (
    MMD_PERMUTATIONS,
    PREDICTION,
    REPORT_MMD_PERMUTATIONS,
    DriftReport,
    adjust_p_values,
    drift_report,
    mmd_permutation_test,
)
from churn_assets.features import FeatureTransformer
from churn_assets.schemas import CATEGORICAL_FEATURES, FEATURE_NAMES, NUMERIC_FEATURES
from churn_assets.simulator import SimulationConfig, sample_customers, simulate_frames

pytestmark = [pytest.mark.unit]

CUSTOMERS = 3000
START_DAY = 30
SHIFTED = ("monthly_charges", "payment_method")
UNTOUCHED = (
    "customer_tenure",
    "support_tickets",
    "login_frequency",
    "contract_type",
    "internet_service",
)
FALSE_ALARM_SEEDS = (21, 22)
FALSE_ALARM_DAYS = range(8, 40)  # live day d against the 7 days before it
# Live day d against days d-33 .. d-24: as far back as the champion's reference (its newest
# labelled snapshots are a 14-day horizon and 10 grace days old), over which the simulated base
# ages and turns over: small but significant shifts, on which the report alarmed 14 times in
# these 30 windows while its MMD verdict was its raw p-value alone.
AGED_REFERENCE_DAYS = range(40, 70, 2)
MAX_FALSE_ALARM_RATE = 0.05


def simulate(scenario: str, days: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Customer events of a simulation and the simulated day of each event."""
    events, _ = simulate_frames(
        SimulationConfig(
            seed=seed,
            customers=CUSTOMERS,
            days=days,
            scenario=scenario,
            scenario_start_day=START_DAY,
        )
    )
    day = (events["event_time"] - events["event_time"].min().normalize()).dt.days.to_numpy()
    return events, day


def window(frames: tuple[pd.DataFrame, np.ndarray], first: int, last: int) -> pd.DataFrame:
    events, day = frames
    return events[(day >= first) & (day <= last)]


@pytest.fixture(scope="module")
def covariate():
    return simulate("covariate_drift", days=45, seed=11)


@pytest.fixture(scope="module")
def covariate_report(covariate) -> DriftReport:
    return drift_report(window(covariate, 0, 29), window(covariate, 35, 44), mmd_sample=300)


@pytest.fixture(scope="module")
def customers() -> pd.DataFrame:
    return sample_customers(2_000, seed=3)


def test_covariate_drift_flags_the_shifted_features_and_not_the_untouched_ones(covariate_report):
    report = covariate_report
    flagged = set(report.drifted_features)
    assert set(SHIFTED) <= flagged
    assert not flagged & set(UNTOUCHED)
    assert flagged <= {*SHIFTED, "total_charges"}  # accrues the higher charges
    assert report.drift
    assert report.multivariate["detector"] == "mmd"
    assert report.multivariate["drift"] is True
    assert report.multivariate["p_value"] < report.threshold
    assert report.multivariate["p_value_corrected"] < report.threshold
    assert report.multivariate["effect_size"] >= report.multivariate["min_effect"] == 0.1
    assert report.multivariate["effect_metric"] == "witness_ks"
    assert report.multivariate["sample_rows"] == 300
    assert report.multivariate["n_permutations"] == REPORT_MMD_PERMUTATIONS
    by_name = {test.feature: test for test in report.features}
    assert [test.feature for test in report.features] == list(FEATURE_NAMES)
    assert by_name["monthly_charges"].detector == "ks"
    assert by_name["payment_method"].detector == "chi2"
    assert by_name["payment_method"].effect_metric == "total_variation"
    assert by_name["payment_method"].effect_size > 0.15  # 40 % of customers moved
    assert report.prediction is None
    frame = report.to_frame()
    assert list(frame["feature"]) == list(FEATURE_NAMES)
    assert frame.set_index("feature").loc["monthly_charges", "drift"]


def test_false_alarm_rate_without_drift_is_at_most_five_percent():
    """The whole report's verdict (features and MMD, each corrected with the others and held to
    its effect floor) on windows of simulations without drift: each day against the week before
    it, and later days against a reference as old as the champion's."""
    geometries = {
        "day vs the week before": [(day, day - 7, day - 1) for day in FALSE_ALARM_DAYS],
        "day vs 24-33 days before": [(day, day - 33, day - 24) for day in AGED_REFERENCE_DAYS],
    }
    counts = {
        name: dict.fromkeys(("windows", "overall", "mmd", "unfloored"), 0) for name in geometries
    }
    for seed in FALSE_ALARM_SEEDS:
        frames = simulate("none", days=max(AGED_REFERENCE_DAYS) + 1, seed=seed)
        for name, windows in geometries.items():
            count = counts[name]
            for day, first, last in windows:
                live = window(frames, day, day)
                report = drift_report(window(frames, first, last), live, seed=day)
                mmd = report.multivariate
                assert mmd["detector"] == "mmd" and mmd["sample_rows"] == min(1000, len(live))
                count["windows"] += 1
                count["overall"] += report.drift
                count["mmd"] += mmd["drift"]
                # Without effect floors a test alarms on its corrected p-value alone.
                corrected = [test.p_value_corrected for test in report.features]
                count["unfloored"] += min([*corrected, mmd["p_value_corrected"]]) < report.threshold
    rates = {name: count["overall"] / count["windows"] for name, count in counts.items()}
    total = sum(count["windows"] for count in counts.values())
    overall = sum(count["overall"] for count in counts.values())
    summary = f"false alarms of the overall verdict: {overall}/{total} no-drift windows " + (
        f"({overall / total:.1%}); "
        + "; ".join(
            f"{name}: {count['overall']}/{count['windows']} ({rates[name]:.1%}), of which MMD "
            f"{count['mmd']}; without effect floors {count['unfloored']}"
            for name, count in counts.items()
        )
        + f"; budget {MAX_FALSE_ALARM_RATE:.0%} each"
    )
    print(f"\n{summary}")
    assert all(count["windows"] >= 20 for count in counts.values()), summary
    assert max(rates.values()) <= MAX_FALSE_ALARM_RATE, summary


def test_concept_drift_flags_no_feature():
    frames = simulate("concept_drift", days=45, seed=13)
    report = drift_report(window(frames, 0, 29), window(frames, START_DAY, 44), mmd=False)
    assert report.drifted_features == []
    assert not report.drift
    assert report.multivariate == {"skipped": "disabled (mmd=False)"}


def test_covariate_drift_is_detected_on_its_start_day_or_the_next(covariate):
    reference = window(covariate, 0, 24)
    flagged_days = [
        day
        for day in range(25, 41)
        if drift_report(reference, window(covariate, day, day), mmd=False).drift
    ]
    first = flagged_days[0] if flagged_days else None
    delay = None if first is None else first - START_DAY
    print(f"\ndetection delay: {delay} day(s); first flagged day {first}, flagged {flagged_days}")
    assert first in (START_DAY, START_DAY + 1)
    assert flagged_days == list(range(first, 41))


def test_bonferroni_is_above_fdr_which_is_above_raw(covariate):
    reference, live = window(covariate, 0, 29), window(covariate, 30, 31)
    fdr = drift_report(reference, live, mmd=False).features
    bonferroni = drift_report(reference, live, mmd=False, correction="bonferroni").features
    for by_fdr, by_bonferroni in zip(fdr, bonferroni, strict=True):
        assert by_fdr.p_value == by_bonferroni.p_value
        assert by_bonferroni.p_value_corrected >= by_fdr.p_value_corrected >= by_fdr.p_value
        assert by_bonferroni.p_value_corrected == pytest.approx(min(1.0, 8 * by_fdr.p_value))
    raw = np.array([test.p_value for test in fdr])
    np.testing.assert_allclose(
        [test.p_value_corrected for test in fdr], false_discovery_control(raw)
    )


def test_adjusted_p_values_match_scipy_and_respect_the_ordering():
    p = np.random.default_rng(5).uniform(0, 0.2, size=12)
    fdr = adjust_p_values(p, "fdr")
    bonferroni = adjust_p_values(p, "bonferroni")
    np.testing.assert_allclose(fdr, false_discovery_control(p))
    assert np.all(bonferroni >= fdr) and np.all(fdr >= p)
    with pytest.raises(ValueError, match="holm"):
        adjust_p_values(p, "holm")


def test_effect_floor_keeps_a_tiny_shift_on_huge_windows_quiet():
    reference = sample_customers(200_000, seed=1)
    live = sample_customers(200_000, seed=2)
    live["monthly_charges"] = live["monthly_charges"] + 0.5
    report = drift_report(reference, live, mmd=False)
    charges = {test.feature: test for test in report.features}["monthly_charges"]
    assert charges.p_value < 1e-6
    assert charges.p_value_corrected < report.threshold
    assert charges.effect_size < charges.min_effect == 0.1
    assert report.drifted_features == []
    unfloored = drift_report(reference, live, mmd=False, min_effect={"monthly_charges": 0.0})
    assert unfloored.drifted_features == ["monthly_charges"]


def test_prediction_drift_uses_the_same_rules_and_joins_the_correction(customers):
    rng = np.random.default_rng(0)
    reference_scores = rng.beta(2, 8, size=2_000)
    live_scores = rng.beta(4, 6, size=1_500)
    report = drift_report(
        customers,
        sample_customers(1_500, seed=4),
        mmd=False,
        correction="bonferroni",
        reference_scores=reference_scores,
        live_scores=live_scores,
    )
    prediction = report.prediction
    assert prediction is not None and prediction.feature == PREDICTION
    assert prediction.detector == "ks" and prediction.kind == "score"
    assert prediction.drift and report.drift and report.drifted_features == []
    for test in [*report.features, prediction]:
        assert test.p_value_corrected == pytest.approx(min(1.0, 9 * test.p_value))
    frame = report.to_frame()
    assert list(frame["feature"]) == [*FEATURE_NAMES, PREDICTION]
    as_dict = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert as_dict["prediction"]["feature"] == PREDICTION
    assert len(as_dict["features"]) == len(FEATURE_NAMES)

    quiet = drift_report(
        customers,
        sample_customers(1_500, seed=4),
        mmd=False,
        reference_scores=reference_scores,
        live_scores=rng.beta(2, 8, size=1_500),
    )
    assert quiet.prediction is not None and not quiet.prediction.drift


def test_mmd_is_seeded_leaves_numpy_global_state_alone_and_accepts_a_transformer(customers):
    live = sample_customers(1_000, seed=8)
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    first = drift_report(customers, live, mmd_sample=200, seed=5)
    assert np.random.random() == expected_next
    again = drift_report(customers, live, mmd_sample=200, seed=5)
    assert first.as_dict() == again.as_dict()
    assert first.multivariate["sample_rows"] == 200
    assert first.multivariate["drift"] is False

    shifted = live.assign(monthly_charges=live["monthly_charges"] * 1.3)
    transformer = FeatureTransformer.fit(customers)
    report = drift_report(customers, shifted, mmd_sample=200, transformer=transformer)
    assert report.multivariate["drift"] is True


def test_small_windows_skip_mmd_with_a_reason(customers):
    report = drift_report(customers, customers.head(10))
    assert "at least" in report.multivariate["skipped"]
    assert not report.drift


def test_unseen_categories_count_as_drift_rather_than_being_dropped(customers):
    live = sample_customers(1_000, seed=9)
    live.loc[live.index[:300], "payment_method"] = "crypto"
    report = drift_report(customers, live, mmd=False)
    assert report.drifted_features == ["payment_method"]
    payment = {test.feature: test for test in report.features}["payment_method"]
    assert payment.effect_size == pytest.approx(0.3, abs=0.03)


def test_missing_columns_name_them(customers):
    with pytest.raises(ValueError, match=r"live window lacks feature columns \['payment_method'"):
        drift_report(customers, customers.drop(columns=["payment_method", "support_tickets"]))
    with pytest.raises(ValueError, match=r"reference window lacks .*'monthly_charges'"):
        drift_report(customers.drop(columns=["monthly_charges"]), customers)


def test_empty_live_window_is_an_error(customers):
    with pytest.raises(ValueError, match="live window is empty"):
        drift_report(customers, customers.iloc[:0])


@pytest.mark.parametrize("column", NUMERIC_FEATURES)
def test_nan_in_a_numeric_feature_is_an_error_not_a_silent_drop(customers, column):
    live = customers.astype({column: float})
    live.loc[live.index[[3, 7]], column] = np.nan
    with pytest.raises(ValueError, match=rf"live window .*{column} has 2 missing \(NaN\) values"):
        drift_report(customers, live, mmd=False)


def test_other_bad_inputs_are_errors(customers):
    missing_category = customers.copy()
    missing_category.loc[missing_category.index[0], CATEGORICAL_FEATURES[0]] = None
    cases = [
        ({"correction": "holm"}, "correction"),
        ({"threshold": 1.5}, "threshold"),
        ({"min_effect": {"monthly_charge": 0.2}}, "unknown features"),
        ({"reference_scores": np.zeros(5)}, "both reference_scores and live_scores"),
        ({"reference_scores": np.zeros(5), "live_scores": np.array([np.nan])}, "live_scores"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            drift_report(customers, customers, mmd=False, **options)
    with pytest.raises(ValueError, match="contract_type has 1 missing values"):
        drift_report(customers, missing_category, mmd=False)


def test_importing_the_module_does_not_import_tensorflow():
    code = (
        "import sys, churn_assets.drift; "
        "assert 'tensorflow' not in sys.modules and 'alibi_detect' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_full_report_does_not_import_tensorflow_or_alibi_detect():
    code = (
        "import sys\n"
        "from churn_assets.drift import drift_report\n"
        "from churn_assets.simulator import sample_customers\n"
        "report = drift_report(sample_customers(500, seed=1), sample_customers(500, seed=2))\n"
        "assert report.multivariate['detector'] == 'mmd', report.multivariate\n"
        "loaded = [m for m in ('tensorflow', 'alibi_detect', 'torch') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the MMD permutation test --------------------------------------------------------------------


def brute_force_mmd(
    x_ref: np.ndarray, x: np.ndarray, n_permutations: int, p_val: float, seed: int
) -> dict[str, float]:
    """The MMD permutation test written out plainly: one permuted kernel matrix and its MMD² per
    permutation, the bandwidth as the median of the distances between distinct reference rows
    (the lower one of the two middle values when their number is even), the p-value counting the
    observed labelling as one permutation, and the witness of each row from the other rows."""
    n, m = len(x_ref), len(x)
    pooled = np.concatenate([x_ref, x]).astype(np.float64)
    pairs = cdist(pooled[:n], pooled[:n], "sqeuclidean")[np.triu_indices(n, k=1)]
    sigma = np.sqrt(0.5 * np.sort(pairs)[(len(pairs) + 1) // 2 - 1])
    kernel = np.exp(-cdist(pooled, pooled, "sqeuclidean") / (2 * sigma**2))
    np.fill_diagonal(kernel, 0.0)

    def mmd2(k: np.ndarray) -> float:
        k_xx, k_yy, k_xy = k[:n, :n], k[n:, n:], k[n:, :n]
        return k_xx.sum() / (n * (n - 1)) + k_yy.sum() / (m * (m - 1)) - 2 * k_xy.mean()

    observed = mmd2(kernel)
    generator = np.random.RandomState(seed)
    permuted = []
    for _ in range(n_permutations):
        order = generator.permutation(n + m)
        permuted.append(mmd2(kernel[order][:, order]))
    permuted = np.array(permuted)
    witness = []
    for i in range(n + m):
        others = np.arange(n + m) != i
        to_ref = kernel[i, :n][others[:n]].mean()
        to_live = kernel[i, n:][others[n:]].mean()
        witness.append(to_live - to_ref)
    witness = np.array(witness)
    return {
        "p_value": float((1 + (observed <= permuted).sum()) / (n_permutations + 1)),
        "distance": observed,
        "distance_threshold": float(np.sort(permuted)[::-1][int(p_val * n_permutations)]),
        "sigma": float(sigma),
        "witness_ks": float(ks_2samp(witness[:n], witness[n:]).statistic),
    }


@pytest.mark.parametrize(
    ("n", "m", "shift", "seed"),
    [(60, 60, 0.0, 1), (80, 50, 0.0, 2), (50, 90, 0.4, 3), (70, 70, 1.0, 4), (31, 30, 0.3, 5)],
)
def test_mmd_permutation_test_equals_the_test_written_out_permutation_by_permutation(
    n, m, shift, seed
):
    rng = np.random.default_rng(seed)
    x_ref = rng.normal(size=(n, 4))
    x = rng.normal(size=(m, 4)) + [shift, 0, 0, 0]
    x[: m // 3, 3] = x_ref[: m // 3, 3]  # some equal values, as integer features have
    expected = brute_force_mmd(x_ref, x, 200, 0.05, seed=seed + 10)
    result = mmd_permutation_test(x_ref, x, n_permutations=200, p_val=0.05, seed=seed + 10)
    assert result.p_value == expected["p_value"]
    assert result.n_permutations == 200
    for field in ("distance", "distance_threshold", "sigma", "witness_ks"):
        assert getattr(result, field) == pytest.approx(expected[field], rel=1e-9, abs=1e-14)


def test_mmd_permutation_test_alarms_at_its_level_without_drift_and_detects_a_shift():
    null_p, shifted_p = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        x_ref = rng.normal(size=(50, 3))
        null_p.append(mmd_permutation_test(x_ref, rng.normal(size=(50, 3)), seed=seed).p_value)
        shifted = rng.normal(size=(50, 3)) + [1.0, 0.0, 0.0]
        shifted_p.append(mmd_permutation_test(x_ref, shifted, seed=seed).p_value)
    false_alarms = float(np.mean(np.array(null_p) < 0.05))
    detected = float(np.mean(np.array(shifted_p) < 0.05))
    print(
        f"\nMMD at 0.05: false alarms {false_alarms:.1%}, one-sigma shift detected {detected:.1%}"
    )
    assert false_alarms <= 0.08  # 0.05 expected; 200 windows give a spread of 0.015
    assert np.mean(np.array(null_p) > 0.5) >= 0.4  # p-values spread out under no drift
    assert detected >= 0.9


def test_mmd_permutation_test_is_seeded_and_leaves_numpy_global_state_alone():
    rng = np.random.default_rng(0)
    x_ref, x = rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + [0.3, 0]
    np.random.seed(7)
    expected_next = np.random.random()
    np.random.seed(7)
    first = mmd_permutation_test(x_ref, x, seed=3)
    assert np.random.random() == expected_next
    assert mmd_permutation_test(x_ref, x, seed=3) == first
    assert first.n_permutations == MMD_PERMUTATIONS
    others = {mmd_permutation_test(x_ref, x, seed=seed).p_value for seed in range(4, 12)}
    assert len(others) > 1  # other seeds, other permutations


def test_mmd_permutation_test_rejects_bad_inputs():
    good = np.zeros((5, 2)) + np.arange(5)[:, None]
    cases = [
        ((np.zeros(5), good), {}, "x_ref must be two-dimensional"),
        ((good, good[:1]), {}, "x needs at least 2 rows"),
        ((good, good[:, :1]), {}, "same columns, got 2 and 1"),
        ((good, np.where(good == 0, np.nan, good)), {}, "x has 2 NaN or infinite values"),
        ((good, good), {"n_permutations": 0}, "n_permutations must be an integer"),
        ((good, good), {"n_permutations": True}, "n_permutations must be an integer"),
        ((good, good), {"p_val": 1.0}, "p_val must be a number between 0 and 1"),
    ]
    for arguments, options, message in cases:
        with pytest.raises(ValueError, match=message):
            mmd_permutation_test(*arguments, **options)


# -- the contract decides the features and each one's test --------------------------------------

KIND_CONTRACT = contract_from_dict(
    {
        "format": 1,
        "features": [
            {"name": "visits", "kind": "integer", "min": 0, "max": 1000},
            {"name": "spend", "kind": "number", "min": 0},
            {"name": "plan", "kind": "category", "categories": ["basic", "plus", "pro"]},
            {"name": "paperless", "kind": "boolean"},
        ],
    }
)
KIND_ROWS = 2_000
KIND_DETECTOR = {"visits": "ks", "spend": "ks", "plan": "chi2", "paperless": "chi2"}


def kind_window(seed: int, shifted: str | None = None) -> pd.DataFrame:
    """Rows of :data:`KIND_CONTRACT` (seeded); ``shifted`` names the one feature whose
    distribution moves (by about a fifth of the population, well above the effect floor)."""
    rng = np.random.default_rng(seed)
    plan_shares = (0.3, 0.3, 0.4) if shifted == "plan" else (0.5, 0.3, 0.2)
    return pd.DataFrame(
        {
            "visits": rng.poisson(4.5 if shifted == "visits" else 3.0, KIND_ROWS),
            "spend": rng.normal(58.0 if shifted == "spend" else 50.0, 10.0, KIND_ROWS),
            "plan": rng.choice(["basic", "plus", "pro"], KIND_ROWS, p=plan_shares),
            "paperless": rng.random(KIND_ROWS) < (0.4 if shifted == "paperless" else 0.2),
        }
    )


@pytest.mark.parametrize("feature", KIND_CONTRACT.names)
def test_each_kind_of_feature_is_tested_by_its_kind_and_a_shift_is_flagged(feature):
    reference = kind_window(seed=1)
    report = drift_report(
        reference, kind_window(seed=2, shifted=feature), mmd=False, contract=KIND_CONTRACT
    )
    assert [test.feature for test in report.features] == list(KIND_CONTRACT.names)
    assert {test.feature: test.detector for test in report.features} == KIND_DETECTOR
    assert report.drifted_features == [feature]
    shifted = {test.feature: test for test in report.features}[feature]
    assert shifted.p_value_corrected < 1e-6 and shifted.effect_size >= shifted.min_effect


def test_no_shift_of_any_kind_is_not_flagged():
    for seed in (2, 3, 4):
        report = drift_report(kind_window(seed=1), kind_window(seed=seed), contract=KIND_CONTRACT)
        assert report.drifted_features == [], seed
        assert report.multivariate["detector"] == "mmd"
        assert not report.drift, (seed, report.multivariate)


def test_a_boolean_may_be_stored_as_one_and_zero_but_not_as_text():
    reference = kind_window(seed=1)
    live = kind_window(seed=2, shifted="paperless")
    as_numbers = drift_report(
        reference.astype({"paperless": int}),
        live.astype({"paperless": float}),
        mmd=False,
        contract=KIND_CONTRACT,
    )
    as_bools = drift_report(reference, live, mmd=False, contract=KIND_CONTRACT)
    assert as_numbers.features == as_bools.features
    worded = live.assign(paperless=np.where(live["paperless"], "yes", "no"))
    with pytest.raises(ValueError, match=r"live window .*paperless is a boolean but holds 'no'"):
        drift_report(reference, worded, mmd=False, contract=KIND_CONTRACT)
    with pytest.raises(ValueError, match=r"unknown features \['customer_tenure'\]"):
        drift_report(
            reference,
            live,
            mmd=False,
            contract=KIND_CONTRACT,
            min_effect={"customer_tenure": 0.2},
        )


# -- a joint shift that no single feature shows ---------------------------------------------------

JOINT_CONTRACT = contract_from_dict(
    {
        "format": 1,
        "features": [
            {"name": "a", "kind": "number"},
            {"name": "b", "kind": "number"},
            {"name": "c", "kind": "number"},
        ],
    }
)


def correlated_window(seed: int, correlation: float, rows: int = 3_000) -> pd.DataFrame:
    """Three standard normal features; ``a`` and ``b`` with the given correlation, so every
    feature's own distribution is the same whatever the correlation."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, 3))
    b = correlation * z[:, 0] + np.sqrt(1 - correlation**2) * z[:, 1]
    return pd.DataFrame({"a": z[:, 0], "b": b, "c": z[:, 2]})


def test_mmd_alone_flags_a_joint_shift_that_reaches_the_effect_floor():
    reference = correlated_window(1, 0.0)
    report = drift_report(reference, correlated_window(2, 0.6), contract=JOINT_CONTRACT, seed=2)
    mmd = report.multivariate
    assert report.drifted_features == []  # each feature alone did not move
    assert mmd["drift"] is True and report.drift
    assert mmd["p_value_corrected"] < report.threshold
    assert mmd["effect_size"] >= mmd["min_effect"] == 0.1
    # Corrected with the three features: Benjamini-Hochberg with the MMD ranked first.
    assert mmd["p_value_corrected"] == pytest.approx(min(1.0, 4 * mmd["p_value"]))


def test_a_significant_joint_shift_below_the_effect_floor_does_not_alarm():
    reference = correlated_window(1, 0.0)
    live = correlated_window(2, 0.3)
    report = drift_report(reference, live, contract=JOINT_CONTRACT, seed=2)
    mmd = report.multivariate
    assert mmd["p_value_corrected"] < report.threshold  # detectable, ...
    assert mmd["effect_size"] < mmd["min_effect"]  # ... but under a tenth of the rows moved
    assert mmd["drift"] is False and not report.drift
    unfloored = drift_report(
        reference, live, contract=JOINT_CONTRACT, seed=2, min_effect={"multivariate": 0.0}
    )
    assert unfloored.multivariate["drift"] is True and unfloored.drift
    assert unfloored.multivariate["min_effect"] == 0.0
