"""Outlier detectors: calibrated flag rates, extreme rows, safe and exact round trips."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from churn_assets.features import FeatureTransformer
from churn_assets.model import ScoringModel
from churn_assets.outliers import (
    OUTLIER_FILE,
    REFERENCE_FILE,
    IsolationForestDetector,
    MahalanobisDetector,
    OutlierError,
    load_outlier_scorer,
    load_reference_frame,
    reference_files,
)
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.simulator import sample_customers

pytestmark = pytest.mark.unit

TRAIN_ROWS = 20_000
HELD_OUT_ROWS = 20_000
SAMPLE_ROWS = 5_000
SEED = 7
EXTREME = {"monthly_charges": 800.0, "support_tickets": 40, "login_frequency": 900.0}


@pytest.fixture(scope="module")
def train():
    return sample_customers(TRAIN_ROWS, seed=SEED)


@pytest.fixture(scope="module")
def held_out():
    return sample_customers(HELD_OUT_ROWS, seed=SEED + 1000)


@pytest.fixture(scope="module")
def transformer(train):
    return FeatureTransformer.fit(train)


@pytest.fixture(scope="module")
def files(transformer, train):
    return reference_files(transformer, train, 0.01, SEED, sample_rows=SAMPLE_ROWS)


@pytest.fixture(scope="module")
def scorer(transformer, files):
    return load_outlier_scorer(transformer, files)


def _flag_rate_tolerance(contamination: float) -> float:
    """Three standard errors of the held-out flag rate.

    Two sources: the binomial noise of the held-out rate, and the noise of the threshold, an
    empirical quantile of the reference scores (the smaller reference, the isolation forest's
    sample, bounds both detectors).
    """
    spread = math.sqrt(contamination * (1 - contamination))
    return 3 * spread * math.sqrt(1 / HELD_OUT_ROWS + 1 / SAMPLE_ROWS)


@pytest.mark.parametrize("contamination", [0.01, 0.05])
def test_flag_rate_on_held_out_normal_rows_is_about_the_contamination(
    transformer, train, held_out, contamination
):
    scorer = load_outlier_scorer(
        transformer,
        reference_files(transformer, train, contamination, SEED, sample_rows=SAMPLE_ROWS),
    )
    x = transformer.transform(held_out)
    tolerance = _flag_rate_tolerance(contamination)
    for name, (_, flags) in {
        "mahalanobis": scorer.score_mahalanobis(x),
        "isolation_forest": scorer.score_isolation_forest(x),
    }.items():
        rate = float(flags.mean())
        assert abs(rate - contamination) <= tolerance, (name, rate, contamination, tolerance)


def test_extreme_rows_are_flagged_by_both_detectors(transformer, held_out, scorer):
    extreme = held_out.head(50).assign(**EXTREME)
    x = transformer.transform(extreme)
    m_scores, m_flags = scorer.score_mahalanobis(x)
    f_scores, f_flags = scorer.score_isolation_forest(x)
    assert m_flags.all() and f_flags.all()
    assert m_scores.min() > scorer.mahalanobis.threshold
    assert f_scores.min() > scorer.isolation_forest.threshold


def test_scores_are_per_row_and_single_rows_match_batches(transformer, held_out, scorer):
    x = transformer.transform(held_out.head(20))
    batch_m, _ = scorer.score_mahalanobis(x)
    batch_f, _ = scorer.score_isolation_forest(x)
    assert batch_m.shape == batch_f.shape == (20,)
    single_m = np.concatenate([scorer.score_mahalanobis(row)[0] for row in x])
    single_f = np.concatenate([scorer.score_isolation_forest(x[i : i + 1])[0] for i in range(20)])
    # BLAS may sum a single row and a batch in another order: equal to ~1e-12.
    np.testing.assert_allclose(single_m, batch_m, rtol=1e-9)
    np.testing.assert_allclose(single_f, batch_f, rtol=1e-9)


def test_mahalanobis_is_the_plain_distance(transformer, train):
    x = transformer.transform(train.head(2000)).astype(np.float64)
    detector = MahalanobisDetector.fit(x, 0.01)
    # One-hot groups make the plain covariance singular; the regularised one is what is stored.
    covariance = np.cov(x, rowvar=False, bias=True) + 1e-6 * np.eye(x.shape[1])
    centred = x[:5] - x.mean(axis=0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", centred, np.linalg.inv(covariance), centred))
    np.testing.assert_allclose(detector.score(x[:5]), expected, rtol=1e-6)
    assert np.all(np.isfinite(detector.score(x)))


def test_mahalanobis_json_round_trip_gives_identical_scores(transformer, held_out, scorer):
    detector = scorer.mahalanobis
    again = MahalanobisDetector.from_json(detector.to_json())
    assert again == detector
    x = transformer.transform(held_out.head(1000))
    np.testing.assert_array_equal(again.score(x), detector.score(x))


def test_files_round_trip_gives_identical_scores(transformer, train, held_out, files, scorer):
    reference = load_reference_frame(files)
    assert list(reference.columns) == list(FEATURE_NAMES)
    expected = train.loc[_sample_index(train, SEED, SAMPLE_ROWS), list(FEATURE_NAMES)]
    pd.testing.assert_frame_equal(reference, expected.reset_index(drop=True))
    copied = {name: bytes(bytearray(data)) for name, data in files.items()}
    again = load_outlier_scorer(transformer, copied)
    x = transformer.transform(held_out.head(2000))
    for method in ("score_mahalanobis", "score_isolation_forest"):
        first_scores, first_flags = getattr(scorer, method)(x)
        second_scores, second_flags = getattr(again, method)(x)
        np.testing.assert_array_equal(first_scores, second_scores)
        np.testing.assert_array_equal(first_flags, second_flags)
    assert again.isolation_forest.threshold == scorer.isolation_forest.threshold


def _sample_index(frame, seed, rows):
    """The rows :func:`reference_files` samples (seeded, without replacement, in order)."""
    chosen = np.random.default_rng(seed).choice(len(frame), size=rows, replace=False)
    return frame.index[np.sort(chosen)]


def test_isolation_forest_refit_is_deterministic(transformer, held_out, files):
    x = transformer.transform(held_out.head(2000))
    first = load_outlier_scorer(transformer, files).score_isolation_forest(x)[0]
    second = load_outlier_scorer(transformer, files).score_isolation_forest(x)[0]
    np.testing.assert_array_equal(first, second)
    reference = transformer.transform(load_reference_frame(files))
    other_seed = IsolationForestDetector(reference, 0.01, SEED + 1).score(x)
    assert not np.array_equal(first, other_seed)


def test_reference_files_are_deterministic(transformer, train, files):
    assert reference_files(transformer, train, 0.01, SEED, sample_rows=SAMPLE_ROWS) == files


def test_files_are_parquet_and_json_never_pickle(files):
    assert set(files) == {REFERENCE_FILE, OUTLIER_FILE}
    parquet = files[REFERENCE_FILE]
    assert parquet[:4] == b"PAR1" and parquet[-4:] == b"PAR1"
    document = json.loads(files[OUTLIER_FILE])
    assert document["contamination"] == 0.01 and document["seed"] == SEED
    assert set(document["mahalanobis"]) == {"mean", "precision", "threshold"}
    for data in files.values():
        assert not data.startswith(b"\x80")  # the pickle protocol 2+ opcode


def test_scoring_model_round_trip_keeps_the_extra_files(transformer, train, held_out, files):
    x = transformer.transform(train.head(500))
    booster = xgb.train(
        {"objective": "binary:logistic", "seed": SEED, "nthread": 1},
        xgb.DMatrix(x, label=train["label"].head(500).to_numpy()),
        num_boost_round=3,
    )
    model = ScoringModel(booster=booster, transformer=transformer, extra_files=dict(files))
    stored = model.to_files()
    assert set(stored) == {
        "model.ubj",
        "transformer.json",
        "contract.json",
        REFERENCE_FILE,
        OUTLIER_FILE,
    }
    again = ScoringModel.from_files(stored)
    assert again.extra_files == files
    assert again.to_files() == stored
    reloaded = load_outlier_scorer(again.transformer, again.extra_files)
    sample = transformer.transform(held_out.head(100))
    np.testing.assert_array_equal(
        reloaded.score_mahalanobis(sample)[0],
        load_outlier_scorer(transformer, files).score_mahalanobis(sample)[0],
    )


def test_extra_files_cannot_shadow_the_model_artefacts(transformer, train):
    x = transformer.transform(train.head(100))
    booster = xgb.train(
        {"objective": "binary:logistic", "seed": SEED, "nthread": 1},
        xgb.DMatrix(x, label=train["label"].head(100).to_numpy()),
        num_boost_round=1,
    )
    model = ScoringModel(booster=booster, transformer=transformer, extra_files={"model.ubj": b"x"})
    with pytest.raises(ValueError, match="reserved"):
        model.to_files()


def test_mismatched_or_missing_artefacts_are_clear_errors(transformer, files):
    with pytest.raises(OutlierError, match=REFERENCE_FILE):
        load_outlier_scorer(transformer, {OUTLIER_FILE: files[OUTLIER_FILE]})
    with pytest.raises(OutlierError, match=OUTLIER_FILE):
        load_outlier_scorer(transformer, {REFERENCE_FILE: files[REFERENCE_FILE]})
    document = json.loads(files[OUTLIER_FILE])
    document["columns"] = document["columns"][:-1]
    with pytest.raises(OutlierError, match="columns"):
        load_outlier_scorer(transformer, {**files, OUTLIER_FILE: json.dumps(document).encode()})
    with pytest.raises(OutlierError, match="contamination"):
        MahalanobisDetector.fit(np.zeros((10, 3)), 0.7)
