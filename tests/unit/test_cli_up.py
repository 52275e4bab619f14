"""The pieces of `churn up` that decide what a restart redoes, and `churn rollout status` on a
pending challenger. Real registry folders, real read models (Parquet) and a real Dagster
instance; the whole command runs in tests/integration/test_platform_restart.py."""

import json

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner

from churn_assets.cli import main
from churn_assets.cli_up import (
    reap_interrupted_runs,
    simulation_config,
    simulation_landed,
    training_skip_reason,
)
from churn_assets.config import load_settings
from churn_assets.registry import ModelRegistry
from churn_assets.rollout_control import AUDIT_TABLE, STATE_READ_MODEL
from churn_assets.simulator import SimulationConfig

pytestmark = pytest.mark.unit


def register(registry: ModelRegistry, fingerprint: str, alias: str) -> str:
    version = registry.register({"model.json": b"{}"}, {"data_fingerprint": fingerprint})
    registry.set_alias(alias, version.version)
    return version.version


def write_state(settings, phase: str, challenger: str | None, champion: str = "v1") -> None:
    settings.read_models_dir.mkdir(parents=True, exist_ok=True)
    state = {"phase": phase, "champion": champion, "challenger": challenger, "history": []}
    (settings.read_models_dir / STATE_READ_MODEL).write_text(json.dumps(state))
    pd.DataFrame(
        [
            {
                "decided_at": pd.Timestamp("2026-01-01", tz="UTC"),
                "action": "start_shadow",
                "phase_from": "idle",
                "phase_to": phase,
                "challenger": challenger,
                "traffic": 0.0,
                "reasons": json.dumps(["because"]),
            }
        ]
    ).to_parquet(settings.read_models_dir / f"{AUDIT_TABLE}.parquet")


def status(settings_path, *args):
    return CliRunner().invoke(main, ["--config", str(settings_path), "rollout", "status", *args])


def test_rollout_status_before_any_challenger_is_an_error_naming_what_to_do(settings_path):
    settings = load_settings(settings_path)
    register(ModelRegistry(settings.registry_dir), "a", "champion")
    result = status(settings_path)
    assert result.exit_code == 1
    assert "no rollout yet" in result.output and "champion v1" in result.output


def test_rollout_status_reports_a_registered_challenger_as_pending(settings_path):
    settings = load_settings(settings_path)
    registry = ModelRegistry(settings.registry_dir)
    register(registry, "a", "champion")
    register(registry, "b", "challenger")
    result = status(settings_path)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("phase pending: challenger v2")
    as_json = json.loads(status(settings_path, "--json").output)
    assert as_json["state"]["phase"] == "pending" and as_json["decisions"] == []

    # After a finished rollout, a newly registered challenger is pending too.
    write_state(settings, "promoted", None, champion="v1")
    result = status(settings_path)
    assert "phase pending: challenger v2" in result.output
    assert "before it: phase promoted" in result.output

    # Once the rollout records a decision about it, it is in progress, not pending.
    write_state(settings, "shadow", "v2")
    result = status(settings_path)
    assert result.output.startswith("phase shadow: champion v1, challenger v2"), result.output


def test_training_is_skipped_while_a_rollout_is_pending_or_in_progress(settings_path):
    settings = load_settings(settings_path)
    registry = ModelRegistry(settings.registry_dir)
    assert training_skip_reason(settings) is None  # nothing registered: train
    register(registry, "a", "champion")
    register(registry, "b", "challenger")
    assert "a rollout of v2 is pending" in training_skip_reason(settings)
    write_state(settings, "canary", "v2")
    assert "a rollout of v2 is in progress (phase canary)" in training_skip_reason(settings)


def test_simulation_counts_as_landed_only_when_the_read_models_hold_all_of_it(settings_path):
    from churn_assets.cli_up import _write_simulation_record

    settings = load_settings(settings_path)
    config = simulation_config(settings, customers=50, days=3)
    assert config.id_prefix.startswith("42-") and config.id_prefix != "42-"

    class Summary:
        customer_events = 3
        feedback_events = 1

    assert simulation_landed(settings, config) is None  # no record
    _write_simulation_record(settings, config, Summary())
    settings.read_models_dir.mkdir(parents=True, exist_ok=True)
    events = pd.DataFrame({"event_id": [f"ev-{config.id_prefix}{n}" for n in (1, 2)]})
    events.to_parquet(settings.read_models_dir / "landed_customer_events.parquet")
    pd.DataFrame({"event_id": [f"fb-{config.id_prefix}3"]}).to_parquet(
        settings.read_models_dir / "landed_feedback.parquet"
    )
    assert simulation_landed(settings, config) is None  # one event missing
    events = pd.DataFrame({"event_id": [f"ev-{config.id_prefix}{n}" for n in (1, 2, 4)]})
    events.to_parquet(settings.read_models_dir / "landed_customer_events.parquet")
    assert "3 events and 1 outcomes" in simulation_landed(settings, config)
    # Another simulation (other settings) is another data set.
    assert simulation_landed(settings, simulation_config(settings, customers=51, days=3)) is None


def test_simulations_of_different_shapes_never_share_message_ids():
    default = SimulationConfig(customers=10_000, days=90)
    assert default.id_prefix == "42-"  # the ids earlier releases landed
    shapes = [
        SimulationConfig(customers=2000, days=90),
        SimulationConfig(customers=10_000, days=60),
        SimulationConfig(customers=10_000, days=90, scenario="covariate_drift"),
        SimulationConfig(
            customers=10_000, days=90, scenario="covariate_drift", scenario_start_day=10
        ),
        SimulationConfig(seed=7, customers=10_000, days=90),
    ]
    prefixes = {default.id_prefix, *(shape.id_prefix for shape in shapes)}
    assert len(prefixes) == len(shapes) + 1


@dg.op
def noop() -> None:
    pass


@dg.job
def stuck_job() -> None:
    noop()


def started_run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    """A run of ``stuck_job`` the instance records as started (and nothing executes)."""
    run = instance.create_run_for_job(stuck_job)
    instance.handle_run_event(
        run.run_id,
        dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_START.value, job_name="stuck_job"),
    )
    return run


def test_runs_left_started_by_a_crash_are_canceled_and_their_pool_slots_freed(settings_path):
    settings = load_settings(settings_path)
    home = settings.data_dir / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 1\n")

    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = started_run(instance)
        storage = instance.event_log_storage
        storage.set_concurrency_slots("duckdb_warehouse", 1)
        claim = storage.claim_concurrency_slot("duckdb_warehouse", run.run_id, "noop")
        assert claim.is_claimed
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    reaped = reap_interrupted_runs(settings)
    assert reaped == [f"stuck_job run {run.run_id[:8]} (STARTED)"]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELED
        pool = instance.event_log_storage.get_concurrency_info("duckdb_warehouse")
        assert pool.active_slot_count == 0
    assert reap_interrupted_runs(settings) == []


def test_runs_in_flight_at_a_stop_are_marked_canceling_then_reaped(settings_path):
    from churn_assets.cli_up import cancel_runs_in_flight

    settings = load_settings(settings_path)
    home = settings.data_dir / "dagster_home"
    home.mkdir(parents=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = started_run(instance)
    assert cancel_runs_in_flight(settings) == [f"stuck_job run {run.run_id[:8]} (STARTED)"]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELING
    assert cancel_runs_in_flight(settings) == []
    assert reap_interrupted_runs(settings) == [f"stuck_job run {run.run_id[:8]} (CANCELING)"]


def test_the_fingerprint_is_recomputed_only_when_landed_data_changes(settings_path):
    from churn_assets.cli_up import _cached_fingerprint

    settings = load_settings(settings_path)
    settings.read_models_dir.mkdir(parents=True)
    calls: list[int] = []

    def compute(_settings) -> str:
        calls.append(1)
        return f"fp{len(calls)}"

    def land(table: str, rows: int) -> None:
        frame = pd.DataFrame(
            {"landed_at": pd.date_range("2026-01-01", periods=rows, freq="h", tz="UTC")}
        )
        frame.to_parquet(settings.read_models_dir / f"{table}.parquet")

    land("landed_customer_events", 3)
    land("landed_feedback", 1)
    assert _cached_fingerprint(settings, compute) == "fp1"
    assert _cached_fingerprint(settings, compute) == "fp1"  # unchanged: cached
    land("landed_feedback", 2)
    assert _cached_fingerprint(settings, compute) == "fp2"  # an outcome landed
    (settings.data_dir / "landed_fingerprint.json").write_text("not json")
    assert _cached_fingerprint(settings, compute) == "fp3"  # a corrupt cache is ignored
    assert len(calls) == 3


def test_training_is_skipped_when_a_version_was_trained_on_the_landed_data(settings_path):
    from churn_assets.candidate import landed_data_fingerprint
    from churn_assets.simulator import simulate_frames

    settings = load_settings(settings_path)
    settings.read_models_dir.mkdir(parents=True)
    events, outcomes = simulate_frames(SimulationConfig(customers=300, days=75, seed=3))
    events.assign(landed_at=pd.Timestamp("2026-03-01", tz="UTC")).to_parquet(
        settings.read_models_dir / "landed_customer_events.parquet"
    )
    outcomes.assign(landed_at=pd.Timestamp("2026-03-01", tz="UTC")).to_parquet(
        settings.read_models_dir / "landed_feedback.parquet"
    )
    fingerprint = landed_data_fingerprint(settings)
    registry = ModelRegistry(settings.registry_dir)
    register(registry, "trained on other data", "champion")
    assert training_skip_reason(settings) is None  # new data: train
    version = registry.register({"model.json": b"{}"}, {"data_fingerprint": fingerprint})
    assert training_skip_reason(settings) == (
        f"{version.version} was trained on exactly this data (fingerprint {fingerprint[:12]}); "
        "`churn retrain` trains again on purpose"
    )
