"""The model as a Seldon Core v1 Python-wrapper component, called with SeldonClient.

Runs the real `seldon-core-microservice` process from the pinned seldon-core package.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from churn_assets.config import REPO_ROOT, load_settings
from churn_assets.model import load_model
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.simulator import sample_customers
from tests.serving_fixtures import build_registry, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_seldon_microservice_scores_like_the_library(settings_path, tmp_path):
    settings = load_settings(settings_path)
    build_registry(settings.registry_dir)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    parameters = json.dumps(
        [
            {"name": "version", "value": "v1", "type": "STRING"},
            {"name": "config_path", "value": str(settings_path), "type": "STRING"},
        ]
    )
    log_path = tmp_path / "seldon.log"
    binary = Path(sys.executable).with_name("seldon-core-microservice")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(binary),
                "serving.seldon_component.ChurnSeldonModel",
                "--service-type",
                "MODEL",
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
                "--metrics-port",
                str(metrics_port),
                "--parameters",
                parameters,
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            start_new_session=True,  # gunicorn forks workers; the whole group is stopped below
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"seldon microservice not up:\n{log_path.read_text()[-3000:]}")

        from seldon_core.seldon_client import SeldonClient

        rows = sample_customers(5, seed=2)[list(FEATURE_NAMES)]
        client = SeldonClient(transport="rest", microservice_endpoint=f"127.0.0.1:{http_port}")
        result = client.microservice(
            method="predict",
            data=rows.to_numpy(dtype=object),
            names=list(FEATURE_NAMES),
            payload_type="ndarray",
        )
        assert result.success, result.msg
        reply = MessageToDict(result.response)
        scores = np.array(reply["data"]["ndarray"], dtype=float).ravel()
        expected = load_model(ModelRegistry(settings.registry_dir), "v1").predict_records(
            rows.to_dict("records")
        )
        np.testing.assert_allclose(scores, expected, rtol=1e-6)

        bad = rows.to_numpy(dtype=object)
        bad[0, FEATURE_NAMES.index("contract_type")] = "forever"
        refused = client.microservice(
            method="predict", data=bad, names=list(FEATURE_NAMES), payload_type="ndarray"
        )
        assert not refused.success
        details = str(refused.msg)
        if refused.response is not None:
            details += json.dumps(MessageToDict(refused.response))
        assert "contract_type" in details

        # Numbers survive Seldon's all-strings ndarray; a bool is still not a number.
        flagged = rows.to_numpy(dtype=object)
        flagged[0, FEATURE_NAMES.index("customer_tenure")] = True
        refused = client.microservice(
            method="predict", data=flagged, names=list(FEATURE_NAMES), payload_type="ndarray"
        )
        assert not refused.success
        assert "customer_tenure: Value error, must be a whole number" in str(refused)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
