"""Start-up: assets with nothing to work on yet wait (a successful run, no materialisation, an
observation saying what they wait for) instead of failing, on real DuckDB files and the real
registry, through Dagster's own ``materialize`` on the real definitions' assets."""

import dagster as dg
import pytest

from churn_assets.assets.ml import ml_asset_checks, ml_assets
from churn_assets.assets.monitoring import monitoring_assets, monitoring_checks
from churn_assets.assets.waiting import WAITING_FOR
from churn_assets.config import load_settings
from churn_assets.resources import PlatformResource
from churn_assets.warehouse import connect, ensure_schema
from tests.ml_fixtures import small_frames, write_landed

pytestmark = [pytest.mark.integration]

# What training_job and monitoring_job run: each a run of its own, as the platform launches them.
TRAINING = [*ml_assets, *ml_asset_checks]
MONITORING = [*monitoring_assets, *monitoring_checks]


def materialize_all(
    settings_path, instance: dg.DagsterInstance
) -> tuple[list[dg.ExecuteInProcessResult], dict[str, str]]:
    """A training run, then a monitoring run: their results and each step's outcome."""
    steps: dict[str, str] = {}
    results = []
    for assets in (TRAINING, MONITORING):
        result = dg.materialize(
            assets,
            resources={"platform": PlatformResource(config_path=str(settings_path))},
            instance=instance,
            raise_on_error=False,
        )
        results.append(result)
        steps.update(outcome(result))
    return results, steps


def waiting_messages(instance: dg.DagsterInstance, key: str) -> list[str]:
    """What the asset's observations in ``instance`` say it waits for, newest first."""
    records = instance.fetch_observations(dg.AssetKey(key), limit=10).records
    return [
        record.asset_observation.metadata[WAITING_FOR].value
        for record in records
        if record.asset_observation is not None and WAITING_FOR in record.asset_observation.metadata
    ]


def outcome(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """Each step's outcome: success, skipped or failure."""
    kinds = {"STEP_SUCCESS": "success", "STEP_SKIPPED": "skipped", "STEP_FAILURE": "failure"}
    return {
        event.step_key: kinds[event.event_type_value]
        for event in result.all_events
        if event.event_type_value in kinds and event.step_key is not None
    }


def failed_runs(instance: dg.DagsterInstance) -> list[str]:
    return [
        record.dagster_run.run_id
        for record in instance.get_run_records(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE])
        )
    ]


def test_on_an_empty_warehouse_every_asset_waits_and_no_run_fails(settings_path):
    settings = load_settings(settings_path)
    with connect(settings.warehouse_path) as con:
        ensure_schema(con)  # the landing assets' empty tables, as at the first start
    with dg.instance_for_test() as instance:
        results, steps = materialize_all(settings_path, instance)

        assert all(result.success for result in results), steps
        assert failed_runs(instance) == []
        assert [r.get_asset_materialization_events() for r in results] == [[], []]
        # The assets whose input is missing ran and waited ...
        for key in ("customer_features", "training_set", "live_performance"):
            assert steps[key] == "success", (key, steps)
        assert waiting_messages(instance, "customer_features")[0].startswith(
            "landed customer events"
        )
        assert waiting_messages(instance, "training_set")[0].startswith("landed customer events")
        assert waiting_messages(instance, "live_performance")[0].startswith("landed predictions")
        for key in ("drift_report", "outlier_report"):
            assert waiting_messages(instance, key)[0].startswith("a champion model"), key
        # ... and nothing that needs them ran on nothing: training stopped before the model.
        for key in ("candidate_model", "registered_model", "feature_importance"):
            assert steps[key] == "skipped", (key, steps)
        assert not any(status == "success" for key, status in steps.items() if "gate" in key)
        assert not settings.registry_dir.exists() or not any(settings.registry_dir.iterdir())
        for key in ("drift_report", "outlier_report"):
            assert steps[key] == "success", (key, steps)


def test_with_events_but_no_outcomes_training_waits_for_outcomes(settings_path):
    settings = load_settings(settings_path)
    events, feedback = small_frames(customers=300, days=10)
    write_landed(settings, events, feedback.iloc[:0])
    with dg.instance_for_test() as instance:
        results, steps = materialize_all(settings_path, instance)

        assert all(result.success for result in results), steps
        assert failed_runs(instance) == []
        materialized = {
            event.asset_key.to_user_string()
            for result in results
            for event in result.get_asset_materialization_events()
        }
        assert materialized == {"customer_features"}
        assert waiting_messages(instance, "training_set")[0].startswith("landed outcomes")
        assert waiting_messages(instance, "live_performance")[0].startswith("landed predictions")
        assert steps["candidate_model"] == "skipped"
