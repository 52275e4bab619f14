"""The real serving process: MLServer V2 over REST and gRPC, router, admin, mirror, metrics."""

import json
import math
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from mlserver.grpc import dataplane_pb2_grpc, model_repository_pb2_grpc
from mlserver.grpc import model_repository_pb2 as repo_pb

from churn_assets.broker import EmbeddedBroker
from churn_assets.kafka import scan_topic
from churn_assets.model import load_model
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import FEATURE_NAMES, Topics
from churn_assets.simulator import sample_customers
from tests.serving_fixtures import (
    ADMIN_TOKEN,
    build_registry,
    copy_registry,
    infer_request,
    start_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained_registry(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("registry") / "models")


@pytest.fixture
def server(broker_settings, settings_path, trained_registry, tmp_path):
    copy_registry(trained_registry, broker_settings.registry_dir)
    running = start_server(settings_path, tmp_path / "serve.log")
    yield running
    running.stop()


def call(method, url, body=None, token=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            ctype = response.headers.get("content-type", "")
            return response.status, (json.loads(raw) if "json" in ctype else raw.decode())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode()


def customers(n, seed=3):
    frame = sample_customers(n, seed=seed)
    rows = frame[["customer_id", *FEATURE_NAMES]].to_dict("records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in rows]


def v2_inputs(rows):
    inputs = []
    for name in ("customer_id", *FEATURE_NAMES):
        values = [row[name] for row in rows]
        if isinstance(values[0], str):
            inputs.append(
                {
                    "name": name,
                    "shape": [len(rows)],
                    "datatype": "BYTES",
                    "data": values,
                    "parameters": {"content_type": "str"},
                }
            )
        elif isinstance(values[0], int):
            inputs.append({"name": name, "shape": [len(rows)], "datatype": "INT64", "data": values})
        else:
            inputs.append({"name": name, "shape": [len(rows)], "datatype": "FP64", "data": values})
    return {"inputs": inputs, "parameters": {"content_type": "pd"}}


def output(response, name):
    return next(o for o in response["outputs"] if o["name"] == name)["data"]


def grpc_infer(address, model, rows, version=None):
    request = infer_request(rows, model, version or "")
    with grpc.insecure_channel(address) as channel:
        return dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


def test_v2_rest_and_grpc_agree_with_the_library(server, broker_settings):
    rows = customers(40)
    v1 = load_model(ModelRegistry(broker_settings.registry_dir), "v1")
    expected = v1.predict_records(rows)

    status, body = call("POST", f"{server.http}/v2/models/churn-router/infer", v2_inputs(rows))
    assert status == 200, body
    np.testing.assert_allclose(output(body, "probability"), expected, rtol=1e-6)
    assert set(output(body, "model_version")) == {"v1"}  # shadow strategy: champion answers

    reply = grpc_infer(server.grpc, "churn-router", rows)
    probabilities = next(o for o in reply.outputs if o.name == "probability")
    np.testing.assert_allclose(list(probabilities.contents.fp64_contents), expected, rtol=1e-6)

    records = {
        "inputs": [
            {
                "name": "records",
                "shape": [2],
                "datatype": "BYTES",
                "data": [json.dumps(r) for r in rows[:2]],
                "parameters": {"content_type": "str"},
            }
        ]
    }
    status, body = call("POST", f"{server.http}/v2/models/churn-router/infer", records)
    assert status == 200, body
    np.testing.assert_allclose(output(body, "probability"), expected[:2], rtol=1e-6)

    v2 = load_model(ModelRegistry(broker_settings.registry_dir), "v2")
    status, body = call("POST", f"{server.http}/v2/models/churn/versions/v2/infer", v2_inputs(rows))
    assert status == 200, body
    np.testing.assert_allclose(output(body, "probability"), v2.predict_records(rows), rtol=1e-6)

    status, body = call("GET", f"{server.http}/v2/models/churn-router")
    assert status == 200 and body["name"] == "churn-router"


def test_product_endpoints_shadow_mirror_and_metrics(server, broker_settings):
    rows = customers(30, seed=5)
    v1 = load_model(ModelRegistry(broker_settings.registry_dir), "v1")
    for row, expected in zip(rows, v1.predict_records(rows), strict=True):
        status, body = call("POST", f"{server.http}/predict", row)
        assert status == 200, body
        # Shadow never alters the primary answer: the champion's exact score.
        assert (body["model_version"], body["arm"]) == ("v1", "primary")
        assert body["probability"] == pytest.approx(expected, rel=1e-6)

    deadline = time.monotonic() + 10  # shadows are scored off the request path
    while True:
        status, analysis = call("GET", f"{server.http}/router/shadow-analysis")
        if analysis.get("pairs", 0) >= 30 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200
    assert analysis["pairs"] == 30 and analysis["shadow_version"] == "v2"
    assert 0 <= analysis["agreement_rate"] <= 1

    status, explanation = call("POST", f"{server.http}/explain", rows[0])
    assert status == 200
    contributions = sum(c["contribution"] for c in explanation["top_contributions"])
    assert math.isfinite(contributions) and len(explanation["top_contributions"]) == 5

    status, metrics = call("GET", f"{server.http}/metrics")
    assert 'predictions_total{arm="primary",status="ok",version="v1"}' in metrics
    assert "prediction_latency_seconds_bucket" in metrics
    assert 'router_traffic_weight{arm="primary",version="v1"} 1.0' in metrics

    status, feedback = call(
        "POST", f"{server.http}/feedback", {"customer_id": rows[0]["customer_id"], "churned": True}
    )
    assert status == 200 and feedback["accepted"]

    # Every primary and shadow prediction reaches ml.predictions.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        mirrored = sum(e.messages for e in scan_topic(broker_settings, Topics.PREDICTIONS))
        if mirrored >= 60:
            break
        time.sleep(0.5)
    assert mirrored == 60
    assert sum(e.messages for e in scan_topic(broker_settings, Topics.FEEDBACK)) == 1


def test_malformed_inputs_give_field_errors_never_500(server):
    good = customers(1)[0]
    cases = [
        ({k: v for k, v in good.items() if k != "support_tickets"}, "support_tickets"),
        ({**good, "monthly_charges": "lots"}, "monthly_charges"),
        ({**good, "customer_tenure": -3}, "customer_tenure"),
        ({**good, "contract_type": "forever"}, "contract_type"),
        ({**good, "favourite": 1}, "favourite"),
    ]
    for body, field in cases:
        status, reply = call("POST", f"{server.http}/predict", body)
        assert status == 422, (field, reply)
        assert any(field in ".".join(map(str, e["loc"])) for e in reply["detail"]), reply
    # NaN is not valid JSON for strict parsers; send it the way Python's json does.
    raw = json.dumps({**good, "login_frequency": float("nan")})
    request = urllib.request.Request(
        f"{server.http}/predict",
        data=raw.encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 422
    status, reply = call("POST", f"{server.http}/predict/batch", {"instances": [good] * 1001})
    assert status == 422 and "instances" in json.dumps(reply)

    bad_v2 = v2_inputs([{**good, "support_tickets": -1}])
    status, reply = call("POST", f"{server.http}/v2/models/churn-router/infer", bad_v2)
    assert status == 422 and "support_tickets" in json.dumps(reply)
    with pytest.raises(grpc.RpcError) as info:
        grpc_infer(server.grpc, "churn-router", [{**good, "contract_type": "forever"}])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contract_type" in info.value.details()


def test_admin_needs_the_token_and_repository_calls_are_closed(server):
    for token in (None, "wrong"):
        status, _ = call("POST", f"{server.http}/router/promote-v2", token=token)
        assert status == 401
        status, _ = call("PUT", f"{server.http}/router/policy", {"canary_weight": 0.5}, token=token)
        assert status == 401
    status, _ = call("POST", f"{server.http}/v2/repository/index", {})
    assert status == 404
    with grpc.insecure_channel(server.grpc) as channel:
        stub = model_repository_pb2_grpc.ModelRepositoryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryIndex(repo_pb.RepositoryIndexRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status, docs = call("GET", f"{server.http}/openapi.json")
    assert status == 200 and "/predict" in docs["paths"] and "/router/promote-v2" in docs["paths"]
    status, page = call("GET", f"{server.http}/docs")
    assert status == 200 and "swagger" in page.lower()


def test_router_changes_persist_across_restarts(server, settings_path, tmp_path, broker_settings):
    status, state = call(
        "PUT",
        f"{server.http}/router/policy",
        {"strategy": "canary", "canary_weight": 0.3},
        token=ADMIN_TOKEN,
    )
    assert status == 200, state
    rows = customers(400, seed=11)
    status, body = call("POST", f"{server.http}/predict/batch", {"instances": rows})
    first = {p["customer_id"]: p["model_version"] for p in body["predictions"]}
    share = sum(v == "v2" for v in first.values()) / len(first)
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(first))
    server.stop()

    restarted = start_server(settings_path, tmp_path / "serve2.log")
    try:
        status, metrics = call("GET", f"{restarted.http}/router/metrics")
        assert metrics["state"]["strategy"] == "canary"
        assert metrics["state"]["canary_weight"] == 0.3
        status, body = call("POST", f"{restarted.http}/predict/batch", {"instances": rows})
        again = {p["customer_id"]: p["model_version"] for p in body["predictions"]}
        assert again == first  # sticky across the restart

        status, promoted = call("POST", f"{restarted.http}/router/promote-v2", token=ADMIN_TOKEN)
        assert status == 200 and promoted["champion"] == "v2"
    finally:
        restarted.stop()
    assert ModelRegistry(broker_settings.registry_dir).aliases()["champion"] == "v2"

    third = start_server(settings_path, tmp_path / "serve3.log")
    try:
        status, body = call("POST", f"{third.http}/predict", rows[0])
        assert body["model_version"] == "v2"
        status, rolled = call("POST", f"{third.http}/router/rollback", token=ADMIN_TOKEN)
        assert status == 200 and rolled["champion"] == "v1"
        status, audit = call("GET", f"{third.http}/router/audit", token=ADMIN_TOKEN)
        assert [e["action"] for e in audit] == ["init", "set_policy", "promote", "rollback"]
    finally:
        third.stop()


def test_predictions_succeed_with_the_broker_stopped_and_drops_are_counted(server, broker_settings):
    row = customers(1)[0]
    assert call("POST", f"{server.http}/predict", row)[0] == 200
    EmbeddedBroker(broker_settings.run_dir).stop()
    for _ in range(20):
        status, body = call("POST", f"{server.http}/predict", row)
        assert status == 200 and body["model_version"] == "v1"
    deadline = time.monotonic() + 30
    dropped = 0.0
    while time.monotonic() < deadline:
        _, metrics = call("GET", f"{server.http}/metrics")
        dropped = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("mirror_dropped_total{")
        )
        if dropped >= 40:
            break
        time.sleep(1)
    assert dropped >= 40  # 20 primary + 20 shadow events could not be delivered


def test_anchor_explanations_run_off_the_serving_process(server):
    row = customers(1, seed=9)[0]
    status, body = call("POST", f"{server.http}/explain?method=anchors", row)
    assert status == 200, body
    assert body["method"] == "anchors" and body["model_version"] == "v1"
    assert body["anchor"] and all(isinstance(rule, str) for rule in body["anchor"])
    assert 0 < body["coverage"] <= 1 and 0 < body["precision"] <= 1

    request = {
        "inputs": [
            {
                "name": "records",
                "shape": [1],
                "datatype": "BYTES",
                "data": [json.dumps(row)],
                "parameters": {"content_type": "str"},
            }
        ],
        "parameters": {"method": "anchors"},
    }
    status, reply = call("POST", f"{server.http}/v2/models/churn-explainer/infer", request)
    assert status == 200, reply
    assert json.loads(output(reply, "explanation")[0])["anchor"] == body["anchor"]

    # TensorFlow (imported by Alibi) stays in the worker process, never in the server.
    with open(f"/proc/{server.process.pid}/maps") as maps:
        assert "tensorflow" not in maps.read()
