"""``POST /admin/retrain`` on a real `churn serve` against a real Dagster webserver (the
platform's code location and instance configuration, no daemon: the launched run stays queued
in the instance, where the test finds it with its reason)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from churn_assets.cli_up import _dagster_loaded
from churn_assets.config import REPO_ROOT, load_settings
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import DEFAULT_CONTRACT
from tests.integration.test_serving import call
from tests.serving_fixtures import (
    ADMIN_TOKEN,
    contract_model,
    free_port,
    register_model,
    served_with_broker,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RETRAIN = "/admin/retrain"
WEBSERVER_READY_S = 240


def two_versions(root: Path) -> None:
    """v1 champion and v2 registered without an alias: no rollout pending."""
    registry = ModelRegistry(root)
    register_model(registry, contract_model(DEFAULT_CONTRACT, seed=1), alias="champion")
    register_model(registry, contract_model(DEFAULT_CONTRACT, seed=2))


def start_webserver(port: int, home: Path, config_path: Path, log: Path) -> subprocess.Popen:
    """The Dagster webserver on the platform's workspace, instance in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "config" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "CHURN_CONFIG": str(config_path)}
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dagster-webserver")),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                str(REPO_ROOT / "workspace.yaml"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + WEBSERVER_READY_S
    while not _dagster_loaded(f"http://127.0.0.1:{port}"):
        assert process.poll() is None, f"webserver exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"webserver not ready:\n{log.read_text()[-3000:]}"
        time.sleep(1)
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def assert_documented(schema: dict) -> None:
    """The OpenAPI document shows the endpoint as it answers."""
    operation = schema["paths"][RETRAIN]["post"]
    assert operation["tags"] == ["admin"]
    assert {"200", "400", "401", "409", "413", "422", "503"} <= set(operation["responses"])
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    request = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert request["additionalProperties"] is False and request["required"] == ["reason"]
    reason = request["properties"]["reason"]
    assert (reason["type"], reason["minLength"], reason["maxLength"]) == ("string", 1, 500)
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    response_schema = schema["components"]["schemas"][answer["$ref"].rsplit("/", 1)[1]]
    assert set(response_schema["properties"]) == {"run_id", "job", "reason"}
    authorization = [p for p in operation["parameters"] if p["name"] == "authorization"]
    assert authorization and authorization[0]["in"] == "header"


def test_retrain_launches_the_job_in_dagster_and_refuses_when_it_should(tmp_path):
    dagster_port = free_port()
    with served_with_broker(
        tmp_path, build=two_versions, dagster={"webserver_port": dagster_port}
    ) as server:
        url = f"{server.http}{RETRAIN}"
        reason = "new pricing launched on 2026-03-01"
        with urllib.request.urlopen(f"{server.http}/openapi.json", timeout=30) as response:
            assert_documented(json.load(response))

        # Credentials first, then the body's shape.
        assert call("POST", url, {"reason": reason})[0] == 401
        status, body = call("POST", url, {"reason": reason}, token="wrong")
        assert status == 401 and body == {"detail": "admin token missing or wrong"}
        for bad in (
            {},
            {"reason": ""},
            {"reason": "   "},
            {"reason": "x" * 501},
            {"reason": reason, "priority": "high"},
            {"reason": 42},
        ):
            status, body = call("POST", url, bad, token=ADMIN_TOKEN)
            assert status == 422, (bad, status, body)

        # Dagster is down: 503 with the reason, nothing launched.
        status, body = call("POST", url, {"reason": reason}, token=ADMIN_TOKEN)
        assert status == 503, body
        assert body["detail"].startswith("retraining not launched: the Dagster webserver at ")
        assert f"127.0.0.1:{dagster_port}/graphql cannot be reached" in body["detail"]

        home = tmp_path / "dagster_home"
        settings = load_settings(tmp_path / "config" / "config.yaml")
        webserver = start_webserver(
            dagster_port, home, tmp_path / "config" / "config.yaml", tmp_path / "webserver.log"
        )
        try:
            status, body = call("POST", url, {"reason": reason}, token=ADMIN_TOKEN)
            assert status == 200, body
            assert set(body) == {"run_id", "job", "reason"}
            assert (body["job"], body["reason"]) == ("retraining_job", reason)
            with dg.DagsterInstance.from_config(str(home)) as instance:
                run = instance.get_run_by_id(body["run_id"])
                assert run is not None, body
                assert run.job_name == "retraining_job"
                assert run.tags["churn/retraining_reason"] == reason
                assert run.tags["churn/requested_via"] == "serving admin API"
                # No daemon here: the run waits in the instance's queue, as `churn up`'s
                # daemon would find it.
                assert run.status == dg.DagsterRunStatus.QUEUED

            # A challenger in shadow is a rollout pending: 409 with the reason, no new run.
            status, body = call(
                "PUT",
                f"{server.http}/router/policy",
                {"strategy": "shadow", "challenger": "v2"},
                token=ADMIN_TOKEN,
            )
            assert status == 200, body
            assert ModelRegistry(settings.registry_dir).aliases()["challenger"] == "v2"
            status, body = call("POST", url, {"reason": reason}, token=ADMIN_TOKEN)
            assert status == 409, body
            assert body["detail"].startswith("a rollout of v2 is in progress or pending")
            status, body = call(
                "PUT",
                f"{server.http}/router/policy",
                {"strategy": "canary", "canary_weight": 0.25},
                token=ADMIN_TOKEN,
            )
            assert status == 200, body
            status, body = call("POST", url, {"reason": reason}, token=ADMIN_TOKEN)
            assert status == 409, body
            assert body["detail"].startswith("a canary of v2 takes 25% of the traffic")
            with dg.DagsterInstance.from_config(str(home)) as instance:
                assert len(instance.get_runs()) == 1
        finally:
            stop(webserver)
