"""The closed loop end to end, on real parts and the time-compressed profile.

A real embedded broker, `churn simulate`, the real Dagster definitions and a real (SQLite-backed)
Dagster instance, real DuckDB files and registry, and a real `churn serve` process. Sensors are
evaluated with Dagster's own ``evaluate_tick`` against that instance, and every run they request
is executed as the daemon would launch it (skipping run keys the instance already holds), in this
process with ``execute_in_process``: the daemon's timing (30 s sensor intervals, a process per
run) would make the test slow and its order nondeterministic, and nothing else differs. No step
is triggered by calling the platform's functions directly: data arrives over Kafka and HTTP, and
the sensors decide what runs.

1. Drift: the covariate-drift scenario makes the first model's drift report fire, the
   retraining sensor requests exactly one retraining, v2 registers as challenger and goes into
   shadow in the live server; canary steps follow; v2 becomes champion in the live server.
2. A deliberately bad challenger (trained on shuffled labels, launched by hand with the gates
   loosened so it gets registered) is rolled back automatically, with the reason recorded.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import requests
import yaml

from churn_assets.broker import EmbeddedBroker
from churn_assets.config import REPO_ROOT, Settings, load_settings
from churn_assets.kafka import ensure_topics
from churn_assets.monitoring import read_monitoring
from churn_assets.registry import ModelRegistry
from churn_assets.rollout_control import AUDIT_TABLE, read_rollout_state
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.simulator import SimulationConfig, simulate_frames
from churn_assets.warehouse import load_read_model
from tests.conftest import ARTIFACTS
from tests.serving_fixtures import ADMIN_TOKEN, RunningServer, free_port, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 7


class Daemon:
    """Evaluates the real sensors on the real instance and runs what they request."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        from churn_assets.definitions import defs

        self.defs = defs
        self.instance = instance
        self.cursors: dict[str, str | None] = {}
        self.log: list[str] = []

    def tick(self, name: str) -> tuple[Any, list[dg.ExecuteInProcessResult]]:
        sensor = self.defs.resolve_sensor_def(name)
        with dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursors.get(name),
            definitions=self.defs,
            sensor_name=name,
            resources=self.defs.resources,
        ) as context:
            data = sensor.evaluate_tick(context)
        if data.cursor is not None:
            self.cursors[name] = data.cursor
        results = []
        for request in data.run_requests or []:
            result = self.launch(request, sensor.job_name if sensor.has_jobs else None, name)
            if result is not None:
                results.append(result)
        keys = [r.dagster_run.tags.get("dagster/run_key") for r in results]
        self.log.append(f"{name}: {len(results)} run(s) {keys} {data.skip_message or ''}")
        return data, results

    def launch(
        self, request: dg.RunRequest, job_name: str | None, origin: str
    ) -> dg.ExecuteInProcessResult | None:
        tags = dict(request.tags)
        tags["dagster/sensor_name"] = origin
        if request.run_key:
            seen = self.instance.get_runs(
                filters=dg.RunsFilter(tags={"dagster/run_key": request.run_key}), limit=1
            )
            if seen:
                return None
            tags["dagster/run_key"] = request.run_key
        if request.asset_selection:
            job = self.defs.resolve_implicit_global_asset_job_def()
            result = job.execute_in_process(
                instance=self.instance,
                asset_selection=list(request.asset_selection),
                tags=tags,
                raise_on_error=False,
            )
        else:
            job = self.defs.resolve_job_def(request.job_name or job_name)
            result = job.execute_in_process(
                instance=self.instance,
                run_config=request.run_config,
                tags=tags,
                raise_on_error=False,
            )
        assert result.success, f"{origin} run {request.run_key} failed:\n" + "\n".join(
            str(e.message) for e in result.all_events if e.is_failure
        )
        return result

    def run_job(self, name: str, **kwargs: Any) -> dg.ExecuteInProcessResult:
        """A launch from the UI's launchpad (or `churn up`'s initial training)."""
        result = self.defs.resolve_job_def(name).execute_in_process(
            instance=self.instance, raise_on_error=False, **kwargs
        )
        assert result.success, "\n".join(str(e.message) for e in result.all_events if e.is_failure)
        return result

    def runs_of(self, job_name: str) -> list[dg.DagsterRun]:
        return list(self.instance.get_runs(filters=dg.RunsFilter(job_name=job_name)))


class Loop:
    def __init__(self, settings: Settings, config: Path, server: RunningServer, daemon: Daemon):
        self.settings = settings
        self.config = config
        self.server = server
        self.daemon = daemon
        events, _ = simulate_frames(
            SimulationConfig(
                seed=settings.simulator.seed,
                customers=settings.simulator.customers,
                days=settings.simulator.days,
                scenario=settings.simulator.scenario,
                scenario_start_day=settings.simulator.scenario_start_day,
            )
        )
        latest = events.sort_values("event_time").groupby("customer_id").tail(1)
        self.customers = latest[["customer_id", *FEATURE_NAMES]].to_dict("records")
        self.rng = np.random.default_rng(SEED)
        self.rounds = 0
        self.cli = [sys.executable, "-m", "churn_assets.cli", "--config", str(config)]

    def router(self) -> dict[str, Any]:
        return requests.get(f"{self.server.http}/router/metrics", timeout=10).json()["state"]

    def traffic(self, n: int = 300, cli: bool = False) -> None:
        """Customers scored through the real API; the mirror sends every answer to Kafka.
        ``cli``: with `churn traffic`, as the README's walkthrough does."""
        if cli:
            self.rounds += 1
            done = subprocess.run(
                [
                    *self.cli,
                    "traffic",
                    "--requests",
                    str(n),
                    "--rate",
                    "5000",
                    "--batch",
                    "100",
                    "--seed",
                    str(self.rounds),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert f"{n} customers scored" in done.stdout, done.stdout
            return
        picks = self.rng.choice(len(self.customers), size=n, replace=False)
        instances = [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in self.customers[i].items()}
            for i in picks
        ]
        response = requests.post(
            f"{self.server.http}/predict/batch", json={"instances": instances}, timeout=60
        )
        assert response.status_code == 200, response.text

    def land_and_monitor(self) -> None:
        time.sleep(1.5)  # the mirror flushes in the background
        self.daemon.tick("kafka_landing_sensor")
        self.daemon.tick("monitoring_sensor")

    def drive_rollout(self, until: set[str], rounds: int = 12, cli: bool = False):
        """Traffic, landing, monitoring and a rollout tick per round, until a phase in ``until``."""
        for _ in range(rounds):
            self.traffic(cli=cli)
            self.land_and_monitor()
            self.daemon.tick("rollout_sensor")
            state = read_rollout_state(self.settings.read_models_dir)
            assert state is not None
            if state["phase"] in until:
                return state
            time.sleep(2)
        raise AssertionError(
            f"rollout stuck in {state['phase']}:\n" + "\n".join(self.daemon.log[-12:])
        )

    def retrain_bad_challenger(self) -> str:
        """retraining_job launched by hand, as from the launchpad, with shuffled labels and the
        offline gates loosened so the model gets registered: the online rollout is the line of
        defence under test. Returns the new challenger."""
        with pytest.MonkeyPatch.context() as env:
            env.setenv("CHURN_TRAINING__GATES__MAX_AUC_DROP_VS_CHAMPION", "1.0")
            env.setenv("CHURN_TRAINING__GATES__MAX_CALIBRATION_ERROR", "1.0")
            env.setenv("CHURN_RETRAINING__PERFORMANCE_THRESHOLD", "0.3")
            self.daemon.run_job(
                "retraining_job",
                run_config={"ops": {"candidate_model": {"config": {"shuffle_labels": True}}}},
                tags={"churn/retraining_reason": "manual"},
            )
        return ModelRegistry(self.settings.registry_dir).aliases()["challenger"]

    def decisions(self):
        return load_read_model(self.settings.read_models_dir, AUDIT_TABLE)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    root = tmp_path_factory.mktemp("closed_loop")
    profile = yaml.safe_load((REPO_ROOT / "config" / "compressed.yaml").read_text())
    http_port, grpc_port = free_port(), free_port()
    profile["storage"] = {
        "data_dir": str(root / "data"),
        "warehouse_path": str(root / "data" / "warehouse.duckdb"),
        "read_models_dir": str(root / "data" / "read_models"),
        "registry_dir": str(root / "data" / "models"),
    }
    profile["serving"] = {"http_port": http_port, "grpc_port": grpc_port}
    (root / "config").mkdir()
    config = root / "config" / "config.yaml"
    config.write_text(yaml.safe_dump(profile))
    settings = load_settings(config)

    broker = EmbeddedBroker(settings.run_dir)
    broker.start()
    server: RunningServer | None = None
    home = root / "dagster_home"
    home.mkdir()
    platform_instance = yaml.safe_load((REPO_ROOT / "config" / "dagster.yaml").read_text())
    with (
        pytest.MonkeyPatch.context() as env,
        dg.instance_for_test(temp_dir=str(home), overrides=platform_instance) as instance,
    ):
        env.setenv("CHURN_CONFIG", str(config))
        env.setenv("CHURN_ADMIN_TOKEN", ADMIN_TOKEN)
        try:
            ensure_topics(settings)
            cli = [sys.executable, "-m", "churn_assets.cli", "--config", str(config)]
            subprocess.run([*cli, "simulate"], check=True, capture_output=True, timeout=300)
            daemon = Daemon(instance)
            daemon.tick("kafka_landing_sensor")
            daemon.run_job("training_job", tags={"churn/trigger": "initial training"})
            server = start_server(
                config, root / "serving.log", ports=(http_port, grpc_port), timeout_s=120
            )
            yield Loop(settings, config, server, daemon)
        finally:
            if server is not None:
                server.stop()
                ARTIFACTS.mkdir(exist_ok=True)
                (ARTIFACTS / "closed_loop_serving.log").write_text(server.log.read_text())
            broker.stop()


def test_drift_retrains_once_and_the_challenger_is_promoted_through_shadow_and_canary(loop):
    started = time.monotonic()
    daemon, registry = loop.daemon, ModelRegistry(loop.settings.registry_dir)
    assert registry.aliases() == {"champion": "v1"}
    assert loop.router()["champion"] == "v1" and loop.router()["challenger"] is None

    # Landed customer events -> drift and outlier reports; the drifted tail is flagged.
    _, runs = daemon.tick("monitoring_sensor")
    assert len(runs) == 1
    drift = read_monitoring(loop.settings.read_models_dir)["drift"]
    assert drift["drift"] is True and drift["model_version"] == "v1"

    # One drift episode: one retraining, registered as challenger and put in shadow.
    data, runs = daemon.tick("retraining_sensor")
    assert len(runs) == 1, daemon.log
    run = runs[0].dagster_run
    assert run.job_name == "retraining_job"
    assert run.tags["churn/retraining_reason"] == "drift"
    assert run.tags["dagster/run_key"].startswith("retrain:drift-")
    assert registry.aliases() == {"champion": "v1", "challenger": "v2"}
    router = loop.router()
    assert (router["strategy"], router["champion"], router["challenger"]) == ("shadow", "v1", "v2")
    assert read_rollout_state(loop.settings.read_models_dir)["phase"] == "shadow"

    # The same episode never retrains again, whatever the sensors see meanwhile.
    for _ in range(2):
        data, runs = daemon.tick("retraining_sensor")
        assert runs == [] and "this episode already retrained" in data.skip_message

    # A retraining launched by hand mid-rollout trains, but registration is refused.
    midway = daemon.defs.resolve_job_def("retraining_job").execute_in_process(
        instance=daemon.instance, raise_on_error=False, tags={"churn/retraining_reason": "manual"}
    )
    assert not midway.success
    failures = [
        e.step_failure_data.error.to_string() for e in midway.all_events if e.is_step_failure
    ]
    assert any("a rollout of v2 is in progress" in m for m in failures), failures
    assert registry.aliases() == {"champion": "v1", "challenger": "v2"}
    assert [v.version for v in registry.versions()] == ["v1", "v2"]

    state = loop.drive_rollout(until={"promoted", "rolled_back"})
    assert state["phase"] == "promoted", loop.decisions()[["action", "reasons"]].to_string()
    router = loop.router()
    assert router["champion"] == "v2" and router["challenger"] is None
    assert router["previous_champions"] == ["v1"]
    assert registry.aliases() == {"champion": "v2"}

    decisions = loop.decisions()
    moves = decisions.loc[~decisions["action"].isin(["wait", "hold"])]
    assert moves["action"].tolist() == ["start_shadow", "advance", "advance", "promote"]
    assert moves["phase_to"].tolist() == ["shadow", "canary", "canary", "promoted"]
    assert moves["traffic"].tolist() == [0.0, 0.5, 1.0, 1.0]
    assert moves["applied"].all()
    first_canary = json.loads(moves.iloc[1]["reasons"])
    assert any("agreement" in r for r in first_canary), first_canary
    promote = json.loads(moves.iloc[3]["figures"])
    assert promote["requests"] >= loop.settings.rollout.min_canary_requests
    assert "challenger_auc" in promote and "champion_auc" in promote

    # After the promotion the drift episode is still the same one: no second retraining.
    loop.land_and_monitor()
    data, runs = daemon.tick("retraining_sensor")
    assert runs == [], data.skip_message
    automatic = [
        r
        for r in daemon.runs_of("retraining_job")
        if r.tags.get("dagster/sensor_name") == "retraining_sensor"
    ]
    assert len(automatic) == 1 and automatic[0].tags["churn/retraining_reason"] == "drift"
    elapsed = time.monotonic() - started
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "closed_loop_timing.txt").write_text(
        f"drift -> retraining -> shadow -> canary -> promoted: {elapsed:.1f} s\n"
        + "\n".join(daemon.log)
    )


def test_a_bad_challenger_is_rolled_back_automatically_with_its_reason(loop):
    daemon, registry = loop.daemon, ModelRegistry(loop.settings.registry_dir)
    champion = registry.aliases()["champion"]
    bad = loop.retrain_bad_challenger()
    assert registry.get(bad).metadata["metrics"]["test_roc_auc"] < 0.6
    assert loop.router()["challenger"] == bad

    state = loop.drive_rollout(until={"promoted", "rolled_back", "canary"}, cli=True)
    assert state["phase"] == "rolled_back", state
    last = loop.decisions().iloc[-1]
    assert last["action"] == "rollback" and last["challenger"] == bad and last["applied"]
    reasons = json.loads(last["reasons"])
    assert any("score KS" in r or "agreement" in r for r in reasons), reasons
    with (ARTIFACTS / "closed_loop_timing.txt").open("a") as out:
        out.write(f"\nbad challenger {bad} rolled back: {reasons}\n")
    router = loop.router()
    assert router["champion"] == champion and router["challenger"] is None
    assert registry.aliases() == {"champion": champion}

    # The rolled-back version is never started again, and the CLI shows why it went.
    data, runs = daemon.tick("rollout_sensor")
    assert runs == [] and "no rollout in progress" in data.skip_message
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "churn_assets.cli",
            "--config",
            str(loop.config),
            "rollout",
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert status.returncode == 0, status.stderr
    assert "phase rolled_back" in status.stdout and "rollback" in status.stdout
    assert reasons[0] in status.stdout


def test_a_registry_rollback_by_hand_is_adopted_and_reaches_the_live_router(loop):
    """`churn models rollback` changes only the registry; the rollout adopts the change and
    applies it to the live server."""
    before = loop.router()
    assert before["champion"] == "v2" and before["previous_champions"] == ["v1"]
    done = subprocess.run(
        [*loop.cli, "models", "rollback"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert ModelRegistry(loop.settings.registry_dir).aliases()["champion"] == "v1"
    assert loop.router()["champion"] == "v2"  # nothing has applied it yet

    _, runs = loop.daemon.tick("rollout_sensor")
    assert len(runs) == 1 and runs[0].dagster_run.tags["dagster/run_key"] == ("rollout:adopt-v1:1")
    last = loop.decisions().iloc[-1]
    assert last["action"] == "adopt" and last["applied"], last.to_dict()
    assert "outside the rollout" in json.loads(last["reasons"])[0]
    router = loop.router()
    assert router["champion"] == "v1" and router["challenger"] is None
    data, runs = loop.daemon.tick("rollout_sensor")
    assert runs == [] and "no rollout in progress" in data.skip_message


def test_a_challenger_that_passes_the_shadow_gate_is_rolled_back_in_the_canary(loop):
    """The shadow gate loosened so a shuffled-label model reaches the canary: the canary's
    performance check (live AUC against the champion) rolls it back on real traffic."""
    registry = ModelRegistry(loop.settings.registry_dir)
    champion = registry.aliases()["champion"]
    bad = loop.retrain_bad_challenger()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHURN_ROLLOUT__MIN_AGREEMENT", "0.0")
        env.setenv("CHURN_ROLLOUT__MAX_SCORE_KS", "1.0")
        state = loop.drive_rollout(until={"promoted", "rolled_back"})
    assert state["phase"] == "rolled_back", state
    decisions = loop.decisions()
    mine = decisions.loc[decisions["challenger"] == bad]
    moves = mine.loc[~mine["action"].isin(["wait", "hold"])]
    assert moves["action"].tolist() == ["start_shadow", "advance", "rollback"]
    assert moves["phase_from"].tolist()[-1] == "canary"
    reasons = json.loads(moves.iloc[-1]["reasons"])
    assert any("AUC" in r for r in reasons), reasons
    figures = json.loads(moves.iloc[-1]["figures"])
    assert figures["requests"] >= loop.settings.rollout.min_canary_requests
    assert figures["challenger_auc"] < figures["champion_auc"]
    router = loop.router()
    assert router["champion"] == champion and router["challenger"] is None
    assert router["strategy"] == "shadow"  # no traffic left on the canary
    with (ARTIFACTS / "closed_loop_timing.txt").open("a") as out:
        out.write(f"\ncanary of {bad} rolled back: {reasons}\n")
