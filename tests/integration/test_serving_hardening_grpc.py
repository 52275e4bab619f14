"""The serving process under hostile or careless clients: repository calls without the admin
token, streaming routes, malformed V2 tensors over REST and gRPC, and what the log says about
them. A real `churn serve` process, real gRPC with MLServer's generated stubs."""

import json
import re
import struct
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc, model_repository_pb2_grpc
from mlserver.grpc import model_repository_pb2 as repo_pb

from churn_assets.model import load_model
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import FEATURE_NAMES
from serving.grpc_guard import is_admin
from tests.conftest import write_config
from tests.integration.test_serving import call, customers, output, v2_inputs
from tests.serving_fixtures import (
    ADMIN_TOKEN,
    build_registry,
    copy_registry,
    infer_request,
    start_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_REQUEST_BYTES = 1024 * 1024
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture(scope="module")
def trained_registry(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("registry") / "models")


@pytest.fixture
def settings_path(tmp_path):
    """Overrides conftest's: a small request limit, so an oversize message is cheap to send."""
    return write_config(tmp_path, serving={"max_request_bytes": MAX_REQUEST_BYTES})


@pytest.fixture
def server(broker_settings, settings_path, trained_registry, tmp_path):
    copy_registry(trained_registry, broker_settings.registry_dir)
    running = start_server(settings_path, tmp_path / "serve.log")
    yield running
    running.stop()


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.grpc) as opened:
        yield opened


def raw_request(rows, model="churn-router"):
    """The same tensors as :func:`infer_request`, sent as ``raw_input_contents``."""
    request = infer_request(rows, model)
    for tensor in request.inputs:
        if tensor.datatype == "BYTES":
            values = list(tensor.contents.bytes_contents)
            raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
        elif tensor.datatype == "INT64":
            values = list(tensor.contents.int64_contents)
            raw = struct.pack(f"<{len(values)}q", *values)
        else:
            values = list(tensor.contents.fp64_contents)
            raw = struct.pack(f"<{len(values)}d", *values)
        tensor.ClearField("contents")
        request.raw_input_contents.append(raw)
    return request


def probabilities(reply):
    tensor = next(o for o in reply.outputs if o.name == "probability")
    if reply.raw_output_contents:
        index = [o.name for o in reply.outputs].index("probability")
        raw = reply.raw_output_contents[index]
        return list(struct.unpack(f"<{len(raw) // 8}d", raw))
    return list(tensor.contents.fp64_contents)


def rest_ready(server):
    try:
        with urllib.request.urlopen(f"{server.http}/v2/health/ready", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def grpc_ready(channel, model=None, version=""):
    stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
    if model is None:
        return stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    return stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=10).ready


def repository_calls(channel, metadata):
    """Index, load and unload of ``churn-router`` on both gRPC services that offer them."""
    inference = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
    repository = model_repository_pb2_grpc.ModelRepositoryServiceStub(channel)
    name = "churn-router"
    return {
        "GRPCInferenceService/RepositoryIndex": lambda: inference.RepositoryIndex(
            pb.RepositoryIndexRequest(), metadata=metadata, timeout=10
        ),
        "GRPCInferenceService/RepositoryModelUnload": lambda: inference.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name=name), metadata=metadata, timeout=10
        ),
        "GRPCInferenceService/RepositoryModelLoad": lambda: inference.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name=name), metadata=metadata, timeout=10
        ),
        "ModelRepositoryService/RepositoryIndex": lambda: repository.RepositoryIndex(
            repo_pb.RepositoryIndexRequest(), metadata=metadata, timeout=10
        ),
        "ModelRepositoryService/RepositoryModelUnload": lambda: repository.RepositoryModelUnload(
            repo_pb.RepositoryModelUnloadRequest(model_name=name), metadata=metadata, timeout=10
        ),
        "ModelRepositoryService/RepositoryModelLoad": lambda: repository.RepositoryModelLoad(
            repo_pb.RepositoryModelLoadRequest(model_name=name), metadata=metadata, timeout=10
        ),
    }


def assert_serving(server, channel, rows, expected):
    assert rest_ready(server) == 200
    assert grpc_ready(channel) is True
    assert grpc_ready(channel, "churn-router") is True
    assert grpc_ready(channel, "churn", "v1") is True
    status, body = call("POST", f"{server.http}/v2/models/churn-router/infer", v2_inputs(rows))
    assert status == 200, body
    np.testing.assert_allclose(output(body, "probability"), expected, rtol=1e-6)
    reply = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
        infer_request(rows), timeout=30
    )
    np.testing.assert_allclose(probabilities(reply), expected, rtol=1e-6)


def champion_scores(broker_settings, rows):
    return load_model(ModelRegistry(broker_settings.registry_dir), "v1").predict_records(rows)


# -- 1. the model repository ------------------------------------------------------------------


def test_anonymous_repository_calls_are_refused_on_both_grpc_services(
    server, channel, broker_settings
):
    rows = customers(5)
    expected = champion_scores(broker_settings, rows)
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", ADMIN_TOKEN),)):
        for name, rpc in repository_calls(channel, metadata).items():
            with pytest.raises(grpc.RpcError) as info:
                rpc()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
            assert "admin token" in info.value.details()
    assert_serving(server, channel, rows, expected)
    for path in ("/v2/repository/index", "/v2/repository/models/churn-router/unload"):
        assert call("POST", f"{server.http}{path}", {})[0] == 404


def test_the_admin_check_compares_bytes():
    assert is_admin((("authorization", "Bearer s3cret"),), "s3cret")
    assert not is_admin((("authorization", "Bearer s3cre"),), "s3cret")
    assert not is_admin((), "s3cret")
    assert not is_admin((("authorization", "Bearer s3cret"),), None)
    # Non-ASCII metadata (which hmac refuses to compare as str) is a refusal, not an exception.
    assert not is_admin((("authorization", "Bearer s3crët"),), "s3cret")
    assert not is_admin((("authorization", b"Bearer \xff"),), "s3cret")
    assert is_admin((("authorization", "Bearer tök€n"),), "tök€n")


def test_admin_unload_makes_serving_unready_and_load_restores_it(server, channel, broker_settings):
    rows = customers(5)
    expected = champion_scores(broker_settings, rows)
    inference = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
    repository = model_repository_pb2_grpc.ModelRepositoryServiceStub(channel)

    inference.RepositoryModelUnload(
        pb.RepositoryModelUnloadRequest(model_name="churn-router"), metadata=ADMIN, timeout=10
    )
    assert rest_ready(server) != 200
    assert grpc_ready(channel) is False
    assert grpc_ready(channel, "churn-router") is False
    status, body = call("POST", f"{server.http}/v2/models/churn-router/infer", v2_inputs(rows))
    assert status == 404 and "churn-router" in json.dumps(body)
    with pytest.raises(grpc.RpcError) as info:
        inference.ModelInfer(infer_request(rows), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    index = inference.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=ADMIN, timeout=10)
    states = {(m.name, m.version): m.state for m in index.models}
    assert states[("churn-router", "")] == "UNAVAILABLE"
    assert states[("churn", "v1")] == "READY" and states[("churn", "v2")] == "READY"

    inference.RepositoryModelLoad(
        pb.RepositoryModelLoadRequest(model_name="churn-router"), metadata=ADMIN, timeout=30
    )
    assert_serving(server, channel, rows, expected)

    # The champion's version, through the other service: unready without it, back after load.
    repository.RepositoryModelUnload(
        repo_pb.RepositoryModelUnloadRequest(model_name="churn"), metadata=ADMIN, timeout=10
    )
    assert rest_ready(server) != 200
    assert grpc_ready(channel) is False
    repository.RepositoryModelLoad(
        repo_pb.RepositoryModelLoadRequest(model_name="churn"), metadata=ADMIN, timeout=30
    )
    assert_serving(server, channel, rows, expected)
    index = repository.RepositoryIndex(repo_pb.RepositoryIndexRequest(), metadata=ADMIN, timeout=10)
    assert {(m.name, m.version): m.state for m in index.models} == {
        ("churn-router", ""): "READY",
        ("churn-explainer", ""): "READY",
        ("churn", "v1"): "READY",
        ("churn", "v2"): "READY",
    }
    status, body = call("POST", f"{server.http}/v2/models/churn/versions/v2/infer", v2_inputs(rows))
    assert status == 200, body

    with pytest.raises(grpc.RpcError) as info:
        inference.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="no-such-model"), metadata=ADMIN, timeout=10
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("model", "version"), [("churn-router", ""), ("churn", "v1")])
def test_contents_and_raw_requests_get_the_same_answer_and_metadata(
    server, channel, broker_settings, model, version
):
    """Tensors in ``contents`` take the message path (protobuf to columns, no MLServer request
    model); raw contents take MLServer's data plane. Clients see no difference: the same
    scores, outputs, id and CloudEvents trailing metadata."""
    rows = customers(3)
    stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
    answers = []
    for request in (infer_request(rows, model), raw_request(rows, model)):
        request.model_version, request.id = version, "rid-7"
        reply, call_ = stub.ModelInfer.with_call(request, timeout=30)
        answers.append((reply, dict(call_.trailing_metadata())))
    (fast, fast_metadata), (slow, slow_metadata) = answers
    assert not fast.raw_output_contents and slow.raw_output_contents
    assert [o.name for o in fast.outputs] == [o.name for o in slow.outputs]
    assert (fast.id, fast.model_name, fast.model_version) == (
        slow.id,
        slow.model_name,
        slow.model_version,
    )
    assert fast.id == "rid-7"
    np.testing.assert_allclose(probabilities(fast), champion_scores(broker_settings, rows), 1e-6)
    assert probabilities(fast) == probabilities(slow)
    assert fast_metadata == slow_metadata
    assert fast_metadata["ce-id"] == "rid-7" and fast_metadata["ce-modelid"] == model


# -- 2. streaming -------------------------------------------------------------------------------


def test_streaming_is_not_offered(server, channel):
    rows = customers(2)
    for path in (
        "/v2/models/churn-router/infer_stream",
        "/v2/models/churn/versions/v1/infer_stream",
        "/v2/models/churn-router/generate_stream",
        "/v2/models/churn/versions/v1/generate_stream",
        "/v2/models/churn-router/generate",
        "/v2/models/churn/versions/v1/generate",
    ):
        status, _ = call("POST", f"{server.http}{path}", v2_inputs(rows))
        assert status == 404, path
    status, docs = call("GET", f"{server.http}/openapi.json")
    assert status == 200
    assert not [p for p in docs["paths"] if "stream" in p or "generate" in p], docs["paths"]
    assert "/v2/models/{model_name}/infer" in docs["paths"]

    stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ModelStreamInfer(iter([infer_request(rows)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ModelInfer" in info.value.details()


# -- 3. bad input -------------------------------------------------------------------------------


def _without(request, name):
    kept = [t for t in request.inputs if t.name != name]
    del request.inputs[:]
    request.inputs.extend(kept)
    return request


def _tensor(request, name):
    return next(t for t in request.inputs if t.name == name)


def _bad_grpc_requests(rows):
    one = rows[:1]

    def wrong_datatype():
        request = _without(infer_request(one), "support_tickets")
        request.inputs.add(name="support_tickets", datatype="BYTES", shape=[1])
        request.inputs[-1].contents.bytes_contents.append(b"many")
        return request

    def unknown_datatype():
        request = infer_request(one)
        _tensor(request, "support_tickets").datatype = "INT65"
        return request

    def unknown_datatype_raw():
        request = raw_request(one)
        _tensor(request, "support_tickets").datatype = "INT65"
        return request

    def shape_of_one_input():
        request = infer_request(one)
        _tensor(request, "customer_tenure").shape[:] = [5]
        return request

    def shape_of_every_input():
        request = infer_request(one)
        for tensor in request.inputs:
            tensor.shape[:] = [5]
        return request

    def negative_shape():
        request = infer_request(one)
        for tensor in request.inputs:
            tensor.shape[:] = [-1]
        return request

    def empty_contents():
        request = infer_request(one)
        _tensor(request, "support_tickets").ClearField("contents")
        return request

    def empty_raw():
        request = raw_request(one)
        request.raw_input_contents[list(FEATURE_NAMES).index("support_tickets") + 1] = b""
        return request

    def truncated_raw():
        request = raw_request(rows)
        index = list(FEATURE_NAMES).index("monthly_charges") + 1
        request.raw_input_contents[index] = request.raw_input_contents[index][:-3]
        return request

    def truncated_raw_bytes():
        request = raw_request(rows)
        request.raw_input_contents[0] = request.raw_input_contents[0][:-2]
        return request

    def too_few_raw():
        request = raw_request(one)
        del request.raw_input_contents[-1]
        return request

    def unknown_model():
        return infer_request(one, model="no-such-model")

    def unknown_version():
        return infer_request(one, model="churn", version="v99")

    def oversize():
        request = infer_request(one)
        _tensor(request, "customer_id").contents.bytes_contents[0] = b"x" * (
            MAX_REQUEST_BYTES + 1024
        )
        return request

    def records_not_json():
        request = pb.ModelInferRequest(model_name="churn-router")
        tensor = request.inputs.add(name="records", datatype="BYTES", shape=[1])
        tensor.parameters["content_type"].string_param = "str"
        tensor.contents.bytes_contents.append(b"{not json")
        return request

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("wrong datatype", wrong_datatype(), invalid, "support_tickets"),
        ("unknown datatype", unknown_datatype(), invalid, "INT65"),
        ("unknown datatype, raw", unknown_datatype_raw(), invalid, "INT65"),
        ("shape of one input", shape_of_one_input(), invalid, "customer_tenure"),
        ("shape of every input", shape_of_every_input(), invalid, "shape"),
        ("negative shape", negative_shape(), invalid, "shape"),
        ("missing input", _without(infer_request(one), "support_tickets"), invalid, "support_"),
        ("empty contents", empty_contents(), invalid, "support_tickets"),
        ("empty raw contents", empty_raw(), invalid, "support_tickets"),
        ("truncated raw contents", truncated_raw(), invalid, "monthly_charges"),
        ("truncated raw BYTES", truncated_raw_bytes(), invalid, "customer_id"),
        ("fewer raw contents than inputs", too_few_raw(), invalid, "raw_input_contents"),
        ("records not JSON", records_not_json(), invalid, "records"),
        ("unknown model", unknown_model(), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ("unknown version", unknown_version(), grpc.StatusCode.NOT_FOUND, "v99"),
        ("oversize", oversize(), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ]


def test_bad_grpc_inputs_are_client_errors(server, channel, broker_settings):
    rows = customers(3)
    stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
    for label, request, code, mention in _bad_grpc_requests(rows):
        targets = [(request.model_name, request.model_version)]
        if request.model_name == "churn-router":  # the same tensors for every runtime
            targets += [("churn", "v1"), ("churn-explainer", "")]
        for model, version in targets:
            request.model_name, request.model_version = model, version
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=30)
            assert info.value.code() not in NEVER, (label, model, info.value.details())
            assert info.value.code() == code, (label, model, info.value.details())
            assert mention in info.value.details(), (label, model, info.value.details())

    # The same tensors, well formed, as contents and as raw contents: both answer, alike.
    expected = champion_scores(broker_settings, rows)
    np.testing.assert_allclose(
        probabilities(stub.ModelInfer(infer_request(rows), timeout=30)), expected, rtol=1e-6
    )
    np.testing.assert_allclose(
        probabilities(stub.ModelInfer(raw_request(rows), timeout=30)), expected, rtol=1e-6
    )


def _bad_rest_bodies(rows):
    one = v2_inputs(rows[:1])

    def changed(change):
        body = json.loads(json.dumps(one))
        change({item["name"]: item for item in body["inputs"]}, body)
        return body

    def every_shape(inputs, _body):
        for item in inputs.values():
            item["shape"] = [5]

    return [
        (
            "string in an INT64 input",
            changed(lambda i, _: i["support_tickets"].update(data=["lots"])),
            "support_tickets",
        ),
        (
            "float in an INT64 input",
            changed(lambda i, _: i["customer_tenure"].update(data=[1.5])),
            "customer_tenure",
        ),
        (
            "number in a BYTES input",
            changed(lambda i, _: i["contract_type"].update(data=[3])),
            "contract_type",
        ),
        (
            "wrong datatype for a feature",
            changed(lambda i, _: i["support_tickets"].update(datatype="BYTES", data=["many"])),
            "support_tickets",
        ),
        ("shape [5] with one value", changed(every_shape), "shape"),
        (
            "shape of one input",
            changed(lambda i, _: i["login_frequency"].update(shape=[2])),
            "login_frequency",
        ),
        (
            "missing input",
            changed(lambda i, b: b["inputs"].remove(i["support_tickets"])),
            "support_tickets",
        ),
        ("no inputs", {"inputs": []}, "input"),
        (
            "data that is not an array",
            changed(lambda i, _: i["customer_tenure"].update(data={"a": 1})),
            "customer_tenure",
        ),
    ]


def test_bad_rest_v2_inputs_are_4xx_with_a_json_body(server):
    rows = customers(2)
    paths = (
        "/v2/models/churn-router/infer",
        "/v2/models/churn/versions/v1/infer",
        "/v2/models/churn-explainer/infer",
    )
    for label, body, mention in _bad_rest_bodies(rows):
        for path in paths:
            status, reply = call("POST", f"{server.http}{path}", body)
            assert 400 <= status < 500, (label, path, status, reply)
            assert isinstance(reply, dict), (label, path, reply)
            assert mention in json.dumps(reply), (label, path, reply)
    status, reply = call("POST", f"{server.http}/v2/models/no-such-model/infer", v2_inputs(rows))
    assert status == 404 and "no-such-model" in reply["error"]
    status, reply = call(
        "POST", f"{server.http}/v2/models/churn/versions/v99/infer", v2_inputs(rows)
    )
    assert status == 404 and "v99" in reply["error"]
    status, reply = call("POST", f"{server.http}/v2/models/churn-router/infer", v2_inputs(rows))
    assert status == 200, reply


# -- 4. the event loop --------------------------------------------------------------------------


def test_a_long_explanation_does_not_hold_up_other_requests(server):
    rows = customers(1000, seed=21)
    body = {
        "inputs": [
            {
                "name": "records",
                "shape": [len(rows)],
                "datatype": "BYTES",
                "data": [json.dumps(r) for r in rows],
                "parameters": {"content_type": "str"},
            }
        ]
    }
    answered: dict[str, float] = {}

    def explain():
        started = time.monotonic()
        status, reply = call("POST", f"{server.http}/v2/models/churn-explainer/infer", body)
        assert status == 200, reply
        answered["explain"] = time.monotonic() - started

    worker = threading.Thread(target=explain)
    worker.start()
    time.sleep(0.3)  # the explanation is running
    live = []
    while worker.is_alive():
        started = time.monotonic()
        with urllib.request.urlopen(f"{server.http}/v2/health/live", timeout=30) as response:
            assert response.status == 200
        live.append(time.monotonic() - started)
        time.sleep(0.05)
    worker.join()
    assert answered["explain"] > 1.0, answered  # long enough for the comparison to mean much
    assert live, "the explanation ended before the first health check"
    # On the event loop, the first health check would wait for the whole explanation.
    assert max(live) < answered["explain"] / 4, (max(live), answered)


# -- 5. the log ---------------------------------------------------------------------------------


def test_a_rejected_request_logs_one_warning_line_without_traceback(server, channel):
    rows = customers(1)
    before = server.log.read_text()
    assert before.count("Loaded model 'churn-router' successfully") == 1, before
    assert before.count("gRPC server running on") == 1, before

    bad = v2_inputs(rows)
    next(i for i in bad["inputs"] if i["name"] == "support_tickets")["data"] = ["lots"]
    status, _ = call("POST", f"{server.http}/v2/models/churn-router/infer", bad)
    assert status == 422
    request = raw_request(rows)
    request.raw_input_contents[1] = request.raw_input_contents[1][:-1]
    with pytest.raises(grpc.RpcError) as info:
        dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="churn-router"), timeout=10
        )
    # A readiness check's "not ready" is an answer, not a rejected request: no log line.
    assert call("GET", f"{server.http}/v2/models/churn/versions/v99/ready")[0] == 404
    time.sleep(0.5)  # let the server write its log lines

    added = server.log.read_text()[len(before) :]
    assert "Traceback" not in added, added
    warnings = [line for line in added.splitlines() if re.search(r"\bWARNING\b", line)]
    assert len(warnings) == 3, added
    assert "422" in warnings[0] and "support_tickets" in warnings[0], warnings
    assert "INVALID_ARGUMENT" in warnings[1] and "customer_tenure" in warnings[1], warnings
    assert "UNAUTHENTICATED" in warnings[2], warnings
    assert not [line for line in added.splitlines() if re.search(r"\bERROR\b", line)], added
