"""A champion trained on a ten-feature contract (the default eight, boolean ``senior_citizen``,
category ``tech_support``) served by a real ``churn serve``: REST, V2 over REST and gRPC take the
ten features, a request without ``tech_support`` is refused naming it, the V2 metadata and the
OpenAPI document list the ten, the mirrored prediction carries them, and the admin API refuses a
challenger the served requests cannot feed."""

import json
import urllib.error
import urllib.request

import grpc
import pytest
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc

from churn_assets.config import load_settings
from churn_assets.contract import contract_from_dict
from churn_assets.registry import ModelRegistry
from tests.integration.test_serving_spellings import mirrored
from tests.serving_fixtures import (
    ADMIN_TOKEN,
    EXTENDED_REQUEST,
    contract_model,
    extended_contract,
    infer_request,
    register_model,
    served_with_broker,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXTENDED = extended_contract()
REQUEST = EXTENDED_REQUEST
MISSING = {k: v for k, v in REQUEST.items() if k != "tech_support"}


def build(registry_dir):
    register_model(ModelRegistry(registry_dir), contract_model(EXTENDED, seed=5), "champion")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-contract")
    with served_with_broker(root, build) as running:
        yield running, load_settings(root / "config" / "config.yaml")


def call(method, url, body=None, token=None):
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_rest_scores_and_explains_the_ten_features_and_names_a_missing_one(served):
    server, settings = served
    status, prediction = call("POST", f"{server.http}/predict", {**REQUEST, "customer_id": "c-1"})
    assert status == 200 and 0 < prediction["probability"] < 1, prediction
    status, explanation = call("POST", f"{server.http}/explain?top_k=11", REQUEST)
    assert status == 200, explanation
    sources = {*EXTENDED.names, *(d.name for d in EXTENDED.derived)}
    named = {c["feature"] for c in explanation["top_contributions"]}
    assert len(named) == 11 and named <= sources, explanation
    for path, body in (
        ("/predict", MISSING),
        ("/explain", MISSING),
        ("/predict/batch", {"instances": [REQUEST, MISSING]}),
    ):
        status, reply = call("POST", f"{server.http}{path}", body)
        assert status == 422, (path, reply)
        assert [e["loc"][-1] for e in reply["detail"]] == ["tech_support"], (path, reply)
        assert reply["detail"][0]["msg"] == "Field required", (path, reply)
    event = mirrored(settings, prediction["request_id"])
    assert event["features"]["tech_support"] == "no_internet"
    assert event["features"]["senior_citizen"] is True


def test_v2_over_grpc_and_rest_takes_the_ten_features_and_names_a_missing_one(served):
    server, _ = served
    row = {**REQUEST, "customer_id": "g-1"}
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model, version in (("churn-router", ""), ("churn", "v1"), ("churn-explainer", "")):
            answer = stub.ModelInfer(
                infer_request([row, row], model, version, names=EXTENDED.names), timeout=60
            )
            assert answer.outputs[0].shape[0] == 2, (model, answer)
            request = infer_request([row], model, version, names=MISSING)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, model
            assert "tech_support" in info.value.details(), (model, info.value.details())
        request = infer_request([row], names=EXTENDED.names)
        senior = next(t for t in request.inputs if t.name == "senior_citizen")
        senior.datatype = "INT64"
        senior.contents.ClearField("bool_contents")
        senior.contents.int64_contents.append(1)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "senior_citizen" in info.value.details() and "true or false" in info.value.details()

    inputs = [
        {"name": name, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64"}
        | {"data": [v]}
        for name, v in MISSING.items()
    ]
    for item in inputs:
        if isinstance(MISSING[item["name"]], bool):
            item["datatype"] = "BOOL"
        elif isinstance(MISSING[item["name"]], int):
            item["datatype"] = "INT64"
    status, reply = call("POST", f"{server.http}/v2/models/churn-router/infer", {"inputs": inputs})
    assert status == 422 and "tech_support" in reply["error"], reply
    tech = {"name": "tech_support", "shape": [1], "datatype": "BYTES", "data": ["YES"]}
    status, reply = call(
        "POST", f"{server.http}/v2/models/churn-router/infer", {"inputs": [*inputs, tech]}
    )
    assert status == 200, reply

    for path in ("/v2/models/churn-router", "/v2/models/churn/versions/v1"):
        status, metadata = call("GET", f"{server.http}{path}")
        assert status == 200, metadata
        assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [
            (f.name, {"integer": "INT64", "number": "FP64", "boolean": "BOOL"}.get(f.kind, "BYTES"))
            for f in EXTENDED.features
        ], metadata


def test_the_openapi_request_is_the_served_contract(served):
    server, _ = served
    status, docs = call("GET", f"{server.http}/openapi.json")
    assert status == 200
    schema = docs["components"]["schemas"]["PredictRequest"]
    assert set(EXTENDED.names) <= set(schema["required"])
    assert schema["properties"]["senior_citizen"]["type"] == "boolean"
    assert "No internet service" in schema["properties"]["tech_support"]["enum"]
    example = docs["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert set(example["examples"]["record"]["value"]) == set(EXTENDED.names)


def test_the_admin_api_refuses_a_challenger_the_served_requests_cannot_feed(served):
    """A version trained when ``tech_support`` had no ``no_internet`` cannot score the
    requests the champion's contract lets in: 409, naming the input, and nothing changes."""
    server, settings = served
    raw = EXTENDED.as_dict()
    tech = next(f for f in raw["features"] if f["name"] == "tech_support")
    tech["categories"] = {"yes": [], "no": []}
    narrower = contract_from_dict(raw)
    registry = ModelRegistry(settings.registry_dir)
    version = register_model(registry, contract_model(narrower, seed=6))
    before = call("GET", f"{server.http}/router/metrics")[1]["state"]
    status, reply = call(
        "PUT",
        f"{server.http}/router/policy",
        {"strategy": "canary", "canary_weight": 0.5, "challenger": version},
        token=ADMIN_TOKEN,
    )
    assert status == 409, reply
    assert version in reply["detail"] and "tech_support" in reply["detail"], reply
    assert "no_internet" in reply["detail"], reply
    assert call("GET", f"{server.http}/router/metrics")[1]["state"] == before
    assert "challenger" not in registry.aliases()
