"""The drift report's tests against alibi-detect's own detectors on seeded data.

:mod:`churn_assets.drift` computes the tests of alibi-detect's ``KSDrift``, ``ChiSquareDrift`` and
``MMDDrift`` (TensorFlow backend) with NumPy and SciPy; these tests run alibi-detect (which
imports TensorFlow, 15-20 s once) on the same inputs and compare. alibi-detect keeps its
univariate statistics and p-values in float32, so they are compared at float32's precision.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

from churn_assets.contract import contract_from_dict
from churn_assets.drift import MMD_PERMUTATIONS, drift_report, mmd_permutation_test

pytestmark = [pytest.mark.unit, pytest.mark.slow]

# alibi-detect stores per-feature results in float32 arrays: 2**-24 relative, with room.
FLOAT32_RTOL = 1e-6

CONTRACT = contract_from_dict(
    {
        "format": 1,
        "features": [
            {"name": "visits", "kind": "integer", "min": 0, "max": 1000},
            {"name": "spend", "kind": "number", "min": 0},
            {"name": "plan", "kind": "category", "categories": ["basic", "plus", "pro", "max"]},
            {"name": "paperless", "kind": "boolean"},
            {"name": "legacy", "kind": "boolean"},
        ],
    }
)
CATEGORIES = {"plan": ["basic", "plus", "pro", "max"], "paperless": None, "legacy": None}


@pytest.fixture(scope="module")
def alibi():
    """alibi-detect's detectors, imported once, with TensorFlow's own deprecation noise off."""
    with warnings.catch_warnings():
        # tensorflow-probability checks TensorFlow's version with distutils' LooseVersion.
        warnings.filterwarnings(
            "ignore",
            message="distutils Version classes are deprecated",
            category=DeprecationWarning,
        )
        from alibi_detect.cd import ChiSquareDrift, KSDrift, MMDDrift
    return {"ks": KSDrift, "chi2": ChiSquareDrift, "mmd": MMDDrift}


def window(seed: int, rows: int, *, shift: float = 0.0) -> pd.DataFrame:
    """Rows of :data:`CONTRACT`; ``shift`` moves the numbers and the category mix a little.
    ``max`` is never drawn in the reference (a category seen on one side only), ``legacy`` is
    always false (one category on both sides)."""
    rng = np.random.default_rng(seed)
    plan_shares = (0.5 - shift, 0.3, 0.2, shift) if shift else (0.5, 0.3, 0.2, 0.0)
    return pd.DataFrame(
        {
            "visits": rng.poisson(3.0 + 4 * shift, rows),  # many ties
            "spend": rng.normal(50.0 + 20 * shift, 10.0, rows),
            "plan": rng.choice(["basic", "plus", "pro", "max"], rows, p=plan_shares),
            "paperless": rng.random(rows) < 0.2 + shift,
            "legacy": np.zeros(rows, dtype=bool),
        }
    )


def codes(frame: pd.DataFrame, name: str) -> np.ndarray:
    """The integer codes alibi-detect's ChiSquareDrift gets: the value's index among the
    contract's categories (a boolean's false 0, true 1)."""
    categories = CATEGORIES[name]
    if categories is None:
        return frame[name].astype(int).to_numpy()
    return frame[name].map(categories.index).to_numpy()


def alibi_feature_results(detector, x_ref: np.ndarray, x: np.ndarray) -> dict:
    data = detector(x_ref, p_val=0.05).predict(
        x, drift_type="feature", return_p_val=True, return_distance=True
    )["data"]
    return {"p_value": data["p_val"], "statistic": data["distance"]}


@pytest.mark.parametrize(("seed", "shift"), [(1, 0.0), (2, 0.0), (3, 0.02), (4, 0.25)])
def test_univariate_p_values_and_statistics_equal_alibi_detects(alibi, seed, shift):
    reference = window(seed, 3_000)
    live = window(seed + 100, 1_700, shift=shift)
    rng = np.random.default_rng(seed)
    reference_scores, live_scores = rng.beta(2, 8, 3_000), rng.beta(2 + 4 * shift, 8, 1_700)
    report = drift_report(
        reference,
        live,
        mmd=False,
        contract=CONTRACT,
        reference_scores=reference_scores,
        live_scores=live_scores,
    )
    ours = {test.feature: test for test in [*report.features, report.prediction]}

    numeric = ["visits", "spend"]
    expected = alibi_feature_results(
        alibi["ks"],
        reference[numeric].to_numpy(dtype=np.float64),
        live[numeric].to_numpy(dtype=np.float64),
    )
    categorical = list(CATEGORIES)
    expected_chi2 = alibi_feature_results(
        alibi["chi2"],
        np.column_stack([codes(reference, name) for name in categorical]),
        np.column_stack([codes(live, name) for name in categorical]),
    )
    expected_score = alibi_feature_results(
        alibi["ks"], reference_scores.reshape(-1, 1), live_scores.reshape(-1, 1)
    )
    for names, results in (
        (numeric, expected),
        (categorical, expected_chi2),
        (["prediction"], expected_score),
    ):
        for i, name in enumerate(names):
            for field in ("p_value", "statistic"):
                np.testing.assert_allclose(
                    getattr(ours[name], field),
                    results[field][i],
                    rtol=FLOAT32_RTOL,
                    atol=1e-30,  # float32 flushes p-values below ~1e-38 to zero
                    err_msg=f"{name} {field} (seed {seed}, shift {shift})",
                )
    # The windows do exercise the edge cases and both outcomes.
    assert ours["legacy"].p_value == 1.0 and ours["legacy"].statistic == 0.0
    if shift >= 0.25:
        assert ours["spend"].p_value < 1e-6 and ours["plan"].p_value < 1e-6


MMD_CASES = {
    # name: (reference rows, live rows, mean shift of the live rows in the first column, seed)
    "same distribution": (400, 400, 0.0, 1),
    "same distribution, unequal sizes": (500, 300, 0.0, 2),
    "a small shift": (400, 400, 0.12, 3),
    "a small shift, unequal sizes": (300, 450, 0.2, 4),
    "a large shift": (400, 400, 0.6, 5),
}


def mmd_samples(n: int, m: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three normal columns and two one-hot columns (float32, as the report passes them)."""
    rng = np.random.default_rng(seed)

    def draw(rows: int, offset: float) -> np.ndarray:
        numbers = rng.normal(size=(rows, 3)) + [offset, 0.0, 0.0]
        flags = rng.random(rows) < 0.3
        return np.column_stack([numbers, flags, ~flags]).astype(np.float32)

    return draw(n, 0.0), draw(m, shift)


@pytest.mark.parametrize("case", MMD_CASES)
def test_mmd_matches_alibi_detects_tensorflow_mmd_drift(alibi, case):
    n, m, shift, seed = MMD_CASES[case]
    x_ref, x = mmd_samples(n, m, shift, seed)
    permutation_seed = 1_000 + seed

    global_state = np.random.get_state()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message="distutils Version classes are deprecated",
                category=DeprecationWarning,
            )
            detector = alibi["mmd"](
                x_ref, backend="tensorflow", p_val=0.05, n_permutations=MMD_PERMUTATIONS
            )
            # alibi-detect draws its permutations from NumPy's global generator.
            np.random.seed(permutation_seed)
            expected = detector.predict(x, return_p_val=True, return_distance=True)["data"]
    finally:
        np.random.set_state(global_state)
    ours = mmd_permutation_test(
        x_ref, x, n_permutations=MMD_PERMUTATIONS, p_val=0.05, seed=permutation_seed
    )
    print(
        f"\n{case}: p {ours.p_value} (alibi {expected['p_val']}), MMD² {ours.distance:.6g} "
        f"(alibi {float(expected['distance']):.6g}), sigma {ours.sigma:.6g} "
        f"(alibi {float(detector._detector.kernel.sigma.numpy()[0]):.6g})"
    )
    # TensorFlow computes in float32; the kernel entries carry its rounding, the sums average it.
    assert ours.sigma == pytest.approx(float(detector._detector.kernel.sigma.numpy()[0]), rel=1e-5)
    assert ours.distance == pytest.approx(float(expected["distance"]), rel=1e-3, abs=2e-6)
    assert ours.distance_threshold == pytest.approx(
        float(expected["distance_threshold"]), rel=1e-3, abs=2e-6
    )
    # The same permutations: only a permuted MMD² within float32 rounding of the observed one
    # could be counted differently, so the counts agree to one permutation at most. alibi-detect's
    # p-value is the count over the permutations; ours counts the observed labelling as one more
    # permutation, (1 + count) / (1 + permutations), so that it is never 0.
    alibi_count = float(expected["p_val"]) * MMD_PERMUTATIONS
    assert abs(ours.p_value - (1 + alibi_count) / (1 + MMD_PERMUTATIONS)) <= 1 / (
        1 + MMD_PERMUTATIONS
    )
    assert (ours.p_value < 0.05) == bool(expected["is_drift"])
    if shift >= 0.6:
        assert ours.p_value == 1 / (1 + MMD_PERMUTATIONS)
    if shift == 0.0:
        assert ours.p_value > 0.05
