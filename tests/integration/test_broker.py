"""The embedded Tansu broker's life cycle: readiness, idempotent start, port clash, no orphans."""

import os
import signal
import socket
import subprocess
import time

import pytest

from churn_assets.broker import BrokerError, EmbeddedBroker, read_state, resolve_bootstrap
from churn_assets.config import load_settings
from churn_assets.kafka import ensure_topics, topic_partitions
from churn_assets.schemas import ALL_TOPICS

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_start_is_ready_idempotent_and_stop_leaves_nothing(settings_path):
    settings = load_settings(settings_path)
    broker = EmbeddedBroker(settings.run_dir)
    state = broker.start()
    try:
        assert broker.start() == state  # idempotent
        assert resolve_bootstrap(settings.run_dir) == state.bootstrap_servers
        assert ensure_topics(settings) == {t: "created" for t in ALL_TOPICS}
        assert set(ensure_topics(settings).values()) == {"exists"}
        assert topic_partitions(settings, ALL_TOPICS[0]) == [0, 1, 2]
    finally:
        stopped = broker.stop()
    assert stopped == state
    assert wait_dead(state.pid)
    assert read_state(settings.run_dir) is None
    assert broker.stop() is None


def test_port_clash_is_a_clear_error(settings_path):
    settings = load_settings(settings_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is already in use"):
            EmbeddedBroker(settings.run_dir, port=port).start()
    assert read_state(settings.run_dir) is None


def test_configured_port_is_used(settings_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = load_settings(settings_path)
    broker = EmbeddedBroker(settings.run_dir, port=port)
    try:
        assert broker.start().port == port
    finally:
        broker.stop()


def test_clients_get_a_clear_error_when_the_broker_is_down(settings_path, churn_cli):
    settings = load_settings(settings_path)
    with pytest.raises(BrokerError, match="not running.*churn broker start"):
        resolve_bootstrap(settings.run_dir)
    result = subprocess.run([*churn_cli, "topics", "create"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "embedded Kafka broker is not running" in result.stderr


def foreground_broker(churn_cli, settings_path):
    process = subprocess.Popen(
        [*churn_cli, "broker", "start", "--foreground"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = process.stdout.readline()
    assert "broker ready on" in line, line
    state = read_state(load_settings(settings_path).run_dir)
    assert state is not None and alive(state.pid)
    return process, state


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_foreground_broker_stops_on_ctrl_c_and_term(churn_cli, settings_path, sig):
    process, state = foreground_broker(churn_cli, settings_path)
    process.send_signal(sig)
    assert process.wait(timeout=20) == 0
    process.stdout.close()
    assert wait_dead(state.pid)


def test_foreground_broker_dies_with_a_killed_parent(churn_cli, settings_path):
    process, state = foreground_broker(churn_cli, settings_path)
    process.kill()  # SIGKILL: no handler runs; the kernel's parent-death signal must do it
    process.wait(timeout=10)
    process.stdout.close()
    assert wait_dead(state.pid)
