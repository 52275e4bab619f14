"""Serving's REST edge as an outside caller meets it: strict input, size limits, a broker that is
down, a header that is not ASCII, a damaged old version. A real `churn serve` process each time;
its Kafka address points at a port where no broker listens (a stopped broker)."""

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from churn_assets.registry import ModelRegistry
from tests.conftest import write_config
from tests.serving_fixtures import (
    ADMIN_TOKEN,
    build_registry,
    copy_registry,
    free_port,
    start_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_BODY = 4 * 1024 * 1024  # serving.max_request_bytes, the default

GOOD = {
    "customer_id": "C0000001",
    "customer_tenure": 12,
    "monthly_charges": 70.5,
    "total_charges": 846.0,
    "contract_type": "month-to-month",
    "payment_method": "electronic_check",
    "internet_service": "fiber_optic",
    "support_tickets": 2,
    "login_frequency": 14.0,
}


@pytest.fixture(scope="module")
def trained_registry(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("registry") / "models")


def _config_without_broker(directory: Path) -> Path:
    """Config whose Kafka is a port nothing listens on: the broker is down."""
    return write_config(directory, kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})


@pytest.fixture(scope="module")
def server(tmp_path_factory, trained_registry):
    directory = tmp_path_factory.mktemp("serve")
    config = _config_without_broker(directory)
    copy_registry(trained_registry, directory / "data" / "models")
    running = start_server(config, directory / "serve.log")
    yield running
    running.stop()


def call(method, url, body=None, headers=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_field_errors(reply: dict) -> None:
    """The published 422 schema: detail is a list of {loc, msg, type}."""
    assert isinstance(reply["detail"], list) and reply["detail"], reply
    for error in reply["detail"]:
        assert set(error) == {"loc", "msg", "type"}, error
        assert all(isinstance(part, str | int) for part in error["loc"]), error
        assert isinstance(error["msg"], str) and isinstance(error["type"], str), error


COERCIONS = [
    ("/predict", {**GOOD, "customer_tenure": True}, "customer_tenure"),
    ("/predict", {**GOOD, "login_frequency": False}, "login_frequency"),
    ("/predict", {**GOOD, "customer_tenure": "50"}, "customer_tenure"),
    ("/predict", {**GOOD, "monthly_charges": "50"}, "monthly_charges"),
    ("/predict", {**GOOD, "support_tickets": 2.5}, "support_tickets"),
    ("/predict", {**GOOD, "customer_id": "C1\x00"}, "customer_id"),
    ("/predict", {**GOOD, "customer_id": "C1\nC2"}, "customer_id"),
    ("/predict", {**GOOD, "customer_id": "C1\u202egnp.exe"}, "customer_id"),
    ("/predict", {**GOOD, "request_id": "r\u200b1"}, "request_id"),
    ("/predict", {**GOOD, "customer_id": "C" * 129}, "customer_id"),
    ("/predict/batch", {"instances": [{**GOOD, "customer_tenure": True}]}, "customer_tenure"),
    ("/explain", {**GOOD, "total_charges": "846"}, "total_charges"),
    ("/feedback", {"customer_id": "C1", "churned": True, "outcome_time": 0}, "outcome_time"),
    ("/feedback", {"customer_id": "C1", "churned": True, "outcome_time": 1.7e9}, "outcome_time"),
    ("/feedback", {"customer_id": "C1", "churned": 1}, "churned"),
    ("/feedback", {"customer_id": "C1", "churned": "true"}, "churned"),
    ("/feedback", {"customer_id": "C1\r\n", "churned": True}, "customer_id"),
    ("/feedback", {"customer_id": "C1", "churned": True, "extra": 1}, "extra"),
]


def test_coerced_or_unprintable_input_is_422_with_the_field_named(server):
    for path, body, field in COERCIONS:
        status, reply = call("POST", f"{server.http}{path}", body)
        assert status == 422, (path, body, reply)
        assert_field_errors(reply)
        assert any(field in map(str, e["loc"]) for e in reply["detail"]), (path, reply)
    # The same record with plain values is scored, and an id in any script is kept.
    status, reply = call("POST", f"{server.http}/predict", {**GOOD, "customer_id": "клиент-7"})
    assert status == 200 and reply["customer_id"] == "клиент-7", reply


def test_a_batch_over_the_limit_is_refused_before_its_records_are_read(server):
    # 1001 records, each of them invalid: the answer is the batch size, not 1001 field errors.
    bad = {**GOOD, "customer_tenure": -1}
    status, reply = call("POST", f"{server.http}/predict/batch", {"instances": [bad] * 1001})
    assert status == 422
    assert_field_errors(reply)
    assert len(reply["detail"]) == 1 and "at most 1000" in reply["detail"][0]["msg"], reply


def _upload(url: str, declared: int | None, send: int, chunk: int = 64 * 1024):
    """POST with ``declared`` Content-Length (None: chunked) and ``send`` body bytes, then read
    the answer; the rest of a declared body is never sent."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    with sock:
        head = ["POST /predict HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
        head.append(
            f"Content-Length: {declared}" if declared is not None else "Transfer-Encoding: chunked"
        )
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        payload = b" " * chunk
        try:
            while sent < send:
                part = payload[: min(chunk, send - sent)]
                if declared is None:
                    sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                else:
                    sock.sendall(part)
                sent += len(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early: read what it said
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read().decode()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_bodies_over_the_limit_are_413_and_health_checks_carry_on(server):
    rss_before = _rss_kb(server.process.pid)
    health: list[tuple[int, float]] = []
    stop = threading.Event()

    def check_health() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            with urllib.request.urlopen(f"{server.http}/v2/health/ready", timeout=10) as r:
                health.append((r.status, time.perf_counter() - started))
            time.sleep(0.02)

    checker = threading.Thread(target=check_health)
    checker.start()
    try:
        answers = {
            # Declared sizes: refused from the header, the body is never read.
            "10 MB": _upload(server.http, 10 * 1024 * 1024, send=256 * 1024),
            "100 MB": _upload(server.http, 100 * 1024 * 1024, send=256 * 1024),
            # Chunked, no size given: refused once what arrived passes the limit.
            "chunked": _upload(server.http, None, send=MAX_BODY + 512 * 1024),
        }
        bad_length = _upload(server.http, -1, send=0)
    finally:
        stop.set()
        checker.join()
    for name, (status, body) in answers.items():
        assert status == 413, (name, body)
        assert "serving.max_request_bytes" in json.loads(body)["detail"], (name, body)
    assert bad_length[0] == 400, bad_length  # a negative Content-Length is refused as such
    assert health and all(status == 200 for status, _ in health)
    assert max(seconds for _, seconds in health) < 1.0, health
    # Nothing of the large bodies was kept.
    assert _rss_kb(server.process.pid) - rss_before < 50 * 1024
    # A body just under the limit is read and validated as usual.
    status, reply = call("POST", f"{server.http}/predict", raw=b" " * (MAX_BODY - 64) + b"{}")
    assert status == 422, reply


def test_feedback_with_the_broker_down_is_503_and_never_stalls_predictions(server):
    """20 concurrent feedback calls against a broker that is down each get 503 within the
    bound, while /predict calls made meanwhile keep answering at their usual speed."""
    results: list[tuple[int, dict, float]] = []
    lock = threading.Lock()

    def send_feedback(n: int) -> None:
        started = time.perf_counter()
        status, reply = call(
            "POST", f"{server.http}/feedback", {"customer_id": f"C{n:07d}", "churned": True}
        )
        with lock:
            results.append((status, reply, time.perf_counter() - started))

    for _ in range(5):  # warm the scoring path
        assert call("POST", f"{server.http}/predict", GOOD)[0] == 200
    senders = [threading.Thread(target=send_feedback, args=(n,)) for n in range(20)]
    for sender in senders:
        sender.start()
    time.sleep(0.3)
    latencies = []
    while any(sender.is_alive() for sender in senders):
        started = time.perf_counter()
        status, _ = call("POST", f"{server.http}/predict", GOOD)
        latencies.append((time.perf_counter() - started) * 1000)
        assert status == 200
        time.sleep(0.01)
    for sender in senders:
        sender.join()
    assert len(results) == 20
    for status, reply, seconds in results:
        assert status == 503, reply
        assert "delivered to Kafka" in reply["detail"] and "retry" in reply["detail"], reply
        assert seconds < 8.0, seconds  # 5 s delivery timeout, answered within the bound
    assert len(latencies) >= 50, latencies
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 50, f"/predict p99 {p99:.1f} ms during feedback waits ({len(latencies)} calls)"


def test_an_authorization_header_outside_ascii_is_401_not_500(server):
    for value in ("Bearer ünïcødé", "Bearer " + ADMIN_TOKEN + "é", "Bérer x"):
        connection = http.client.HTTPConnection(server.http.removeprefix("http://"), timeout=10)
        connection.putrequest("POST", "/router/promote-v2")
        connection.putheader("Authorization", value.encode("latin-1"))
        connection.putheader("Content-Length", "0")
        connection.endheaders()
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()
        assert response.status == 401, (value, body)
        assert body == {"detail": "admin token missing or wrong"}


def test_a_damaged_version_no_traffic_uses_is_quarantined_and_serving_starts(
    tmp_path, trained_registry
):
    """v1 champion; v2 registered but not routed (no challenger alias) and tampered with: the
    server starts and serves v1, and reports v2 in /router/metrics, /metrics and the log."""
    config = _config_without_broker(tmp_path)
    models = tmp_path / "data" / "models"
    copy_registry(trained_registry, models)
    registry = ModelRegistry(models)
    registry.clear_alias("challenger")
    artefact = next(p for p in (models / "v2").iterdir() if p.name != "manifest.json")
    artefact.write_bytes(artefact.read_bytes()[:-10] + b"tampered!!")
    running = start_server(config, tmp_path / "serve.log")
    try:
        status, reply = call("POST", f"{running.http}/predict", GOOD)
        assert status == 200 and reply["model_version"] == "v1", reply
        status, metrics = call("GET", f"{running.http}/router/metrics")
        assert list(metrics["quarantined"]) == ["v2"], metrics["quarantined"]
        assert artefact.name in metrics["quarantined"]["v2"]
        with urllib.request.urlopen(f"{running.http}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        assert 'model_quarantined{version="v2"} 1.0' in exposition
        # Asking for it as a challenger is a clear 404, and serving stays as it was.
        status, reply = call(
            "PUT",
            f"{running.http}/router/policy",
            {"challenger": "v2", "strategy": "shadow"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert status == 404 and "v2" in reply["detail"], reply
        assert call("GET", f"{running.http}/router/metrics")[1]["state"]["challenger"] is None
    finally:
        running.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "version v2 quarantined (not served)" in log


def test_a_damaged_champion_still_stops_the_start(tmp_path, trained_registry):
    config = _config_without_broker(tmp_path)
    models = tmp_path / "data" / "models"
    copy_registry(trained_registry, models)
    shutil.rmtree(models / "v1")
    (models / "v1").mkdir()
    with pytest.raises(RuntimeError, match="server exited early") as info:
        start_server(config, tmp_path / "serve.log", timeout_s=60)
    assert "v1" in str(info.value)


def test_ctrl_c_stops_serving_and_its_anchors_worker_without_tracebacks(tmp_path, trained_registry):
    """Ctrl-C in a terminal reaches the whole foreground process group: the anchors worker
    ignores it and the server stops it cleanly (exit 0, no KeyboardInterrupt anywhere)."""
    config = _config_without_broker(tmp_path)
    copy_registry(trained_registry, tmp_path / "data" / "models")
    running = start_server(config, tmp_path / "serve.log", new_session=True)
    try:
        status, reply = call("POST", f"{running.http}/explain?method=anchors", GOOD)
        assert status == 200 and reply["method"] == "anchors", reply
        os.killpg(running.process.pid, signal.SIGINT)
        assert running.process.wait(timeout=60) == 0
    finally:
        running.stop()
    log = (tmp_path / "serve.log").read_text()
    assert "SIGINT received: stopping" in log
    assert "KeyboardInterrupt" not in log and "Traceback" not in log, log[-3000:]
