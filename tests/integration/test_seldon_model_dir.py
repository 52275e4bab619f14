"""A version folder from `churn models export`, served the two ways Seldon serves it.

* Seldon Core v1 (SeldonDeployment predictor): the folder is mounted at /mnt/models and the image
  runs `churn serve --model-dir` on it: real process, real HTTP, an empty registry beside it.
* Seldon Core 2 (MLServer server): `mlserver start <models dir>` finds the folder's
  model-settings.json and loads serving.standalone.ChurnModel: the real MLServer 1.7 CLI.
"""

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc

from churn_assets.cli import main
from churn_assets.model import load_model
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.simulator import sample_customers
from tests.conftest import write_config
from tests.serving_fixtures import RunningServer, build_registry, free_port, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVE_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(the exported folder of v1, the registry it came from)."""
    root = tmp_path_factory.mktemp("seldon")
    config = write_config(root / "source")
    registry_dir = build_registry(root / "source" / "data" / "models")
    bucket = root / "bucket"
    result = CliRunner().invoke(
        main, ["--config", str(config), "models", "export", "v1", str(bucket)]
    )
    assert result.exit_code == 0, result.output
    return bucket / "v1", registry_dir


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    frame = sample_customers(6, seed=11)[["customer_id", *FEATURE_NAMES]]
    records = frame.to_dict("records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in records]


@pytest.fixture(scope="module")
def expected(exported, rows) -> np.ndarray:
    """v1's probabilities computed directly by its ScoringModel from the registry."""
    _, registry_dir = exported
    return load_model(ModelRegistry(registry_dir), "v1").predict_records(rows)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def pandas_inputs(rows: list[dict]) -> dict:
    """One V2 input per column, MLServer's pandas codec (as clients of `churn serve` send)."""
    inputs = []
    for name in ("customer_id", *FEATURE_NAMES):
        values = [row[name] for row in rows]
        if isinstance(values[0], str):
            tensor = {"datatype": "BYTES", "parameters": {"content_type": "str"}}
        else:
            tensor = {"datatype": "INT64" if isinstance(values[0], int) else "FP64"}
        inputs.append({"name": name, "shape": [len(rows)], "data": values, **tensor})
    return {"inputs": inputs, "parameters": {"content_type": "pd"}}


def records_input(rows: list[dict]) -> dict:
    data = [json.dumps(row) for row in rows]
    return {
        "inputs": [{"name": "records", "shape": [len(rows)], "datatype": "BYTES", "data": data}]
    }


def output(body: dict, name: str) -> list:
    return next(o for o in body["outputs"] if o["name"] == name)["data"]


def churn_serve(config: Path, model_dir: Path, *, version: str, ports: tuple[int, int]):
    env = {k: v for k, v in os.environ.items() if k not in ("CHURN_ADMIN_TOKEN", "CHURN_MODEL_DIR")}
    command = [sys.executable, "-m", "churn_assets.cli", "--config", str(config), "serve"]
    command += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1])]
    command += ["--model-dir", str(model_dir)]
    return command, {**env, "CHURN_MODEL_VERSION": version}


def tamper(folder: Path, into: Path) -> Path:
    copy = shutil.copytree(folder, into / folder.name)
    booster = bytearray((copy / "model.ubj").read_bytes())
    booster[len(booster) // 2] ^= 0x01
    (copy / "model.ubj").write_bytes(bytes(booster))
    return copy


def test_churn_serve_model_dir_scores_like_the_registry_version(
    exported, rows, expected, settings_path, tmp_path
):
    folder, _ = exported
    http_port, grpc_port = free_port(), free_port()
    command, env = churn_serve(settings_path, folder, version="v1", ports=(http_port, grpc_port))
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log)
    try:
        wait_ready(process, f"{server.http}/v2/models/churn-router/ready", log, SERVE_TIMEOUT_S)

        status, body = post(f"{server.http}/predict", rows[0])
        assert status == 200, body
        assert body["model_version"] == "v1"
        np.testing.assert_allclose(body["probability"], expected[0], rtol=1e-6)

        status, body = post(f"{server.http}/v2/models/churn-router/infer", pandas_inputs(rows))
        assert status == 200, body
        np.testing.assert_allclose(output(body, "probability"), expected, rtol=1e-6)
        assert set(output(body, "model_version")) == {"v1"}
    finally:
        server.stop()


def test_churn_serve_model_dir_refuses_a_tampered_artefact(exported, settings_path, tmp_path):
    tampered = tamper(exported[0], tmp_path)
    command, env = churn_serve(settings_path, tampered, version="v1", ports=(1, 1))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "artefact 'model.ubj' of version v1 failed verification: expected sha256" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_churn_serve_model_dir_refuses_another_version(exported, settings_path):
    command, env = churn_serve(settings_path, exported[0], version="v2", ports=(1, 1))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        f"Error: {exported[0]} holds model version v1 (its manifest.json) but "
        "CHURN_MODEL_VERSION is 'v2'"
    ) in result.stderr


def mlserver(
    models_dir: Path, cwd: Path, log: Path, *, metrics_port: int | None = None, **extra_env: str
) -> tuple[subprocess.Popen, int, int]:
    """`mlserver start models_dir` on free ports, no inference workers, in its own cwd."""
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER_")}
    env |= {
        "MLSERVER_HTTP_PORT": str(http_port),
        "MLSERVER_GRPC_PORT": str(grpc_port),
        "MLSERVER_METRICS_PORT": str(metrics_port or free_port()),
        "MLSERVER_PARALLEL_WORKERS": "0",
        **extra_env,
    }
    binary = Path(sys.executable).with_name("mlserver")
    with log.open("w") as sink:
        process = subprocess.Popen(
            [str(binary), "start", str(models_dir)],
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return process, http_port, grpc_port


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def grpc_records(address: str, model: str, rows: list[dict]):
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="records", datatype="BYTES", shape=[len(rows)])
    tensor.contents.bytes_contents.extend(json.dumps(row).encode() for row in rows)
    with grpc.insecure_channel(address) as channel:
        return dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


def test_mlserver_start_serves_the_exported_folder(exported, rows, expected, tmp_path):
    folder, _ = exported
    log = tmp_path / "mlserver.log"
    process, http_port, grpc_port = mlserver(folder.parent, tmp_path, log)
    base = f"http://127.0.0.1:{http_port}/v2/models/churn-v1"
    try:
        wait_ready(process, f"{base}/ready", log, SERVE_TIMEOUT_S)

        status, body = post(f"{base}/infer", pandas_inputs(rows))
        assert status == 200, body
        np.testing.assert_allclose(output(body, "probability"), expected, rtol=1e-6)
        assert output(body, "model_version") == ["v1"] * len(rows)

        status, body = post(f"{base}/infer", records_input(rows[:2]))
        assert status == 200, body
        np.testing.assert_allclose(output(body, "probability"), expected[:2], rtol=1e-6)

        out_of_range = {**rows[0], "customer_tenure": -3}
        status, body = post(f"{base}/infer", records_input([rows[1], out_of_range]))
        assert status == 422, body
        assert "1.customer_tenure: Input should be greater than or equal to 0" in body["error"]

        reply = grpc_records(f"127.0.0.1:{grpc_port}", "churn-v1", rows[:1])
        assert reply.outputs[0].name == "probability"
        np.testing.assert_allclose(reply.outputs[0].contents.fp64_contents, expected[:1], rtol=1e-6)
        with pytest.raises(grpc.RpcError) as refused:
            grpc_records(f"127.0.0.1:{grpc_port}", "churn-v1", [out_of_range])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stop(process)


def test_mlserver_start_refuses_a_tampered_folder(exported, tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    tamper(exported[0], models_dir)
    log = tmp_path / "mlserver.log"
    process, http_port, _ = mlserver(models_dir, tmp_path, log)
    try:
        process.wait(timeout=SERVE_TIMEOUT_S)  # MLServer 1.7 stops when no model loads
    finally:
        stop(process)
    text = log.read_text()
    assert "artefact 'model.ubj' of version v1 failed verification: expected sha256" in text
    assert "Loaded model 'churn-v1' successfully" not in text


def models_with_arm(folder: Path, tmp_path: Path, arm: str) -> Path:
    """A models directory holding ``folder`` whose model-settings.json has ``arm`` in
    ``parameters.extra``, as Seldon Core 2's agent writes a Model's ``spec.parameters``."""
    models_dir = tmp_path / "models"
    copy = shutil.copytree(folder, models_dir / folder.name)
    model_settings = json.loads((copy / "model-settings.json").read_text())
    model_settings["parameters"]["extra"] = {"arm": arm}
    (copy / "model-settings.json").write_text(json.dumps(model_settings))
    return models_dir


def test_mlserver_runtime_counts_and_mirrors_its_answers_under_its_arm(
    exported, rows, expected, broker_settings, settings_path, tmp_path
):
    """Seldon Core 2: the rendered Model's `arm` parameter reaches the runtime as
    parameters.extra (what the agent writes into model-settings.json); its answers are counted
    by churn version and arm on MLServer's metrics endpoint and mirrored to ml.predictions,
    where the real lander lands them with that arm and the callers' request ids."""
    from prometheus_client.parser import text_string_to_metric_families

    from churn_assets.landing import Lander
    from churn_assets.schemas import Topics
    from churn_assets.warehouse import connect

    models_dir = models_with_arm(exported[0], tmp_path, "shadow")
    log = tmp_path / "mlserver.log"
    metrics_port = free_port()
    process, http_port, _ = mlserver(
        models_dir, tmp_path, log, metrics_port=metrics_port, CHURN_CONFIG=str(settings_path)
    )
    base = f"http://127.0.0.1:{http_port}/v2/models/churn-v1"
    sent = [{**row, "request_id": f"core2-{i}"} for i, row in enumerate(rows)]
    try:
        wait_ready(process, f"{base}/ready", log, SERVE_TIMEOUT_S)
        status, body = post(f"{base}/infer", records_input(sent))
        assert status == 200, body
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            exposition = response.read().decode()
    finally:
        stop(process)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }

    def sample(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    mine = {"version": "v1", "arm": "shadow"}
    assert sample("predictions_total", **mine, status="ok") == len(rows)
    assert sample("predictions_total", **mine, status="error") == 0
    assert sample("prediction_latency_seconds_count", **mine) == len(rows)

    assert Lander(broker_settings, Topics.PREDICTIONS).run().reached_eof
    with connect(broker_settings.warehouse_path) as con:
        landed = con.execute(
            "SELECT request_id, model_version, arm, score FROM landed_predictions "
            "ORDER BY request_id"
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in landed] == [
        (f"core2-{i}", "v1", "shadow") for i in range(len(rows))
    ]
    np.testing.assert_allclose([r[3] for r in landed], expected, rtol=1e-6)


def test_mlserver_runtime_refuses_an_unknown_arm(exported, tmp_path):
    models_dir = models_with_arm(exported[0], tmp_path, "blue")
    log = tmp_path / "mlserver.log"
    process, _, _ = mlserver(models_dir, tmp_path, log)
    try:
        process.wait(timeout=SERVE_TIMEOUT_S)  # MLServer 1.7 stops when no model loads
    finally:
        stop(process)
    assert "model parameter arm='blue' is not one of ('primary', 'canary', 'shadow')" in (
        log.read_text()
    )
