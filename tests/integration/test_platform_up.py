"""`churn up`, the README's run command: broker, demo data, landing and training through Dagster,
and the Dagster UI."""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import dagster as dg
import pytest

from churn_assets.broker import read_state
from churn_assets.config import Settings, load_settings
from churn_assets.kafka import scan_topic
from churn_assets.monitoring import read_monitoring
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import FEATURE_NAMES, Topics
from churn_assets.warehouse import load_read_model
from tests.integration.platform_helpers import (
    READY_LINE,
    free_port,
    graphql,
    processes_with_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def platform_runs(settings: Settings, statuses: list[dg.DagsterRunStatus]) -> list[str]:
    """``<job> <run id> <status>`` for the platform instance's runs in ``statuses``."""
    with dg.DagsterInstance.from_config(str(settings.data_dir / "dagster_home")) as instance:
        records = instance.get_run_records(filters=dg.RunsFilter(statuses=statuses))
        return [
            f"{r.dagster_run.job_name} {r.dagster_run.run_id} {r.dagster_run.status.value}"
            for r in records
        ]


def wait_for_first_monitoring(settings: Settings, log_path, timeout_s: float = 300) -> dict:
    """The monitoring figures once the sensors' first drift report exists and no run is in
    flight (landing, monitoring: the start-up path's runs have finished)."""
    deadline = time.monotonic() + timeout_s
    while True:
        monitoring = read_monitoring(settings.read_models_dir)
        if "drift" in monitoring and not platform_runs(settings, IN_FLIGHT):
            return monitoring
        assert time.monotonic() < deadline, (
            f"no drift report, or runs in flight ({platform_runs(settings, IN_FLIGHT)}), "
            f"{timeout_s}s after start-up:\n{log_path.read_text()[-3000:]}"
        )
        time.sleep(2)


def test_up_runs_the_platform_and_ctrl_c_stops_everything(churn_cli, settings_path, tmp_path):
    port, http_port, grpc_port, dashboard_port = free_port(), free_port(), free_port(), free_port()
    marker = f"CHURN_TEST_RUN={tmp_path}\0"
    env = {
        **os.environ,
        "CHURN_DAGSTER__WEBSERVER_PORT": str(port),
        "CHURN_SERVING__HTTP_PORT": str(http_port),
        "CHURN_SERVING__GRPC_PORT": str(grpc_port),
        "CHURN_DASHBOARD__PORT": str(dashboard_port),
        "CHURN_SIMULATOR__CUSTOMERS": "2000",
        "CHURN_SIMULATOR__DAYS": "90",
        "CHURN_TEST_RUN": str(tmp_path),
        # The manual trigger is under test here, not the automatic ones.
        "CHURN_RETRAINING__ENABLED": "false",
        "CHURN_ADMIN_TOKEN": "platform-up-token",
    }
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*churn_cli, "up"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    settings = load_settings(settings_path)
    try:
        deadline = time.monotonic() + 480
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            # `churn up` prints its "ready" line only once serving, Dagster and the dashboard
            # answer.
            if READY_LINE in log_path.read_text():
                ready = True
                break
            time.sleep(1)
        assert ready, log_path.read_text()[-4000:]

        output = log_path.read_text()
        assert "[1/8] broker ready" in output
        assert "produced" in output and "customer events" in output
        customers = load_read_model(settings.read_models_dir, "landed_customer_events")
        feedback = load_read_model(settings.read_models_dir, "landed_feedback")
        assert len(customers) > 1000 and len(feedback) > 0
        assert ModelRegistry(settings.registry_dir).aliases() == {"champion": "v1"}
        assert "v1" in output and "champion" in output  # `churn models list` after training

        nodes = graphql(port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        assert ["landed_customer_events"] in [n["assetKey"]["path"] for n in nodes]
        sensors = graphql(
            port,
            '{ sensorsOrError(repositorySelector: {repositoryName: "__repository__", '
            'repositoryLocationName: "churn_platform"}) { ... on Sensors { results { name } } } }',
        )["sensorsOrError"]["results"]
        assert {"name": "kafka_landing_sensor"} in sensors
        broker = read_state(settings.run_dir)
        assert broker is not None

        # The start-up path leaves nothing red: no failed run (live_performance, with no
        # prediction landed yet, waits), no drift alert on a simulation without drift.
        monitoring = wait_for_first_monitoring(settings, log_path)
        assert platform_runs(settings, [dg.DagsterRunStatus.FAILURE]) == []
        drift = monitoring["drift"]
        assert drift["model_version"] == "v1"
        assert drift["drift"] is False, drift
        assert not any(f["drift"] for f in drift["features"].values()), drift
        assert drift["multivariate"]["drift"] is False, drift["multivariate"]
        assert sum(e.messages for e in scan_topic(settings, Topics.DRIFT_ALERTS)) == 0
        # The analytics page's calibration: predicted and realised 14-day churn by decile,
        # within the calibration error band.
        calibration = load_read_model(settings.read_models_dir, "calibration")
        deciles = calibration.loc[calibration["grouping"] == "decile"]
        assert len(deciles) == 10 and set(deciles["model_version"]) == {"v1"}
        gaps = (deciles["observed_rate"] - deciles["predicted_rate"]).abs()
        assert (gaps <= deciles["tolerance"]).all(), deciles.to_string()

        record = customers.iloc[0][list(FEATURE_NAMES)].to_dict()
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{http_port}/predict",
                    data=json.dumps(record).encode(),
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    prediction = json.load(response)
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(1)
        assert prediction["model_version"] == "v1" and 0 <= prediction["probability"] <= 1

        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{dashboard_port}/liveness", timeout=5
                ) as response:
                    assert response.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(1)
        assert (
            f"[8/8] dashboard ready: http://127.0.0.1:{dashboard_port}/app" in log_path.read_text()
        )

        # The manual retraining trigger: a run in the platform's instance, a challenger in
        # shadow in the live server.
        retrain = subprocess.run(
            [*churn_cli, "retrain", "--reason", "test"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert retrain.returncode == 0, retrain.stdout[-3000:] + retrain.stderr[-3000:]
        assert ModelRegistry(settings.registry_dir).aliases() == {
            "champion": "v1",
            "challenger": "v2",
        }
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/router/metrics") as response:
            router = json.load(response)["state"]
        assert (router["strategy"], router["challenger"]) == ("shadow", "v2")
        runs = graphql(
            port,
            '{ runsOrError(filter: {pipelineName: "retraining_job"}) '
            "{ ... on Runs { results { status tags { key value } } } } }",
        )["runsOrError"]["results"]
        assert [r["status"] for r in runs] == ["SUCCESS"]
        assert {"key": "churn/retraining_reason", "value": "test"} in runs[0]["tags"]
        # Mid-rollout (v2 in shadow) the API's trigger refuses, with the reason.
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/admin/retrain",
            data=json.dumps({"reason": "again"}).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": "Bearer platform-up-token",
            },
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=60)
            raise AssertionError("POST /admin/retrain mid-rollout was accepted")
        except urllib.error.HTTPError as refused:
            assert refused.code == 409
            assert "a rollout of v2 is in progress" in json.load(refused)["detail"]
        assert platform_runs(settings, [dg.DagsterRunStatus.FAILURE]) == []
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    assert process.returncode == 0, log_path.read_text()[-4000:]
    assert "broker stopped" in log_path.read_text()
    deadline = time.monotonic() + 60
    while processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_env(marker) == [], "processes left behind after Ctrl-C"
    assert read_state(settings.run_dir) is None
