import numpy as np
import pytest

from churn_assets.candidate import Candidate, evaluate_gates, parity_gate, train_candidate
from churn_assets.config import load_settings
from churn_assets.explain import ShapExplainer
from churn_assets.model import BOOSTER_FILE, ScoringModel, load_model
from churn_assets.registry import ModelRegistry, TamperedArtifactError
from churn_assets.training import (
    TrainingError,
    build_training_set,
    evaluate,
    plan_snapshots,
)
from tests.ml_fixtures import small_frames

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def training_set():
    events, feedback = small_frames(customers=2000, days=90)
    return build_training_set(events, feedback, horizon_days=14, step_days=3, label_grace_days=10)


@pytest.fixture(scope="module")
def settings():
    return load_settings()


@pytest.fixture(scope="module")
def candidate(training_set, settings) -> Candidate:
    return train_candidate(training_set, settings)


def test_split_is_by_time_with_purging(training_set):
    plan = training_set.plan
    horizon = np.timedelta64(training_set.horizon_days, "D")
    assert max(plan.train) + horizon <= min(plan.validation)
    assert max(plan.validation) + horizon <= min(plan.test)
    frame = training_set.frame
    assert set(frame["label"]) == {0, 1}
    for split, times in (("train", plan.train), ("test", plan.test)):
        assert set(frame.loc[frame["split"] == split, "snapshot_time"]) <= set(times)


def test_too_little_history_is_a_clear_error():
    events, feedback = small_frames(customers=200, days=30)
    with pytest.raises(TrainingError, match="not enough history"):
        build_training_set(events, feedback, horizon_days=14, step_days=3, label_grace_days=10)


def test_candidate_beats_baseline_and_approaches_the_known_best(candidate):
    metrics = candidate.report["metrics"]
    assert metrics["test_roc_auc"] > candidate.report["baseline"]["roc_auc"]
    assert metrics["test_roc_auc"] > candidate.report["simulator_best_auc"] - 0.04
    assert metrics["test_calibration_error"] < 0.05


def test_retraining_with_the_same_seed_gives_the_same_metrics(training_set, settings, candidate):
    again = train_candidate(training_set, settings)
    assert again.report["metrics"] == candidate.report["metrics"]
    assert again.report["data_fingerprint"] == candidate.report["data_fingerprint"]
    assert again.model.to_files()[BOOSTER_FILE] == candidate.model.to_files()[BOOSTER_FILE]


def test_shuffled_labels_fail_the_auc_gate(training_set, settings):
    bad = train_candidate(training_set, settings, shuffle_labels=True)
    gates = evaluate_gates(bad, settings)
    assert not gates["auc"].passed
    assert gates["auc"].observed < 0.6


def test_gates_pass_for_a_good_candidate(candidate, settings, training_set):
    gates = evaluate_gates(candidate, settings)
    assert all(g.passed for g in gates.values()), gates
    assert parity_gate(candidate, training_set.part("test").head(200)).passed


def test_evaluation_figures_are_consistent():
    rng = np.random.default_rng(0)
    p = rng.random(5000)
    y = (rng.random(5000) < p).astype(int)
    result = evaluate(y, p, threshold=0.5)
    confusion = result["confusion"]
    assert sum(confusion.values()) == 5000
    assert result["deciles"][-1]["cumulative_gain"] == pytest.approx(1.0)
    assert result["deciles"][0]["lift"] > 1.5
    assert 0.7 < result["roc_auc"] < 0.9
    with pytest.raises(TrainingError, match="single class"):
        evaluate(np.zeros(10), np.linspace(0, 1, 10), 0.5)


def test_shap_values_plus_base_equal_the_margin(candidate, training_set):
    explainer = ShapExplainer(candidate.model)
    x = candidate.model.transformer.transform(training_set.part("test").head(500))
    contributions = explainer.input_contributions(x)
    margins = candidate.model.margin_matrix(x)
    np.testing.assert_allclose(contributions.sum(axis=1) + explainer.base_value, margins, atol=1e-4)
    explanation = explainer.explain_matrix(x[:1])[0]
    assert len(explanation.top(3)) == 3
    assert set(explanation.contributions) == {
        "customer_tenure",
        "monthly_charges",
        "total_charges",
        "support_tickets",
        "login_frequency",
        "charges_per_tenure_month",
        "charge_ratio",
        "tickets_per_login",
        "contract_type",
        "payment_method",
        "internet_service",
    }
    importance = explainer.global_importance(x)
    assert importance["mean_abs_shap"].is_monotonic_decreasing


def test_registered_model_loads_verified_and_refuses_tampering(candidate, tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    version = registry.register(candidate.model.to_files(), {"metrics": {"test_roc_auc": 0.8}})
    loaded = load_model(registry, version.version)
    x = candidate.model.transformer.transform_records(
        [
            {
                "customer_tenure": 3,
                "monthly_charges": 95.0,
                "total_charges": 285.0,
                "contract_type": "month-to-month",
                "payment_method": "electronic_check",
                "internet_service": "fiber_optic",
                "support_tickets": 4,
                "login_frequency": 5.0,
            }
        ]
    )
    assert loaded.predict_matrix(x) == pytest.approx(candidate.model.predict_matrix(x))

    booster_path = version.path / BOOSTER_FILE
    data = bytearray(booster_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    booster_path.write_bytes(bytes(data))
    with pytest.raises(TamperedArtifactError, match=BOOSTER_FILE):
        load_model(registry, version.version)


def test_snapshot_plan_needs_enough_days():
    import pandas as pd

    start = pd.Timestamp("2026-01-01", tz="UTC")
    plan = plan_snapshots(
        start, start + pd.Timedelta(days=90), horizon_days=14, step_days=3, label_grace_days=10
    )
    assert plan.train[0] == start + pd.Timedelta(days=1)
    assert plan.test[-1] <= start + pd.Timedelta(days=66)


def test_scoring_model_files_are_safe_formats(candidate):
    files = candidate.model.to_files()
    assert set(files) == {
        "model.ubj",
        "transformer.json",
        "baseline.json",
        "contract.json",
        "reference.parquet",
        "outliers.json",
    }
    assert files["transformer.json"].startswith(b"{")
    again = ScoringModel.from_files(files)
    assert again.transformer == candidate.model.transformer
    assert again.contract.digest == candidate.model.contract.digest


def test_bounded_search_is_seeded_and_returns_the_best_trial(training_set, settings):
    from churn_assets.features import FeatureTransformer
    from churn_assets.training import XGBoostParams, search_xgboost, split_xy

    transformer = FeatureTransformer.fit(training_set.part("train"))
    x_train, y_train = split_xy(training_set, transformer, "train")
    x_val, y_val = split_xy(training_set, transformer, "validation")
    base = XGBoostParams(n_estimators=60, early_stopping_rounds=10)
    best, trials = search_xgboost(
        x_train, y_train, x_val, y_val, base, trials=3, seed=5, n_threads=2
    )
    again, trials_again = search_xgboost(
        x_train, y_train, x_val, y_val, base, trials=3, seed=5, n_threads=2
    )
    assert len(trials) == 3 and trials == trials_again and best == again
    top = max(trials, key=lambda t: t["validation_roc_auc"])
    assert best.max_depth == top["max_depth"] and best.learning_rate == top["learning_rate"]
