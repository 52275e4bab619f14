"""The ML assets on the real definitions, real DuckDB files and the real registry."""

from datetime import timedelta

import dagster as dg
import duckdb
import pytest

from churn_assets.assets.ml import ml_asset_checks, ml_assets
from churn_assets.calibration import CALIBRATION_COLUMNS
from churn_assets.config import load_settings
from churn_assets.kafka import make_producer
from churn_assets.landing import Lander
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.schemas import Topics
from churn_assets.simulator import SimulationConfig, Simulator, produce_simulation
from churn_assets.warehouse import load_read_model, read_model_path
from tests.ml_fixtures import small_frames, write_landed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def materialize(settings_path, **run_config):
    return dg.materialize(
        [*ml_assets, *ml_asset_checks],
        resources={"platform": PlatformResource(config_path=str(settings_path))},
        run_config=run_config or None,
        raise_on_error=False,
    )


def materialization(result, key):
    for event in result.get_asset_materialization_events():
        if event.materialization.asset_key.to_user_string() == key:
            return event.materialization.metadata
    return None


def check_results(result):
    return {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_default_simulation_through_kafka_trains_a_v1_near_the_known_best(
    broker_settings, settings_path
):
    """Acceptance: the simulator's default run, landed from Kafka, gives a registered v1."""
    defaults = broker_settings.simulator
    config = SimulationConfig(
        seed=defaults.seed,
        customers=defaults.customers,
        days=defaults.days,
        start_date=defaults.start_date,
    )
    produce_simulation(make_producer(broker_settings), Simulator(config))
    for topic in (Topics.CUSTOMERS, Topics.FEEDBACK):
        assert Lander(broker_settings, topic).run().reached_eof

    result = materialize(settings_path)
    assert result.success
    candidate = materialization(result, "candidate_model")
    auc = candidate["test_roc_auc"].value
    best = candidate["simulator_best_auc"].value
    baseline = candidate["baseline_roc_auc"].value
    print(f"default run: test AUC {auc:.4f}, known best {best:.4f}, baseline {baseline:.4f}")
    assert abs(best - auc) <= 0.02
    assert auc >= baseline + 0.015
    assert "data:image/png;base64" in candidate["calibration"].value
    assert "| decile |" in candidate["lift_by_decile"].value

    registered = materialization(result, "registered_model")
    assert (registered["version"].value, registered["alias"].value) == ("v1", "champion")
    registry = ModelRegistry(broker_settings.registry_dir)
    assert registry.aliases() == {"champion": "v1"}
    assert registry.get("v1").metadata["metrics"]["test_roc_auc"] == pytest.approx(auc)

    checks = check_results(result)
    assert checks and all(c.passed for c in checks.values())
    importance = load_read_model(broker_settings.read_models_dir, "feature_importance")
    assert importance["feature"].iloc[0] in {
        "contract_type",
        "support_tickets",
        "customer_tenure",
        "internet_service",
    }
    segments = load_read_model(broker_settings.read_models_dir, "customer_segments")
    tiers = segments.loc[segments["cohort_type"] == "risk_tier"].set_index("cohort")
    assert tiers.loc["high", "observed_churn_rate"] > tiers.loc["low", "observed_churn_rate"]

    # Like with like: v1's 14-day predicted rate beside the realised 14-day churn of the same
    # customers, within the calibration error band in every score decile.
    path = read_model_path(broker_settings.read_models_dir, "calibration")
    with duckdb.connect() as con:
        types = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()
    assert {name: kind for name, kind, *_ in types} == CALIBRATION_COLUMNS
    calibration = load_read_model(broker_settings.read_models_dir, "calibration")
    assert list(calibration.columns) == list(CALIBRATION_COLUMNS)
    deciles = calibration.loc[calibration["grouping"] == "decile"]
    print(deciles.drop(columns=["grouping", "model_version"]).round(4).to_string(index=False))
    assert list(deciles["group_label"]) == [str(i) for i in range(1, 11)]
    assert set(calibration["model_version"]) == {"v1"}
    assert set(calibration["horizon_days"]) == {broker_settings.training.horizon_days}
    gaps = (deciles["observed_rate"] - deciles["predicted_rate"]).abs()
    assert (gaps <= deciles["tolerance"]).all(), deciles
    assert deciles["predicted_rate"].is_monotonic_increasing
    assert deciles["observed_rate"].iloc[-1] > 10 * deciles["observed_rate"].iloc[0]
    assert 500 <= deciles["customers"].min() <= deciles["customers"].max() <= 1_500
    assert "contract_type=month-to-month" in set(calibration["group_label"])
    assert materialization(result, "calibration")["deciles_outside_tolerance"].value == 0


def test_more_data_gives_a_v2_challenger_and_a_bad_candidate_is_blocked(settings_path):
    settings = load_settings(settings_path)
    events, feedback = small_frames(customers=3000, days=120)
    cut = events["event_time"].min().floor("D") + timedelta(days=90)
    write_landed(
        settings, events[events["event_time"] < cut], feedback[feedback["observed_at"] < cut]
    )
    first = materialize(settings_path)
    assert first.success
    assert materialization(first, "registered_model")["version"].value == "v1"

    write_landed(
        settings, events[events["event_time"] >= cut], feedback[feedback["observed_at"] >= cut]
    )
    second = materialize(settings_path)
    assert second.success
    registered = materialization(second, "registered_model")
    assert (registered["version"].value, registered["alias"].value) == ("v2", "challenger")
    candidate = materialization(second, "candidate_model")
    assert candidate["champion_version"].value == "v1"
    registry = ModelRegistry(settings.registry_dir)
    assert registry.get("v2").parent_version == "v1"
    assert registry.aliases() == {"champion": "v1", "challenger": "v2"}

    bad = materialize(settings_path, ops={"candidate_model": {"config": {"shuffle_labels": True}}})
    assert not bad.success
    assert materialization(bad, "registered_model") is None
    checks = check_results(bad)
    auc_gate = checks["candidate_model_auc_above_threshold"]
    assert not auc_gate.passed
    assert auc_gate.metadata["observed"].value < 0.6
    assert auc_gate.metadata["threshold"].value == settings.retraining.performance_threshold
    assert not checks["candidate_model_not_worse_than_champion"].passed
    assert [v.version for v in registry.versions()] == ["v1", "v2"]
