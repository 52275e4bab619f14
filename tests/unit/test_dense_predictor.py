"""The direct C-API predictor scores exactly as ``Booster.inplace_predict``."""

import numpy as np
import pytest
import xgboost as xgb

from churn_assets.model import ONE_THREAD_ROWS, DensePredictor


@pytest.fixture(scope="module")
def booster() -> xgb.Booster:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan  # missing values take the trees' default branch
    y = (x[:, 0] - x[:, 2] + rng.normal(size=600) > 0).astype(int)
    trained = xgb.train(
        {"objective": "binary:logistic", "max_depth": 4, "nthread": 1, "seed": 7},
        xgb.DMatrix(x, y),
        num_boost_round=40,
    )
    trained.set_param({"nthread": 1})
    return trained


@pytest.mark.parametrize("rows", [1, 2, 17, ONE_THREAD_ROWS, 500])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_answers_as_inplace_predict(booster, rows, dtype):
    rng = np.random.default_rng(rows)
    x = rng.normal(scale=2.0, size=(rows, 6)).astype(dtype)
    x[rng.random(x.shape) < 0.1] = np.nan
    direct = DensePredictor(booster)(x)
    expected = np.asarray(booster.inplace_predict(x), dtype=float)
    assert direct.dtype == np.float64
    assert direct.shape == expected.shape == (rows,)
    np.testing.assert_array_equal(direct, expected)


def test_answers_are_copies_not_xgboost_buffers(booster):
    predict = DensePredictor(booster)
    x = np.zeros((3, 6), dtype=np.float32)
    first = predict(x)
    kept = first.copy()
    predict(np.full((3, 6), 5.0, dtype=np.float32))  # reuses XGBoost's answer buffer
    np.testing.assert_array_equal(first, kept)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((4, 6), dtype=np.float16),  # another dtype
        np.zeros((6, 4), dtype=np.float32).T,  # not C-contiguous
        np.zeros((4, 12), dtype=np.float32)[:, ::2],  # a strided view
        np.zeros((0, 6), dtype=np.float32),  # no rows
    ],
    ids=["float16", "transposed", "strided", "empty"],
)
def test_other_matrices_go_through_inplace_predict(booster, x):
    np.testing.assert_array_equal(
        DensePredictor(booster)(x), np.asarray(booster.inplace_predict(x), dtype=float)
    )


def test_wrong_width_is_refused_as_xgboost_refuses_it(booster):
    with pytest.raises(ValueError, match="Feature shape mismatch, expected: 6, got 5"):
        DensePredictor(booster)(np.zeros((2, 5), dtype=np.float32))
