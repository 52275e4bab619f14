"""Day two for `churn serve`: clean stops, failed starts that clean up, and restarts that serve
what the registry says (the router state reconciled with the registry's aliases)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from churn_assets.registry import ModelRegistry
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.simulator import sample_customers
from serving.router import RouterState, reconcile
from tests.serving_fixtures import (
    ADMIN_TOKEN,
    RunningServer,
    build_registry,
    copy_registry,
    free_port,
    start_server,
)

STOP_WITHIN_S = 15
LOG_PROBLEMS = ("ERROR", "Traceback", "Task was destroyed", "Exception ignored")


@pytest.fixture(scope="module")
def trained_registry(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("registry") / "models")


def call(method, url, body=None, token=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def customers(n, seed=3):
    frame = sample_customers(n, seed=seed)
    rows = frame[["customer_id", *FEATURE_NAMES]].to_dict("records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in rows]


def children(pid: int) -> set[int]:
    """Direct child processes of ``pid`` (parent ids from /proc/<pid>/stat)."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def router_state(server: RunningServer) -> dict:
    status, metrics = call("GET", f"{server.http}/router/metrics")
    assert status == 200, metrics
    return metrics["state"]


def audit(server: RunningServer) -> list[dict]:
    status, entries = call("GET", f"{server.http}/router/audit", token=ADMIN_TOKEN)
    assert status == 200, entries
    return entries


def stop_cleanly(server: RunningServer) -> None:
    assert server.stop() == 0, server.log.read_text()[-4000:]
    problems = [
        line for line in server.log.read_text().splitlines() if any(p in line for p in LOG_PROBLEMS)
    ]
    assert not problems, problems


# -- stopping ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_serving_cleanly(
    signum, broker_settings, settings_path, trained_registry, tmp_path
):
    copy_registry(trained_registry, broker_settings.registry_dir)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    log = tmp_path / "serve.log"
    server = start_server(settings_path, log, extra_env={"TMPDIR": str(tmpdir)})
    try:
        with urllib.request.urlopen(f"{server.http}/v2/health/ready", timeout=10) as response:
            assert response.status == 200
        # Both Kafka producers have work: predictions (primary and shadow) and feedback.
        row = customers(1)[0]
        assert call("POST", f"{server.http}/predict", row)[0] == 200
        status, feedback = call(
            "POST", f"{server.http}/feedback", {"customer_id": row["customer_id"], "churned": True}
        )
        assert status == 200 and feedback["accepted"], feedback
        assert [p.name for p in tmpdir.iterdir()][0].startswith("churn-serving-")
        kids = children(server.process.pid)

        started = time.monotonic()
        server.process.send_signal(signum)
        code = server.process.wait(timeout=STOP_WITHIN_S)
        took = time.monotonic() - started
    finally:
        server.stop()
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert took < STOP_WITHIN_S
    problems = [line for line in output.splitlines() if any(p in line for p in LOG_PROBLEMS)]
    assert not problems, problems
    assert f"{signal.Signals(signum).name} received: stopping" in output
    assert "serving stopped" in output
    assert "prediction mirror closed: 2 delivered, 0 dropped" in output
    assert list(tmpdir.iterdir()) == []  # no churn-serving-* folder left behind
    assert not [pid for pid in kids if alive(pid)]


@pytest.mark.integration
@pytest.mark.slow
def test_a_failed_start_exits_nonzero_and_leaves_nothing(
    broker_settings, settings_path, trained_registry, tmp_path
):
    copy_registry(trained_registry, broker_settings.registry_dir)
    # A third version, registered as the challenger, whose artefact was damaged later: the
    # router would send it traffic, so the start fails after the temporary folder was made.
    registry = ModelRegistry(broker_settings.registry_dir)
    v2 = registry.get("v2")
    v3 = registry.register({name: registry.read_file("v2", name) for name in v2.files}, {})
    registry.set_alias("challenger", "v3")
    damaged = v3.path / sorted(v3.files)[0]
    damaged.write_bytes(damaged.read_bytes()[::-1])
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "CHURN_ADMIN_TOKEN": ADMIN_TOKEN}
    command = [sys.executable, "-m", "churn_assets.cli", "--config", str(settings_path), "serve"]
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    result = subprocess.run(
        command + ports, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Error: model version 'v3' cannot be loaded" in result.stderr
    assert "failed verification" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmpdir.iterdir()) == []

    # A port that is taken fails at once with one line naming the setting.
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = ["--http-port", str(port), "--grpc-port", str(free_port())]
        result = subprocess.run(
            command + ports, env=env, capture_output=True, text=True, timeout=120, check=False
        )
    assert result.returncode == 1
    assert f"Error: serving.http_port {port} on 127.0.0.1 is not free" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmpdir.iterdir()) == []

    # The same damaged version, no longer aliased: an old version the router never uses does
    # not keep the champion and challenger from serving; it is quarantined with a warning.
    registry.set_alias("challenger", "v2")
    log = tmp_path / "serve-old-damaged.log"
    server = start_server(settings_path, log, extra_env={"TMPDIR": str(tmpdir)})
    try:
        ready = [
            http_status(f"{server.http}/v2/models/churn/versions/{v}/ready")
            for v in ("v1", "v2", "v3")
        ]
    finally:
        server.stop()
    assert ready[:2] == [200, 200] and ready[2] != 200, ready
    assert "version v3 quarantined (not served)" in log.read_text()


# -- restarting: the registry's aliases win ----------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_challenger_registered_while_stopped_is_served_in_shadow(
    broker_settings, settings_path, trained_registry, tmp_path
):
    # The platform first serves v1 alone.
    copy_registry(trained_registry, broker_settings.registry_dir)
    registry = ModelRegistry(broker_settings.registry_dir)
    registry.clear_alias("challenger")
    shutil.rmtree(registry.get("v2").path)
    server = start_server(settings_path, tmp_path / "serve1.log")
    try:
        assert router_state(server)["challenger"] is None
    finally:
        stop_cleanly(server)

    # While it is stopped, a training run registers v2 as the challenger.
    source = ModelRegistry(trained_registry)
    files = {name: source.read_file("v2", name) for name in source.get("v2").files}
    registered = registry.register(files, {"metrics": source.get("v2").metadata["metrics"]})
    registry.set_alias("challenger", registered.version)
    assert registered.version == "v2"

    server = start_server(settings_path, tmp_path / "serve2.log")
    try:
        state = router_state(server)
        assert (state["champion"], state["challenger"]) == ("v1", "v2")
        assert (state["strategy"], state["canary_weight"]) == ("shadow", 0.0)
        rows = customers(20, seed=7)
        status, body = call("POST", f"{server.http}/predict/batch", {"instances": rows})
        assert status == 200
        assert {(p["model_version"], p["arm"]) for p in body["predictions"]} == {("v1", "primary")}
        deadline = time.monotonic() + 10
        while (analysis := call("GET", f"{server.http}/router/shadow-analysis")[1])[
            "pairs"
        ] < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert analysis["pairs"] == 20 and analysis["shadow_version"] == "v2"
        last = audit(server)[-1]
        assert (last["action"], last["actor"]) == ("reconcile", "system")
        assert last["registry"] == {"champion": "v1", "challenger": "v2"}
        assert last["changes"] == ["challenger v2 served in shadow, no traffic (was none)"]
    finally:
        stop_cleanly(server)
    reconciled = [
        line for line in (tmp_path / "serve2.log").read_text().splitlines() if "reconciled" in line
    ]
    assert len(reconciled) == 1 and " INFO " in reconciled[0]
    assert ModelRegistry(broker_settings.registry_dir).aliases() == {
        "champion": "v1",
        "challenger": "v2",
    }


@pytest.mark.integration
@pytest.mark.slow
def test_a_canary_resumes_exactly_unless_the_registry_moved_on(
    broker_settings, settings_path, trained_registry, tmp_path
):
    copy_registry(trained_registry, broker_settings.registry_dir)
    registry = ModelRegistry(broker_settings.registry_dir)
    server = start_server(settings_path, tmp_path / "serve1.log")
    try:
        status, canary = call(
            "PUT",
            f"{server.http}/router/policy",
            {"strategy": "canary", "canary_weight": 0.25},
            token=ADMIN_TOKEN,
        )
        assert status == 200, canary
        rows = customers(200, seed=11)
        status, body = call("POST", f"{server.http}/predict/batch", {"instances": rows})
        before = {p["customer_id"]: p["model_version"] for p in body["predictions"]}
        stored = router_state(server)
    finally:
        stop_cleanly(server)

    # Registry and stored state agree: restored exactly (same updated_at), no reconcile.
    server = start_server(settings_path, tmp_path / "serve2.log")
    try:
        assert router_state(server) == stored
        assert stored["strategy"] == "canary" and stored["canary_weight"] == 0.25
        status, body = call("POST", f"{server.http}/predict/batch", {"instances": rows})
        assert {p["customer_id"]: p["model_version"] for p in body["predictions"]} == before
        assert [e["action"] for e in audit(server)] == ["init", "set_policy"]
    finally:
        stop_cleanly(server)
    assert "reconciled" not in (tmp_path / "serve2.log").read_text()

    # The rollout rolled the canary back while serving was down: the alias is gone.
    registry.clear_alias("challenger")
    server = start_server(settings_path, tmp_path / "serve3.log")
    try:
        state = router_state(server)
        assert (state["champion"], state["challenger"]) == ("v1", None)
        assert (state["strategy"], state["canary_weight"]) == ("shadow", 0.0)
        status, body = call("POST", f"{server.http}/predict/batch", {"instances": rows})
        assert {p["model_version"] for p in body["predictions"]} == {"v1"}
        last = audit(server)[-1]
        assert last["action"] == "reconcile" and last["stored"]["challenger"] == "v2"
        assert last["changes"] == [
            "challenger v2 dropped (no challenger alias)",
            "strategy canary at 0.25 -> shadow",
        ]
    finally:
        stop_cleanly(server)

    # `churn models promote v2` while down: the registry's champion wins, v1 kept for rollback.
    registry.promote("v2")
    server = start_server(settings_path, tmp_path / "serve4.log")
    try:
        state = router_state(server)
        assert (state["champion"], state["challenger"]) == ("v2", None)
        assert state["previous_champions"] == ["v1"]
        status, body = call("POST", f"{server.http}/predict", rows[0])
        assert body["model_version"] == "v2"
    finally:
        stop_cleanly(server)

    # `churn models rollback` while down: v1 again, and no champion left to roll back to.
    registry.rollback()
    server = start_server(settings_path, tmp_path / "serve5.log")
    try:
        state = router_state(server)
        assert (state["champion"], state["challenger"], state["previous_champions"]) == (
            "v1",
            None,
            [],
        )
        assert audit(server)[-1]["changes"] == ["champion v2 -> v1 (rolled back in the registry)"]
        status, _ = call("POST", f"{server.http}/router/rollback", token=ADMIN_TOKEN)
        assert status == 409  # nothing to roll back to, as in the registry
    finally:
        stop_cleanly(server)
    assert [e["action"] for e in registry.history()][-2:] == ["promote", "rollback"]


# -- the reconcile rules, without a server -----------------------------------------------------


def state(**fields) -> RouterState:
    return RouterState(**{"strategy": "shadow", "champion": "v1", **fields})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("stored", "aliases", "expected"),
    [
        pytest.param(
            state(strategy="canary", challenger="v2", canary_weight=0.25),
            ("v1", "v2"),
            state(strategy="canary", challenger="v2", canary_weight=0.25),
            id="agree",
        ),
        pytest.param(state(), ("v1", "v2"), state(challenger="v2", canary_weight=0.0), id="new"),
        pytest.param(
            state(strategy="canary", challenger="v2", canary_weight=0.5),
            ("v1", "v3"),
            state(challenger="v3", canary_weight=0.0),
            id="replaced",
        ),
        pytest.param(
            state(strategy="blue_green", challenger="v2"),
            ("v1", None),
            state(strategy="blue_green"),
            id="cleared",
        ),
        pytest.param(
            state(strategy="canary", challenger="v2", canary_weight=0.25),
            ("v2", None),
            state(champion="v2", previous_champions=("v1",), canary_weight=0.0),
            id="promoted",
        ),
        pytest.param(
            state(champion="v3", previous_champions=("v1", "v2")),
            ("v2", None),
            state(champion="v2", previous_champions=("v1",)),
            id="rolled-back",
        ),
        pytest.param(
            state(champion="v3", previous_champions=("v1", "v2")),
            ("v1", None),
            state(champion="v1"),
            id="rolled-back-twice",
        ),
        pytest.param(
            state(challenger="v2"),
            ("v3", "v2"),
            state(champion="v3", challenger="v2", previous_champions=("v1",), canary_weight=0.0),
            id="new-champion-same-challenger",
        ),
        pytest.param(state(challenger="v2"), (None, None), state(challenger="v2"), id="no-alias"),
    ],
)
def test_reconcile_rules(stored, aliases, expected):
    reconciled, changes = reconcile(stored, *aliases)
    fields = ("strategy", "champion", "challenger", "canary_weight", "previous_champions")
    assert {f: getattr(reconciled, f) for f in fields} == {f: getattr(expected, f) for f in fields}
    assert bool(changes) == (reconciled != stored)


@pytest.mark.integration
@pytest.mark.slow
def test_feedback_waits_for_kafka_off_the_event_loop_and_a_lost_one_is_503(
    broker_settings, settings_path, trained_registry, tmp_path
):
    """`POST /feedback` answers 200 only for an outcome Kafka acknowledged, and waiting for
    that acknowledgement never stalls the server: with the broker gone, other requests are
    answered while a feedback call waits for its 503."""
    import threading

    from churn_assets.broker import EmbeddedBroker

    copy_registry(trained_registry, broker_settings.registry_dir)
    server = start_server(settings_path, tmp_path / "serve.log")
    try:
        body = {"customer_id": "C0000001", "churned": True}
        status, answer = call("POST", f"{server.http}/feedback", body)
        assert status == 200 and answer["accepted"], answer
        EmbeddedBroker(broker_settings.run_dir).stop()

        lost: dict = {}

        def send_feedback() -> None:
            lost["status"], lost["body"] = call("POST", f"{server.http}/feedback", body)

        waiting = threading.Thread(target=send_feedback)
        waiting.start()
        time.sleep(0.5)
        answered_meanwhile = 0
        while waiting.is_alive():
            if http_status(f"{server.http}/v2/health/live") == 200 and waiting.is_alive():
                answered_meanwhile += 1
            time.sleep(0.2)
        waiting.join()
    finally:
        server.stop()
    assert lost["status"] == 503, lost
    assert "delivered to Kafka" in json.dumps(lost["body"])
    assert answered_meanwhile >= 5  # the event loop kept serving while feedback waited
