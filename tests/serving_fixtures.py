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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xgboost as xgb
from mlserver.grpc import dataplane_pb2 as pb

from churn_assets.broker import EmbeddedBroker
from churn_assets.candidate import train_candidate
from churn_assets.config import load_settings
from churn_assets.contract import Contract, contract_from_dict
from churn_assets.features import FeatureTransformer
from churn_assets.kafka import ensure_topics
from churn_assets.model import ScoringModel
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import DEFAULT_CONTRACT, FEATURE_NAMES
from churn_assets.simulator import sample_customers
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


# The documented request as a CRM spells it (the default contract's features), and the same with
# the two features of the ten-feature contract.
DOCUMENTED_REQUEST = {
    "customer_tenure": 24,
    "monthly_charges": 79.99,
    "total_charges": 1919.76,
    "contract_type": "Two year",
    "payment_method": "Credit card",
    "internet_service": "Fiber optic",
    "support_tickets": 2,
    "login_frequency": 5.2,
}
EXTENDED_REQUEST = {
    **DOCUMENTED_REQUEST,
    "senior_citizen": True,
    "tech_support": "No internet service",
}


def extended_contract() -> Contract:
    """The default contract plus a boolean ``senior_citizen`` and a category ``tech_support``."""
    raw = DEFAULT_CONTRACT.as_dict()
    raw["features"] += [
        {"name": "senior_citizen", "kind": "boolean", "description": "65 or older"},
        {
            "name": "tech_support",
            "kind": "category",
            "description": "tech support subscription",
            "categories": {"yes": [], "no": [], "no_internet": ["No internet service"]},
        },
    ]
    return contract_from_dict(raw)


def contract_model(contract: Contract, *, seed: int = 0, rows: int = 800) -> ScoringModel:
    """A small booster trained on ``contract``'s features without Dagster: the simulator's
    customers, the features they lack drawn at random (seeded), churn made likelier by a
    ``true`` boolean and by a category's first value so the extra features matter."""
    frame = sample_customers(rows, seed=seed)
    rng = np.random.default_rng(seed)
    label = frame["label"].to_numpy().astype(bool)
    for feature in contract.features:
        if feature.name in frame.columns:
            continue
        if feature.kind == "boolean":
            values = rng.random(rows) < 0.3
            label |= values & (rng.random(rows) < 0.3)
        elif feature.kind == "category":
            values = rng.choice(list(feature.categories), rows)
            label |= (values == next(iter(feature.categories))) & (rng.random(rows) < 0.3)
        else:
            low = feature.minimum if feature.minimum is not None else 0.0
            high = feature.maximum if feature.maximum is not None else low + 100
            values = rng.uniform(low, min(high, low + 100), rows)
            if feature.kind == "integer":
                values = np.round(values).astype(int)
        frame[feature.name] = values
    transformer = FeatureTransformer.fit(frame, contract)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "seed": seed, "nthread": 1},
        xgb.DMatrix(transformer.transform(frame), label=label.astype(int)),
        num_boost_round=20,
    )
    return ScoringModel(booster=booster, transformer=transformer, contract=contract)


def register_model(registry: ModelRegistry, model: ScoringModel, alias: str | None = None) -> str:
    """Register ``model`` (decision threshold 0.5), aliased if ``alias``; its version."""
    version = registry.register(model.to_files(), {"metrics": {"test_threshold": 0.5}})
    if alias is not None:
        registry.set_alias(alias, version.version)
    return version.version


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
        return stop_process(self.process)


def stop_process(process: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 30 s; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 90) -> None:
    """Until ``url`` answers 200; fails the test if ``process`` exits or time runs out."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited early:\n{log.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} not ready in {timeout_s}s:\n{log.read_text()[-4000:]}")


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


def infer_request(rows, model="churn-router", version="", names=FEATURE_NAMES):
    """A gRPC V2 request with one typed tensor per column (pandas codec) for ``rows``: the
    features ``names`` and ``customer_id``."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.parameters["content_type"].string_param = "pd"
    for name in ("customer_id", *names):
        values = [row[name] for row in rows]
        tensor = request.inputs.add(name=name, shape=[len(rows)])
        if isinstance(values[0], bool):
            tensor.datatype = "BOOL"
            tensor.contents.bool_contents.extend(values)
        elif isinstance(values[0], str):
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
def served_with_broker(
    root: Path, build: Callable[[Path], object] = build_registry, **sections: dict
) -> Iterator[RunningServer]:
    """Under ``root``: a config (``sections`` merged in), a registry ``build`` fills (default:
    v1 champion and v2 challenger, trained), an embedded broker with every topic (``/feedback``
    answers 200 only once Kafka acknowledges), and a ready ``churn serve`` on them; all stopped
    on exit. Unless ``sections`` name one, the server's Dagster webserver is a port nothing
    listens on: ``POST /admin/retrain`` must never launch runs in a Dagster that happens to run
    on this machine's default port."""
    from tests.conftest import write_config

    config_path = write_config(root, **{"dagster": {"webserver_port": free_port()}, **sections})
    settings = load_settings(config_path)
    build(settings.registry_dir)
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
