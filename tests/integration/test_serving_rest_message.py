"""``POST /v2/models/churn-router/infer`` answered from its JSON (``serving.rest_message``) says
what MLServer's own route says: the same status, body and headers, request by request, for good
requests and bad ones. A real ``churn serve`` and broker; each request is sent twice, once as it
is (the JSON route takes it: ``plain_inputs`` is checked to accept it) and once gzip-encoded
(``Content-Encoding: gzip``, which only MLServer's route decodes)."""

import gzip
import http.client
import json
import re
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.datastructures import Headers

from serving.rest_message import plain_inputs
from tests.serving_fixtures import DOCUMENTED_REQUEST, served_with_broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
GENERATED_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
DATATYPES = {bool: "BOOL", int: "INT64", float: "FP64", str: "BYTES"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_with_broker(tmp_path_factory.mktemp("rest-message")) as running:
        yield running


def rows(n: int) -> list[dict[str, Any]]:
    return [
        {"customer_id": f"C{i:07d}", **DOCUMENTED_REQUEST, "monthly_charges": 40.0 + 7.5 * i}
        for i in range(n)
    ]


def columns(records: list[dict[str, Any]], *, nested: bool = False) -> list[dict[str, Any]]:
    """One V2 input per field, as MLServer's pandas codec sends a frame."""
    inputs = []
    for name in records[0]:
        values = [record[name] for record in records]
        item: dict[str, Any] = {
            "name": name,
            "shape": [len(values), 1] if nested else [len(values)],
            "datatype": DATATYPES[type(values[0])],
            "data": [[v] for v in values] if nested else values,
        }
        if item["datatype"] == "BYTES":
            item["parameters"] = {"content_type": "str"}
        inputs.append(item)
    return inputs


def body(inputs: Any, **fields: Any) -> dict[str, Any]:
    return {**fields, "inputs": inputs}


def replaced(inputs: list[dict[str, Any]], name: str, **changes: Any) -> list[dict[str, Any]]:
    return [{**item, **changes} if item["name"] == name else item for item in inputs]


ONE, THREE = columns(rows(1)), columns(rows(3))
WITH_IDS = columns([{**row, "request_id": f"r-{i}"} for i, row in enumerate(rows(3))])
RECORDS = [
    {
        "name": "records",
        "shape": [2],
        "datatype": "BYTES",
        "data": [json.dumps(row) for row in rows(2)],
    }
]

GOOD = {
    "one record, an id": body(ONE, id="abc-1", parameters={"content_type": "pd"}),
    "three records, no id": body(THREE),
    "nested data [3, 1]": body(columns(rows(3), nested=True), id="n-3"),
    "request ids given": body(WITH_IDS, id="ids"),
    "records input": body(RECORDS, id="rec"),
    "id null": body(ONE, id=None),
    "no customer id": body([item for item in ONE if item["name"] != "customer_id"], id="anon"),
}
BAD = {
    "text in FP64": body(replaced(ONE, "monthly_charges", data=["79.99"])),
    "float in INT64": body(replaced(ONE, "customer_tenure", data=[1.5])),
    "bool in FP64": body(replaced(ONE, "login_frequency", data=[True])),
    "out of range": body(replaced(ONE, "customer_tenure", data=[-5])),
    "huge number": body(replaced(ONE, "total_charges", data=[1e308])),
    "unknown category": body(replaced(ONE, "contract_type", data=["Forever"])),
    "shape says 2": body(replaced(ONE, "customer_tenure", shape=[2])),
    "negative shape": body(replaced(ONE, "customer_tenure", shape=[-1])),
    "lengths differ": body(replaced(THREE, "support_tickets", data=[1, 2], shape=[2])),
    "unknown input": body([*ONE, {"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}]),
    "a feature missing": body([item for item in ONE if item["name"] != "login_frequency"]),
    "an input twice": body([*ONE, ONE[1]]),
    "no inputs": body([]),
    "empty data": body([{**item, "shape": [0], "data": []} for item in ONE]),
    "records and columns": body([*RECORDS, *ONE]),
    "records not JSON": body([{**RECORDS[0], "shape": [1], "data": ["{oops"]}]),
    "datatype not V2": body(replaced(ONE, "customer_tenure", datatype="INT99")),
    "data not an array": body(replaced(ONE, "customer_tenure", data=3)),
    "an id of 5": body(ONE, id=5),
    "inputs is an object": body({"name": "x"}),
}
# Forms MLServer's request model takes (coercing or ignoring): the JSON route leaves them to it.
ODD = {
    "shape of text": body(replaced(ONE, "customer_tenure", shape=["1"])),
    "an empty id": body(ONE, id=""),
    "outputs asked": body(ONE, outputs=[{"name": "probability"}]),
    "parameters with more": body(ONE, parameters={"content_type": "pd", "x": 1}),
    "a field MLServer ignores": body(ONE, extra=True),
}
RAW = {"not JSON": b'{"inputs": [', "a JSON array": b"[]", "NaN": b'{"inputs": [NaN]}'}


def post(
    server, payload: bytes, headers: dict[str, str], query: str = ""
) -> tuple[int, dict, dict[str, str]]:
    """(status, JSON body, headers); only ``headers`` are sent (no default Content-Type)."""
    connection = http.client.HTTPConnection(urlsplit(server.http).netloc, timeout=30)
    try:
        connection.request("POST", "/v2/models/churn-router/infer" + query, payload, headers)
        response = connection.getresponse()
        status, raw, got = response.status, response.read(), response.getheaders()
    finally:
        connection.close()
    return status, json.loads(raw), {k.lower(): v for k, v in got}


def both(server, payload: bytes, content_type: str | None = None):
    """(JSON route's answer, MLServer route's answer) to ``payload``."""
    headers = {"Accept-Encoding": "identity"}
    if content_type:
        headers["Content-Type"] = content_type
    direct = post(server, payload, headers)
    encoded = post(server, gzip.compress(payload), {**headers, "Content-Encoding": "gzip"})
    return direct, encoded


def normalized(answer: tuple[int, dict, dict[str, str]], sent: dict[str, Any] | None):
    """The answer with what each request makes anew (a generated id, generated request ids,
    the date and the length that follows) checked for form and blanked."""
    status, content, headers = answer
    headers = {k: v for k, v in headers.items() if k not in ("date", "content-length")}
    if status == 200 and sent is not None and sent.get("id") is None:
        assert UUID.match(content["id"]) and headers["ce-id"] == content["id"]
        content["id"] = headers["ce-id"] = headers["ce-requestid"] = "<generated>"
    for output in content.get("outputs", []):
        if output["name"] == "request_id":
            generated = [bool(GENERATED_REQUEST_ID.match(v)) for v in output["data"]]
            assert all(generated) or not any(generated), output
            if all(generated):
                output["data"] = ["<generated>"] * len(output["data"])
    return status, content, headers


@pytest.mark.parametrize("name", list(GOOD))
def test_a_good_request_gets_the_same_answer_from_both_routes(server, name):
    sent = GOOD[name]
    payload = json.dumps(sent).encode()
    assert plain_inputs(Headers({}), payload) is not None, "the JSON route must take it"
    assert plain_inputs(Headers({"content-encoding": "gzip"}), payload) is None
    direct, encoded = both(server, payload)
    assert direct[0] == 200, direct
    assert normalized(direct, sent) == normalized(encoded, sent)
    outputs = {o["name"]: o for o in direct[1]["outputs"]}
    n = len(sent["inputs"][0]["data"])
    assert outputs["probability"]["shape"] == [n, 1] and len(outputs["probability"]["data"]) == n
    assert all(0.0 < p < 1.0 for p in outputs["probability"]["data"])
    assert direct[2]["ce-modelid"] == "churn-router"
    if name == "request ids given":
        assert outputs["request_id"]["data"] == ["r-0", "r-1", "r-2"]


def test_the_same_record_scores_the_same_on_both_routes_and_application_json(server):
    payload = json.dumps(body(ONE, id="same")).encode()
    (_, direct, _), (_, encoded, _) = both(server, payload, "application/json")
    assert direct["outputs"][0]["data"] == encoded["outputs"][0]["data"]


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_is_refused_alike_by_both_routes(server, name):
    sent = BAD[name]
    direct, encoded = both(server, json.dumps(sent).encode())
    assert 400 <= direct[0] < 500, direct
    assert normalized(direct, sent) == normalized(encoded, sent)


@pytest.mark.parametrize("name", list(ODD))
def test_a_form_only_mlservers_model_takes_is_left_to_its_route(server, name):
    payload = json.dumps(ODD[name]).encode()
    assert plain_inputs(Headers({}), payload) is None
    direct, encoded = both(server, payload)
    assert direct[0] == 200, direct
    assert normalized(direct, ODD[name]) == normalized(encoded, ODD[name])


@pytest.mark.parametrize("name", list(RAW))
def test_a_body_that_is_no_request_is_refused_alike(server, name):
    direct, encoded = both(server, RAW[name])
    assert direct[0] == 422, direct
    assert normalized(direct, None) == normalized(encoded, None)


def test_a_caller_that_hangs_up_mid_body_leaves_no_error_behind(server):
    before = server.log.read_text()
    address = urlsplit(server.http)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(
            b"POST /v2/models/churn-router/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000\r\n\r\n" + json.dumps(body(ONE))[:100].encode()
        )
    time.sleep(1.0)
    written = server.log.read_text()[len(before) :]
    assert "Traceback" not in written and "Exception in ASGI" not in written, written
    direct, _ = both(server, json.dumps(body(ONE, id="after")).encode())
    assert direct[0] == 200 and direct[1]["id"] == "after"


def test_a_model_version_in_the_query_is_judged_by_mlservers_route(server):
    payload = json.dumps(body(ONE, id="q")).encode()
    assert plain_inputs(Headers({}), payload, b"model_version=v9") is None
    direct = post(server, payload, {}, "?model_version=v9")
    encoded = post(
        server, gzip.compress(payload), {"Content-Encoding": "gzip"}, "?model_version=v9"
    )
    assert direct[0] == 404 and "v9" in direct[1]["error"], direct
    assert normalized(direct, None) == normalized(encoded, None)


def test_another_content_type_goes_to_mlservers_route(server):
    payload = json.dumps(body(ONE, id="text")).encode()
    assert plain_inputs(Headers({"content-type": "text/plain"}), payload) is None
    direct, encoded = both(server, payload, "text/plain")
    assert direct[0] == 422 and normalized(direct, None) == normalized(encoded, None)
