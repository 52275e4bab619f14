"""`churn up`, the README's run command: broker, demo data, landing and training through Dagster,
and the Dagster UI."""

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from churn_assets.broker import read_state
from churn_assets.config import load_settings
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.warehouse import load_read_model
from tests.integration.platform_helpers import (
    READY_LINE,
    free_port,
    graphql,
    processes_with_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
