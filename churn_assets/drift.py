"""Data and prediction drift between a reference window and a live window.

:func:`drift_report` compares the features of a feature contract (``config/features.yaml``, or
the one a model was trained with) in two windows, each by its kind:

* integer and number features: a two-sample Kolmogorov-Smirnov test each (scipy's ``ks_2samp``,
  asymptotic p-value);
* category features: a chi-squared test of the category counts each (scipy's
  ``chi2_contingency`` on the two windows' counts of the categories seen in either), on integer
  codes from a fixed mapping (the contract's values, plus one code for any unseen value);
* boolean features: the same chi-squared test, as a category with the values false and true;
* model scores, when both windows' scores are given: a KS test (prediction drift);
* the joint distribution: a maximum mean discrepancy permutation test
  (:func:`mmd_permutation_test`) on a bounded, seeded sample of each window, because its time and
  memory grow with the square of the sample (the kernel matrix of both samples together), with
  :data:`REPORT_MMD_PERMUTATIONS` permutations.

These are the tests of alibi-detect's ``KSDrift``, ``ChiSquareDrift`` and ``MMDDrift`` (Gaussian
RBF kernel, median-heuristic bandwidth, unbiased MMD², the same permutations for the same seed),
computed here with NumPy and SciPy so that a report never imports alibi-detect or TensorFlow, and
the MMD kernel matrix is built once and every permutation is scored by one matrix product instead
of one TensorFlow gather per permutation (1k rows per side: about 0.06 s instead of 3-4 s).
``tests/unit/test_drift_alibi.py`` checks the results against alibi-detect's own detectors.

All p-values of a report (features, prediction and MMD) are corrected together for multiple
testing, Benjamini-Hochberg by default, so the report as a whole keeps the false-alarm budget of
the threshold. A test is flagged only when its corrected p-value is below the threshold *and* its
effect size reaches a floor, so that windows where a trivial difference is significant do not
alarm on it. Every effect size measures the largest share of the population that moved, so one
floor (0.1 by default) fits all: the KS statistic for numeric features and scores, the total
variation distance of the shares for categorical features, and for MMD the KS statistic of the
two samples' witness-function values (:class:`MMDResult`), the share of rows that the direction
in which the windows differ most tells apart.

This module is Dagster-free and imports neither alibi-detect nor TensorFlow.
"""

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency, ks_2samp

from churn_assets.contract import Contract
from churn_assets.schemas import DEFAULT_CONTRACT

__all__ = [
    "BOOLEAN_VALUES",
    "CORRECTIONS",
    "DEFAULT_MIN_EFFECT",
    "MMD_MIN_ROWS",
    "MMD_PERMUTATIONS",
    "MULTIVARIATE",
    "PREDICTION",
    "REPORT_MMD_PERMUTATIONS",
    "DriftReport",
    "FeatureDrift",
    "MMDResult",
    "adjust_p_values",
    "drift_report",
    "mmd_permutation_test",
]

log = logging.getLogger(__name__)

PREDICTION = "prediction"
# The name of the MMD test among the effect floors (``min_effect``) of a report.
MULTIVARIATE = "multivariate"
# A boolean feature is tested as a category with these two values (codes 0 and 1).
BOOLEAN_VALUES = ("false", "true")
CORRECTIONS = ("fdr", "bonferroni")
# The KS statistic (largest CDF gap) and the total variation distance (largest gap in the share of
# any set of categories) both measure the largest share of the population that moved, so one floor
# fits both. 0.05 for categories is too low for a shrinking customer base: churn alone moves the
# simulator's contract mix by 0.06-0.08 between a 30-day reference and a window a week later.
# The MMD's witness KS statistic is a share of rows too (see MMDResult).
DEFAULT_MIN_EFFECT = {"numeric": 0.1, "categorical": 0.1, "score": 0.1, "multivariate": 0.1}
# alibi-detect's default, and :func:`mmd_permutation_test`'s.
MMD_PERMUTATIONS = 100
# A report's MMD joins the correction across about ten tests, so its p-value must be able to go
# well below threshold / tests: the smallest permutation p-value is 1 / (permutations + 1).
# 1,000 permutations of 1,000 + 1,000 rows take about half a second.
REPORT_MMD_PERMUTATIONS = 1000
# Below this many rows per window a permutation test has too little resolution to mean anything.
MMD_MIN_ROWS = 30

_EFFECT_METRICS = {
    "numeric": "ks_statistic",
    "categorical": "total_variation",
    "score": "ks_statistic",
    "multivariate": "witness_ks",
}


class _Transformer(Protocol):
    def transform(self, frame: pd.DataFrame) -> np.ndarray: ...


@dataclass(frozen=True)
class FeatureDrift:
    """One univariate drift test (a feature, or the model scores as ``prediction``).

    ``kind`` is ``numeric`` (integer and number features) or ``categorical`` (category and
    boolean features) for features and ``score`` for the prediction;
    ``detector`` is ``ks`` or ``chi2``; ``statistic`` is the KS statistic or the chi-squared
    statistic; ``effect_size`` is measured by ``effect_metric`` (``ks_statistic`` or
    ``total_variation``); ``drift`` is true when the corrected p-value is below the report's
    threshold and the effect size reaches ``min_effect``, the floor that applied.
    """

    feature: str
    kind: str
    detector: str
    statistic: float
    p_value: float
    p_value_corrected: float
    effect_size: float
    effect_metric: str
    drift: bool
    min_effect: float


@dataclass(frozen=True)
class DriftReport:
    """The outcome of :func:`drift_report` for one reference window and one live window.

    ``multivariate`` holds the MMD result (``detector``, ``p_value``, ``p_value_corrected``,
    ``distance`` (MMD²), ``distance_threshold``, ``effect_size``, ``effect_metric``
    (``witness_ks``), ``min_effect``, ``sample_rows`` (rows drawn from each window),
    ``n_permutations``, ``drift``) or ``{"skipped": reason}``; like a feature's, its ``drift`` is
    true when its corrected p-value is below the threshold and its effect size reaches
    ``min_effect``. ``drift`` is true when any feature, the prediction or the multivariate test
    is flagged; ``drifted_features`` lists the flagged features only.
    """

    reference_rows: int
    live_rows: int
    threshold: float
    correction: str
    features: list[FeatureDrift]
    multivariate: dict[str, Any]
    prediction: FeatureDrift | None
    drifted_features: list[str]
    drift: bool

    def to_frame(self) -> pd.DataFrame:
        """One row per feature, plus a ``prediction`` row when scores were compared."""
        tests = [*self.features, *([self.prediction] if self.prediction is not None else [])]
        return pd.DataFrame([asdict(test) for test in tests])

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report (plain Python scalars, lists and dicts)."""
        return asdict(self)


def adjust_p_values(p_values: np.ndarray | list[float], correction: str) -> np.ndarray:
    """Multiple-testing adjusted p-values: Benjamini-Hochberg (``fdr``) or ``bonferroni``.

    Both are capped at 1; Bonferroni's are never below Benjamini-Hochberg's, which are never
    below the raw ones.
    """
    p = np.asarray(p_values, dtype=float)
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r} is not one of {CORRECTIONS}")
    m = len(p)
    if m == 0:
        return p
    if correction == "bonferroni":
        return np.minimum(p * m, 1.0)
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    # Step-up: each adjusted value is the smallest scaled value at its rank or above.
    monotone = np.minimum.accumulate(scaled[::-1])[::-1]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(monotone, 1.0)
    return adjusted


def drift_report(
    reference: pd.DataFrame,
    live: pd.DataFrame,
    *,
    threshold: float = 0.05,
    correction: str = "fdr",
    min_effect: Mapping[str, float] | None = None,
    mmd_sample: int = 1000,
    mmd: bool = True,
    seed: int = 0,
    reference_scores: np.ndarray | None = None,
    live_scores: np.ndarray | None = None,
    transformer: _Transformer | None = None,
    contract: Contract | None = None,
) -> DriftReport:
    """Test whether ``live`` rows drift from ``reference`` rows (see the module docstring).

    Both frames need ``contract``'s features (default: the default contract; other columns are
    ignored); integer and number features must be numeric and finite, booleans true/false (or
    1/0), and no feature may be missing: bad rows raise :class:`ValueError` rather than being
    dropped. ``threshold`` is the significance level for the corrected p-values;
    ``correction`` is ``fdr`` (Benjamini-Hochberg) or ``bonferroni`` across all features, the
    prediction and the MMD test together. ``min_effect`` overrides the effect-size floor per
    feature name, ``prediction`` or ``multivariate`` (the MMD test). MMD runs on ``mmd_sample``
    rows drawn from each window (fewer if a window is smaller), with numeric features
    standardised on the reference and categories one-hot encoded, or through
    ``transformer.transform`` when a model's feature transformer is given; ``mmd=False`` skips
    it. ``reference_scores`` and ``live_scores`` (model scores of the two windows) switch on
    prediction drift. Everything random follows ``seed``.
    """
    contract = DEFAULT_CONTRACT if contract is None else contract
    _check_options(threshold, correction, mmd_sample)
    floors = _effect_floors(min_effect, contract)
    _check_frame("reference", reference, contract)
    _check_frame("live", live, contract)
    scores = _check_scores(reference_scores, live_scores)

    numeric = _numeric_tests(reference, live, contract)
    categorical = _categorical_tests(reference, live, contract)
    score_test = _score_test(*scores) if scores is not None else None
    if not mmd:
        multivariate: dict[str, Any] = {"skipped": "disabled (mmd=False)"}
    elif min(len(reference), len(live)) < MMD_MIN_ROWS:
        multivariate = {
            "skipped": f"MMD needs at least {MMD_MIN_ROWS} rows in each window; got "
            f"{len(reference)} reference and {len(live)} live rows"
        }
    else:
        multivariate = _mmd_test(
            reference, live, mmd_sample, threshold, seed, transformer, contract
        )

    raw = {**numeric, **categorical}
    order = list(contract.names)
    tested = order + ([PREDICTION] if score_test is not None else [])
    if score_test is not None:
        raw[PREDICTION] = score_test
    family = tested + ([MULTIVARIATE] if "skipped" not in multivariate else [])
    p_values = [raw[name][2] for name in tested]
    if MULTIVARIATE in family:
        p_values.append(multivariate["p_value"])
    adjusted = dict(zip(family, adjust_p_values(p_values, correction), strict=True))

    def finish(name: str) -> FeatureDrift:
        kind, statistic, p_value, effect = raw[name]
        corrected = float(adjusted[name])
        floor = floors.get(name, DEFAULT_MIN_EFFECT[kind])
        return FeatureDrift(
            feature=name,
            kind=kind,
            detector="chi2" if kind == "categorical" else "ks",
            statistic=float(statistic),
            p_value=float(p_value),
            p_value_corrected=corrected,
            effect_size=float(effect),
            effect_metric=_EFFECT_METRICS[kind],
            min_effect=float(floor),
            drift=bool(corrected < threshold and effect >= floor),
        )

    features = [finish(name) for name in order]
    prediction = finish(PREDICTION) if score_test is not None else None
    if MULTIVARIATE in family:
        corrected = float(adjusted[MULTIVARIATE])
        floor = float(floors.get(MULTIVARIATE, DEFAULT_MIN_EFFECT[MULTIVARIATE]))
        multivariate.update(
            p_value_corrected=corrected,
            min_effect=floor,
            drift=bool(corrected < threshold and multivariate["effect_size"] >= floor),
        )
    drifted = [test.feature for test in features if test.drift]
    drift = bool(
        drifted or (prediction is not None and prediction.drift) or multivariate.get("drift", False)
    )
    report = DriftReport(
        reference_rows=len(reference),
        live_rows=len(live),
        threshold=float(threshold),
        correction=correction,
        features=features,
        multivariate=multivariate,
        prediction=prediction,
        drifted_features=drifted,
        drift=drift,
    )
    log.info(
        "drift report: %d reference vs %d live rows; drifted features %s; prediction %s; "
        "multivariate %s",
        report.reference_rows,
        report.live_rows,
        drifted or "none",
        "not compared" if prediction is None else prediction.drift,
        multivariate.get("drift", multivariate.get("skipped")),
    )
    return report


# -- validation ------------------------------------------------------------------------------


def _check_options(threshold: float, correction: str, mmd_sample: int) -> None:
    if not (isinstance(threshold, int | float) and 0.0 < threshold < 1.0):
        raise ValueError(
            f"threshold must be a number between 0 and 1 (exclusive), got {threshold!r}"
        )
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r} is not one of {CORRECTIONS}")
    if not isinstance(mmd_sample, int) or isinstance(mmd_sample, bool) or mmd_sample < 2:
        raise ValueError(f"mmd_sample must be an integer of at least 2, got {mmd_sample!r}")


def _effect_floors(min_effect: Mapping[str, float] | None, contract: Contract) -> dict[str, float]:
    floors = dict(min_effect or {})
    known = [*contract.names, PREDICTION, MULTIVARIATE]
    unknown = sorted(set(floors) - set(known))
    if unknown:
        raise ValueError(f"min_effect names unknown features {unknown}; known: {known}")
    for name, value in floors.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"min_effect[{name!r}] must be a finite number >= 0, got {value!r}")
    return floors


def _check_frame(side: str, frame: pd.DataFrame, contract: Contract) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{side} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [name for name in contract.names if name not in frame.columns]
    if missing:
        raise ValueError(f"{side} window lacks feature columns {missing}")
    if len(frame) == 0:
        raise ValueError(f"{side} window is empty: drift needs at least one row on each side")
    problems = []
    for name in contract.numeric_names:
        column = frame[name]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            problems.append(f"{name} is not numeric (dtype {column.dtype})")
            continue
        values = column.to_numpy(dtype=float, na_value=np.nan)
        missing_count = int(np.isnan(values).sum())
        infinite_count = int(np.isinf(values).sum())
        if missing_count:
            problems.append(f"{name} has {missing_count} missing (NaN) values")
        if infinite_count:
            problems.append(f"{name} has {infinite_count} infinite values")
    for name in (*contract.category_values, *contract.boolean_names):
        missing_count = int(frame[name].isna().sum())
        if missing_count:
            problems.append(f"{name} has {missing_count} missing values")
    for name in contract.boolean_names:
        values = frame[name].dropna()
        if pd.api.types.is_bool_dtype(values):
            continue
        other = sorted({repr(v) for v in values.unique() if not _is_truth_value(v)})
        if other:
            problems.append(f"{name} is a boolean but holds {', '.join(other[:5])}")
    if problems:
        raise ValueError(f"{side} window has invalid feature values: " + "; ".join(problems))


def _is_truth_value(value: Any) -> bool:
    """True, False, or a number equal to 1 or 0 (a boolean stored as a number)."""
    if isinstance(value, bool | np.bool_):
        return True
    return isinstance(value, int | float | np.integer | np.floating) and value in (0, 1)


def _check_scores(
    reference_scores: np.ndarray | None, live_scores: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | None:
    if reference_scores is None and live_scores is None:
        return None
    if reference_scores is None or live_scores is None:
        raise ValueError("prediction drift needs both reference_scores and live_scores")
    checked = []
    for side, scores in (("reference_scores", reference_scores), ("live_scores", live_scores)):
        values = np.asarray(scores, dtype=float)
        if values.ndim != 1:
            raise ValueError(f"{side} must be one-dimensional, got shape {values.shape}")
        if len(values) == 0:
            raise ValueError(f"{side} is empty")
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise ValueError(f"{side} has {bad} NaN or infinite values")
        checked.append(values)
    return checked[0], checked[1]


# -- the tests -------------------------------------------------------------------------------


def _ks_tests(x_ref: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided two-sample KS statistics and asymptotic p-values, one per column (the test of
    alibi-detect's ``KSDrift``)."""
    statistics = np.empty(x_ref.shape[1])
    p_values = np.empty(x_ref.shape[1])
    for f in range(x_ref.shape[1]):
        result = ks_2samp(x_ref[:, f], x[:, f], alternative="two-sided", method="asymp")
        statistics[f], p_values[f] = result.statistic, result.pvalue
    return statistics, p_values


def _numeric_tests(
    reference: pd.DataFrame, live: pd.DataFrame, contract: Contract
) -> dict[str, tuple[str, float, float, float]]:
    names = list(contract.numeric_names)
    if not names:
        return {}
    x_ref = reference[names].to_numpy(dtype=np.float64)
    x = live[names].to_numpy(dtype=np.float64)
    statistics, p_values = _ks_tests(x_ref, x)
    return {
        name: ("numeric", statistics[i], p_values[i], statistics[i]) for i, name in enumerate(names)
    }


def _score_test(
    reference_scores: np.ndarray, live_scores: np.ndarray
) -> tuple[str, float, float, float]:
    statistics, p_values = _ks_tests(reference_scores.reshape(-1, 1), live_scores.reshape(-1, 1))
    return ("score", statistics[0], p_values[0], statistics[0])


def _categorical_tests(
    reference: pd.DataFrame, live: pd.DataFrame, contract: Contract
) -> dict[str, tuple[str, float, float, float]]:
    values = _categorical_values(contract)
    if not values:
        return {}
    codes_ref = _category_codes(reference, values)
    codes = _category_codes(live, values)
    tests = {}
    for i, (name, known) in enumerate(values.items()):
        bins = len(known) + 1
        counts = np.vstack(
            (
                np.bincount(codes_ref[:, i], minlength=bins),
                np.bincount(codes[:, i], minlength=bins),
            )
        )
        # Only the categories seen in either window (alibi-detect's ChiSquareDrift does the same):
        # an empty column in the contingency table has no expected count, which scipy rejects.
        result = chi2_contingency(counts[:, counts.sum(axis=0) > 0])
        shares_ref = counts[0] / len(codes_ref)
        shares = counts[1] / len(codes)
        total_variation = 0.5 * float(np.abs(shares_ref - shares).sum())
        tests[name] = ("categorical", result.statistic, result.pvalue, total_variation)
    return tests


def _categorical_values(contract: Contract) -> dict[str, tuple[str, ...]]:
    """The values of each feature tested as categorical, in contract order: a category's
    canonical values, a boolean's :data:`BOOLEAN_VALUES`."""
    return {
        feature.name: (BOOLEAN_VALUES if feature.kind == "boolean" else tuple(feature.categories))
        for feature in contract.of_kind("category", "boolean")
    }


def _category_codes(frame: pd.DataFrame, values: Mapping[str, tuple[str, ...]]) -> np.ndarray:
    """Integer codes per categorical feature: the contract's value order, then one unseen code
    (a boolean's false is 0, true 1)."""
    columns = []
    for name, known in values.items():
        column = frame[name]
        if known is BOOLEAN_VALUES:
            # Truthiness of each value, as bool(v): validated to be booleans or numbers 0 and 1.
            columns.append(column.to_numpy().astype(bool).astype(np.int64))
            continue
        codes = pd.Categorical(column.astype(object), categories=known).codes.astype(np.int64)
        columns.append(np.where(codes < 0, len(known), codes))
    return np.column_stack(columns)


@dataclass(frozen=True)
class MMDResult:
    """The outcome of :func:`mmd_permutation_test`.

    ``distance`` is the unbiased MMD² of the two samples; ``p_value`` is ``(1 + k) / (1 +
    n_permutations)`` where ``k`` permutations have an MMD² of at least ``distance`` (never 0,
    so a multiple-testing correction can use it; alibi-detect reports ``k / n_permutations``);
    ``distance_threshold`` the MMD² above which the test flags drift at the given level (from
    the permutations, as alibi-detect reports it); ``sigma`` the Gaussian kernel's bandwidth.

    ``witness_ks`` is the test's effect size, on the scale of the univariate ones: the KS
    statistic between the two samples' values of the (leave-one-out) witness function, the mean
    kernel similarity of a row to the live rows minus that to the reference rows. The witness is
    the direction in which the windows differ most in the kernel's feature space, and its KS
    statistic the largest share of rows that a threshold on it tells apart: about 0.03-0.08
    between samples of one distribution of 1,000 rows each, whatever the number of features.
    """

    p_value: float
    distance: float
    distance_threshold: float
    sigma: float
    n_permutations: int
    witness_ks: float


def mmd_permutation_test(
    x_ref: np.ndarray,
    x: np.ndarray,
    *,
    n_permutations: int = MMD_PERMUTATIONS,
    p_val: float = 0.05,
    seed: int = 0,
) -> MMDResult:
    """Maximum mean discrepancy permutation test of ``x`` (rows) against ``x_ref`` (rows).

    The test of alibi-detect's ``MMDDrift`` with its defaults: a Gaussian RBF kernel
    ``exp(-|a - b|² / (2 sigma²))`` whose bandwidth ``sigma`` is the median heuristic on the
    reference (``sqrt(median / 2)`` of the squared distances between distinct reference rows,
    the lower median when their number is even), the unbiased MMD² (kernel diagonal left out),
    and a p-value from ``n_permutations`` random relabellings of the pooled rows: one plus the
    number whose MMD² is at least the observed one, over one plus ``n_permutations`` (the
    observed labelling counts as one of the permutations). The permutations are those that
    ``np.random.seed(seed)`` followed by ``np.random.permutation`` draws (alibi-detect uses
    NumPy's global generator), here from a private ``RandomState``, so NumPy's global state is
    left alone. The kernel matrix is computed once, in float64, and every permutation's MMD²
    comes from one matrix product of the kernel with the permutations' group indicators.
    """
    x_ref = _mmd_sample("x_ref", x_ref)
    x = _mmd_sample("x", x)
    if x_ref.shape[1] != x.shape[1]:
        raise ValueError(
            f"x_ref and x need the same columns, got {x_ref.shape[1]} and {x.shape[1]}"
        )
    if (
        not isinstance(n_permutations, int)
        or isinstance(n_permutations, bool)
        or n_permutations < 1
    ):
        raise ValueError(f"n_permutations must be an integer of at least 1, got {n_permutations!r}")
    if not (isinstance(p_val, int | float) and 0.0 < p_val < 1.0):
        raise ValueError(f"p_val must be a number between 0 and 1 (exclusive), got {p_val!r}")
    n, m = len(x_ref), len(x)
    pooled = np.concatenate([x_ref, x])
    kernel, sigma = _rbf_kernel_matrix(pooled, n)

    # Column 0 marks the observed reference rows, column j the rows that permutation j puts in
    # the reference's place; the statistic of each column is a quadratic form of the kernel.
    # The legacy generator, seeded as alibi-detect's global one is, draws its permutations.
    permutations = np.random.RandomState(seed)
    in_ref = np.zeros((n + m, n_permutations + 1))
    in_ref[:n, 0] = 1.0
    for j in range(1, n_permutations + 1):
        in_ref[permutations.permutation(n + m)[:n], j] = 1.0
    in_live = 1.0 - in_ref
    kernel_ref = kernel @ in_ref  # row i, column j: sum of k(i, r) over column j's reference rows
    row_sums = kernel.sum(axis=1)
    kernel_live = row_sums[:, None] - kernel_ref
    sum_ref_ref = np.einsum("ij,ij->j", in_ref, kernel_ref)
    sum_live_live = np.einsum("ij,ij->j", in_live, kernel_live)
    sum_live_ref = np.einsum("ij,ij->j", in_live, kernel_ref)
    mmd2 = (
        sum_ref_ref / (n * (n - 1)) + sum_live_live / (m * (m - 1)) - 2.0 * sum_live_ref / (n * m)
    )
    observed, permuted = float(mmd2[0]), mmd2[1:]
    # The witness at each row, leaving the row itself out (the kernel's diagonal is zero).
    is_live = np.arange(n + m) >= n
    to_ref = kernel_ref[:, 0] / (n - ~is_live)
    to_live = (row_sums - kernel_ref[:, 0]) / (m - is_live)
    witness = to_live - to_ref
    return MMDResult(
        p_value=float((1 + np.count_nonzero(observed <= permuted)) / (n_permutations + 1)),
        distance=observed,
        distance_threshold=float(np.sort(permuted)[::-1][int(p_val * n_permutations)]),
        sigma=sigma,
        n_permutations=n_permutations,
        witness_ks=float(ks_2samp(witness[:n], witness[n:], method="asymp").statistic),
    )


def _mmd_sample(side: str, values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{side} must be two-dimensional (rows, columns), got shape {array.shape}")
    if len(array) < 2:
        raise ValueError(f"{side} needs at least 2 rows for the unbiased MMD², got {len(array)}")
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise ValueError(f"{side} has {bad} NaN or infinite values")
    return array


def _rbf_kernel_matrix(pooled: np.ndarray, n_ref: int) -> tuple[np.ndarray, float]:
    """The Gaussian kernel matrix of all pooled rows with a zero diagonal, and its bandwidth
    (the median heuristic on the first ``n_ref`` rows, as alibi-detect infers it)."""
    squares = np.einsum("ij,ij->i", pooled, pooled)
    distances = pooled @ pooled.T
    distances *= -2.0
    distances += squares[:, None]
    distances += squares[None, :]
    np.fill_diagonal(distances, 0.0)
    # alibi-detect's clip: it keeps rounding from making a squared distance negative.
    np.clip(distances, 1e-30, 1e30, out=distances)
    # alibi-detect sorts the n x n reference distances (diagonal included) and takes the element
    # at n + (n² - n) // 2 - 1: past the n zeros of the diagonal, the lower median of the
    # distances between distinct rows, each counted twice.
    reference = distances[:n_ref, :n_ref].ravel()
    rank = n_ref + (n_ref * n_ref - n_ref) // 2 - 1
    sigma = math.sqrt(0.5 * float(np.partition(reference, rank)[rank]))
    distances *= -1.0 / (2.0 * sigma * sigma)
    kernel = np.exp(distances, out=distances)
    np.fill_diagonal(kernel, 0.0)
    return kernel, sigma


def _mmd_test(
    reference: pd.DataFrame,
    live: pd.DataFrame,
    mmd_sample: int,
    threshold: float,
    seed: int,
    transformer: _Transformer | None,
    contract: Contract,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows = min(mmd_sample, len(reference), len(live))
    ref_sample = reference.iloc[np.sort(rng.choice(len(reference), size=rows, replace=False))]
    live_sample = live.iloc[np.sort(rng.choice(len(live), size=rows, replace=False))]
    if transformer is None:
        x_ref = _standardised(reference, ref_sample, contract)
        x = _standardised(reference, live_sample, contract)
    else:
        x_ref = np.asarray(transformer.transform(ref_sample), dtype=np.float32)
        x = np.asarray(transformer.transform(live_sample), dtype=np.float32)
        if not (np.isfinite(x_ref).all() and np.isfinite(x).all()):
            raise ValueError("transformer.transform produced NaN or infinite values")
    permutation_seed = int(rng.integers(2**32 - 1))
    result = mmd_permutation_test(
        x_ref, x, n_permutations=REPORT_MMD_PERMUTATIONS, p_val=threshold, seed=permutation_seed
    )
    # The corrected p-value, the floor and the verdict join once the whole family is known.
    return {
        "detector": "mmd",
        "p_value": result.p_value,
        "distance": result.distance,
        "distance_threshold": result.distance_threshold,
        "effect_size": result.witness_ks,
        "effect_metric": _EFFECT_METRICS[MULTIVARIATE],
        "sample_rows": rows,
        "n_permutations": result.n_permutations,
    }


def _standardised(reference: pd.DataFrame, sample: pd.DataFrame, contract: Contract) -> np.ndarray:
    """Integer and number features scaled by the whole reference's mean and spread, then
    one-hot categories and booleans (one column per value and one for unseen values)."""
    names = list(contract.numeric_names)
    numeric_ref = reference[names].to_numpy(dtype=np.float64)
    means = numeric_ref.mean(axis=0)
    spreads = numeric_ref.std(axis=0)
    spreads[spreads == 0] = 1.0
    parts = [(sample[names].to_numpy(dtype=np.float64) - means) / spreads]
    values = _categorical_values(contract)
    if values:
        codes = _category_codes(sample, values)
        parts += [
            (codes[:, i, None] == np.arange(len(known) + 1)).astype(np.float64)
            for i, known in enumerate(values.values())
        ]
    return np.hstack(parts).astype(np.float32)
