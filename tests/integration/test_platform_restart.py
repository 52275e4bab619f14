"""Day two: `churn up` three times on the same data directory, stopped with SIGTERM in between.

Real parts throughout: the embedded broker, Dagster (`dagster dev` with its daemon and sensors),
`churn serve` (MLServer), the Panel dashboard, DuckDB files and the registry, exactly as
`./scripts/run.sh` runs them. Between the first and second start a challenger is registered by
hand (a Dagster run of the candidate and registration assets with other hyperparameters), so the
second start meets a pending rollout; the rollout sensor then takes it into shadow and, with demo
traffic, into its first canary step, where the second start is stopped; the third start resumes
it mid-canary.

Each start must serve (the "ready" line), redo no finished work (no second simulation, no
retraining on the same data), and stop within 15 s with exit code 0, no traceback, no process and
no temporary directory left. The start-up times are printed (`-s`) for the record, not asserted.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from churn_assets.broker import read_state
from churn_assets.config import load_settings
from churn_assets.registry import ModelRegistry
from churn_assets.rollout_control import AUDIT_TABLE, read_rollout_state
from churn_assets.warehouse import load_read_model
from tests.integration.platform_helpers import (
    PlatformRun,
    free_port,
    get_json,
    processes_with_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_for(predicate, timeout_s: float, what: str, log: PlatformRun):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert log.process.poll() is None, f"`churn up` exited while waiting for {what}"
        assert time.monotonic() < deadline, (
            f"{what} not seen in {timeout_s}s:\n{log.output()[-4000:]}"
        )
        time.sleep(2)


def rollout_phase(settings) -> str | None:
    state = read_rollout_state(settings.read_models_dir)
    return state["phase"] if state else None


def decisions(settings):
    return load_read_model(settings.read_models_dir, AUDIT_TABLE)


def no_temp_left(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir())


def test_three_starts_on_the_same_data(config_factory, tmp_path):
    settings_path = config_factory(
        simulator={"customers": 2000},
        # The automatic triggers are not under test here; the rollout sensor is.
        retraining={"enabled": False},
        rollout={
            "canary_steps": [0.5, 1.0],
            "min_shadow_requests": 150,
            "min_canary_requests": 60,
            # Long enough that the rollout is still in its first canary step when the second
            # start is stopped and when the third start takes it up.
            "min_step_minutes": 120,
        },
    )
    settings = load_settings(settings_path)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    http_port = free_port()
    env = {
        **os.environ,
        "CHURN_DAGSTER__WEBSERVER_PORT": str(free_port()),
        "CHURN_SERVING__HTTP_PORT": str(http_port),
        "CHURN_SERVING__GRPC_PORT": str(free_port()),
        "CHURN_DASHBOARD__PORT": str(free_port()),
        "CHURN_ADMIN_TOKEN": "restart-test-token",
        "CHURN_TEST_RUN": str(tmp_path),
        "TMPDIR": str(tmpdir),
    }
    cli = [sys.executable, "-m", "churn_assets.cli", "--config", str(settings_path)]
    serving = f"http://127.0.0.1:{http_port}"
    registry = ModelRegistry(settings.registry_dir)
    logs = settings.data_dir / "logs"
    timings: dict[str, float] = {}
    runs: list[PlatformRun] = []
    try:
        # -- first start: everything from nothing ------------------------------------------------
        first = PlatformRun.start([*cli, "up"], env, tmp_path / "up-1.log")
        runs.append(first)
        timings["first start"] = first.wait_ready()
        out = first.output()
        for line in (
            "[1/8] broker ready",
            "[2/8] topics ready",
            "[3/8] simulating",
            "[4/8] landing",
            "[5/8] training, gating",
            "[6/8] serving ready",
            "[7/8] Dagster UI",
            "[8/8] dashboard ready",
        ):
            assert line in out, line
        produced = re.search(r"produced (\d+) customer events and (\d+) outcomes", out)
        assert produced is not None
        simulated_events, simulated_outcomes = map(int, produced.groups())
        assert registry.aliases() == {"champion": "v1"}
        timings["first stop"] = first.stop(logs_dir=logs)
        assert no_temp_left(tmpdir) == []

        # -- a challenger registered while the platform is down: the rollout is pending ---------
        register = subprocess.run(
            [
                str(Path(sys.executable).with_name("dagster")),
                "asset",
                "materialize",
                "-m",
                "churn_assets.definitions",
                "--select",
                "candidate_model,registered_model",
            ],
            env={
                **env,
                "DAGSTER_HOME": str(settings.data_dir / "dagster_home"),
                "CHURN_CONFIG": str(settings_path),
                "CHURN_TRAINING__XGBOOST__MAX_DEPTH": "4",
            },
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert register.returncode == 0, register.stdout[-3000:] + register.stderr[-3000:]
        assert registry.aliases() == {"champion": "v1", "challenger": "v2"}
        status = subprocess.run(
            [*cli, "rollout", "status"], env=env, capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 0, status.stderr
        assert "phase pending: challenger v2" in status.stdout

        # -- second start: pending rollout; nothing redone; the rollout goes to canary ----------
        second = PlatformRun.start([*cli, "up"], env, tmp_path / "up-2.log")
        runs.append(second)
        timings["restart with a pending rollout"] = second.wait_ready()
        out = second.output()
        assert "[3/8] simulation skipped: the warehouse already holds it" in out
        assert "[5/8] training skipped: a rollout of v2 is pending" in out
        assert "[5/8] training, gating" not in out
        router = get_json(f"{serving}/router/metrics")["state"]
        assert (router["champion"], router["challenger"]) == ("v1", "v2")
        wait_for(lambda: rollout_phase(settings) == "shadow", 240, "the shadow phase", second)
        traffic = subprocess.run(
            [*cli, "traffic", "--requests", "400", "--rate", "100", "--batch", "20"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert traffic.returncode == 0, traffic.stderr[-2000:]
        wait_for(lambda: rollout_phase(settings) == "canary", 300, "the canary phase", second)
        router = get_json(f"{serving}/router/metrics")["state"]
        assert (router["strategy"], router["canary_weight"], router["challenger"]) == (
            "canary",
            0.5,
            "v2",
        )
        before_stop = decisions(settings)
        step_started_at = read_rollout_state(settings.read_models_dir)["step_started_at"]
        timings["second stop"] = second.stop(logs_dir=logs)
        assert no_temp_left(tmpdir) == []

        # -- third start: mid-canary; it resumes from the last decision -------------------------
        third = PlatformRun.start([*cli, "up"], env, tmp_path / "up-3.log")
        runs.append(third)
        timings["restart mid-canary"] = third.wait_ready()
        out = third.output()
        assert "[3/8] simulation skipped" in out
        assert "[5/8] training skipped: a rollout of v2 is in progress (phase canary)" in out
        router = get_json(f"{serving}/router/metrics")["state"]
        assert (
            router["strategy"],
            router["canary_weight"],
            router["champion"],
            router["challenger"],
        ) == ("canary", 0.5, "v1", "v2")
        wait_for(lambda: len(decisions(settings)) > len(before_stop), 240, "a new decision", third)
        after = decisions(settings).iloc[len(before_stop) :]
        assert after.iloc[0]["phase_from"] == "canary", after.to_dict("records")
        assert after.iloc[0]["challenger"] == "v2"
        assert set(after["action"]) <= {"wait", "hold"}, after.to_dict("records")
        assert rollout_phase(settings) == "canary"
        # The step's clock (min_step_minutes) runs on from where it was, not from the restart.
        assert read_rollout_state(settings.read_models_dir)["step_started_at"] == step_started_at
        timings["third stop"] = third.stop(logs_dir=logs)
        assert no_temp_left(tmpdir) == []
    finally:
        for run in runs:
            run.kill()

    # -- the data: every simulated message landed once; nothing trained twice ------------------
    events = load_read_model(settings.read_models_dir, "landed_customer_events")
    outcomes = load_read_model(settings.read_models_dir, "landed_feedback")
    assert len(events) == events["event_id"].nunique() == simulated_events
    assert len(outcomes) == outcomes["event_id"].nunique() == simulated_outcomes
    versions = registry.versions()
    assert [v.version for v in versions] == ["v1", "v2"]
    trained_on = [
        (v.metadata["data_fingerprint"], json.dumps(v.metadata["params"], sort_keys=True))
        for v in versions
    ]
    assert len(set(trained_on)) == len(trained_on), "a model was trained twice on the same data"
    print("\n" + "\n".join(f"{name}: {seconds:.1f} s" for name, seconds in timings.items()))


def test_sigterm_during_landing_stops_the_run_and_the_broker(config_factory, tmp_path):
    """A stop request in the middle of start-up: the Dagster landing run is cancelled (not left
    "started"), the broker is stopped, nothing is left behind; the next start lands the rest."""
    settings_path = config_factory(
        simulator={"customers": 2000},
        landing={"batch_max_messages": 500, "batch_max_seconds": 1.0},
    )
    settings = load_settings(settings_path)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "CHURN_TEST_RUN": str(tmp_path), "TMPDIR": str(tmpdir)}
    cli = [sys.executable, "-m", "churn_assets.cli", "--config", str(settings_path)]
    run = PlatformRun.start([*cli, "up", "--no-train", "--no-serve"], env, tmp_path / "up.log")
    try:
        wait_for(lambda: "[4/8] landing" in run.output(), 300, "the landing step", run)
        # Let the landing run get going: a few batches committed.
        wait_for(
            lambda: "churn.customers: batch 3:" in run.output(), 120, "three landed batches", run
        )
        run.process.send_signal(signal.SIGTERM)
        code = run.process.wait(timeout=30)
        assert code == 130, run.output()[-3000:]  # interrupted before the platform was ready
        out = run.output()
        assert "SIGTERM received: stopping" in out and "broker stopped" in out
        assert "Traceback" not in out.split("SIGTERM received", 1)[1]
        assert processes_with_env(run.marker) == []
        assert read_state(settings.run_dir) is None
    finally:
        run.kill()
    import dagster as dg

    with dg.DagsterInstance.from_config(str(settings.data_dir / "dagster_home")) as instance:
        statuses = {r.status for r in instance.get_runs()}
    assert statuses <= {
        dg.DagsterRunStatus.CANCELED,
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.SUCCESS,
    }, statuses

    # The next start lands what the interrupted one did not, each message once.
    again = subprocess.run(
        [*cli, "up", "--no-train", "--no-serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    subprocess.run([*cli, "broker", "stop"], env=env, capture_output=True, timeout=60)
    output = again.stdout + again.stderr
    produced = int(re.search(r"produced (\d+) customer events", output).group(1))
    landed, replayed = map(
        int,
        re.search(r"churn\.customers: landed (\d+) rows, (\d+) replayed", output).groups(),
    )
    # What the interrupted run committed is not landed again: it is counted as replayed.
    assert replayed >= 3 * 500 and landed + replayed == produced
    events = load_read_model(settings.read_models_dir, "landed_customer_events")
    assert len(events) == events["event_id"].nunique() == produced
