"""A registry with two trained versions and a real `churn serve` process around it."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlserver.grpc import dataplane_pb2 as pb

from churn_assets.broker import EmbeddedBroker
from churn_assets.candidate import train_candidate
from churn_assets.config import load_settings
from churn_assets.kafka import ensure_topics
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.training import build_training_set
from tests.ml_fixtures import small_frames

ADMIN_TOKEN = "test-admin-token"


def build_registry(root: Path) -> Path:
    """v1 (champion) and v2 (challenger) trained on two seeded simulations."""
    settings = load_settings()
    registry = ModelRegistry(root)
    for seed, alias in ((42, "champion"), (43, "challenger")):
        events, feedback = small_frames(customers=2000, days=90, seed=seed)
        training_set = build_training_set(
            events, feedback, horizon_days=14, step_days=3, label_grace_days=10
        )
        candidate = train_candidate(training_set, settings)
        version = registry.register(
            candidate.model.to_files(), {"metrics": candidate.report["metrics"]}
        )
        registry.set_alias(alias, version.version)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    http: str
    grpc: str
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_server(
    config_path: Path,
    log_path: Path,
    token: str | None = ADMIN_TOKEN,
    timeout_s: float = 90,
    ports: tuple[int, int] | None = None,
    extra_env: dict[str, str] | None = None,
    new_session: bool = False,
) -> RunningServer:
    """``churn serve`` on ``ports`` (HTTP, gRPC; default: two free ones), ready to answer;
    ``extra_env`` is added to its environment (e.g. its own ``TMPDIR``); with ``new_session``
    it leads a process group of its own, as a terminal's foreground job does."""
    http_port, grpc_port = ports or (free_port(), free_port())
    env = {k: v for k, v in os.environ.items() if k != "CHURN_ADMIN_TOKEN"}
    if token:
        env["CHURN_ADMIN_TOKEN"] = token
    env.update(extra_env or {})
    with log_path.open("a") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "churn_assets.cli",
                "--config",
                str(config_path),
                "serve",
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=new_session,
        )
    server = RunningServer(
        process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_path
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(
                f"{server.http}/v2/models/churn-router/ready", timeout=2
            ) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not ready in {timeout_s}s:\n{log_path.read_text()[-4000:]}")


def copy_registry(source: Path, settings_registry_dir: Path) -> None:
    shutil.copytree(source, settings_registry_dir)


def infer_request(rows, model="churn-router", version=""):
    """A gRPC V2 request with one typed tensor per column (pandas codec) for ``rows``."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.parameters["content_type"].string_param = "pd"
    for name in ("customer_id", *FEATURE_NAMES):
        values = [row[name] for row in rows]
        tensor = request.inputs.add(name=name, shape=[len(rows)])
        if isinstance(values[0], str):
            tensor.datatype = "BYTES"
            tensor.parameters["content_type"].string_param = "str"
            tensor.contents.bytes_contents.extend(v.encode() for v in values)
        elif isinstance(values[0], int):
            tensor.datatype = "INT64"
            tensor.contents.int64_contents.extend(values)
        else:
            tensor.datatype = "FP64"
            tensor.contents.fp64_contents.extend(values)
    return request


@contextlib.contextmanager
def served_with_broker(root: Path) -> Iterator[RunningServer]:
    """Under ``root``: a config, a trained registry (v1 champion, v2 challenger), an embedded
    broker with every topic (``/feedback`` answers 200 only once Kafka acknowledges), and a
    ready ``churn serve`` on them; all stopped on exit."""
    from tests.conftest import write_config

    config_path = write_config(root)
    settings = load_settings(config_path)
    build_registry(settings.registry_dir)
    broker = EmbeddedBroker(settings.run_dir)
    broker.start()
    running = None
    try:
        ensure_topics(settings)
        running = start_server(config_path, root / "serve.log")
        yield running
    finally:
        if running is not None:
            running.stop()
        broker.stop()
