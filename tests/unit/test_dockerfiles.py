"""The images' Dockerfiles: hadolint finds nothing, bases are pinned, the final stage runs as a
non-root user with a HEALTHCHECK, every file copied is in the build context that .dockerignore
leaves, and the entry point and health check scripts behave. No Docker engine runs on these
machines, so the images themselves are not built here."""

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from churn_assets.config import REPO_ROOT

pytestmark = pytest.mark.unit

DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*/Dockerfile"))
HADOLINT = REPO_ROOT / ".venv/bin/hadolint"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_there_is_an_image_for_serving_dagster_and_the_dashboard():
    assert {p.parent.name for p in DOCKERFILES} == {"serving", "dagster", "dashboard"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_is_clean(dockerfile):
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "latest" tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_pinned_non_root_with_a_health_check(dockerfile):
    steps = _instructions(dockerfile)
    args = {value.split("=")[0]: value.split("=", 1)[1] for key, value in steps if key == "ARG"}
    stages = [value for key, value in steps if key == "FROM"]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the final image"
    for stage in stages:
        image = stage.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"\d+\.\d+\.\d+(-[a-z-]+)?", tag), image
    assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    final = steps[max(i for i, (key, _) in enumerate(steps) if key == "FROM") :]
    users = [value for key, value in final if key == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert int(users[-1].split(":")[0]) >= 10000
    assert sum(key == "HEALTHCHECK" for key, _ in final) == 1
    assert any(key in ("CMD", "ENTRYPOINT") for key, _ in final)


def _dockerignore_includes() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert lines[[line.strip() for line in lines].index("**")] == "**", "deny by default"
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copied_files_exist_in_the_build_context(dockerfile):
    included = _dockerignore_includes()
    for key, value in _instructions(dockerfile):
        if key != "COPY" or "--from=" in value:
            continue
        sources = [part for part in value.split() if not part.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            assert (REPO_ROOT / source).exists(), f"{dockerfile}: {source} missing"
            assert any(source == inc or source.startswith(inc + "/") for inc in included), (
                f"{source} is excluded by .dockerignore"
            )


@pytest.fixture
def stub_bin(tmp_path) -> Path:
    """``churn`` and ``mlserver`` stand-ins that print how they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("churn", "mlserver"):
        stub = bin_dir / name
        stub.write_text(
            f'#!/bin/sh\necho "{name} $* http=$CHURN_SERVING__HTTP_PORT '
            'grpc=$CHURN_SERVING__GRPC_PORT"\n'
        )
        stub.chmod(0o755)
    return bin_dir


def _run_entrypoint(stub_bin: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {"PATH": f"{stub_bin}:/usr/bin:/bin", **env}
    return subprocess.run(
        ["sh", str(REPO_ROOT / "docker/serving/entrypoint.sh"), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _entrypoint(stub_bin: Path, *args: str, **env: str) -> str:
    result = _run_entrypoint(stub_bin, *args, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_serving_entrypoint_picks_the_mode(stub_bin, tmp_path):
    mount = tmp_path / "mnt" / "models"  # stands in for Seldon's /mnt/models
    base = {
        "CHURN_SERVING__HTTP_PORT": "8080",
        "CHURN_SERVING__GRPC_PORT": "8081",
        "CHURN_SELDON_MODELS_MOUNT": str(mount),
    }
    assert _entrypoint(stub_bin, **base) == "churn serve http=8080 grpc=8081"
    seldon_v1 = {
        **base,
        "PREDICTIVE_UNIT_HTTP_SERVICE_PORT": "9000",
        "PREDICTIVE_UNIT_GRPC_SERVICE_PORT": "9500",
    }
    assert _entrypoint(stub_bin, **seldon_v1) == "churn serve http=9000 grpc=9500"
    seldon_v2 = {**base, "MLSERVER_MODELS_DIR": "/mnt/agent/models"}
    assert _entrypoint(stub_bin, **seldon_v2) == (
        "mlserver start /mnt/agent/models http=8080 grpc=8081"
    )
    assert _entrypoint(stub_bin, "churn", "models", "list", **base) == (
        "churn models list http=8080 grpc=8081"
    )

    # A Seldon Core v1 predictor whose modelUri folder is not a version folder fails loudly
    # instead of falling back to the (empty) registry of the data volume.
    mount.mkdir(parents=True)
    refused = _run_entrypoint(stub_bin, **seldon_v1)
    assert refused.returncode == 1
    assert f"Seldon mounted {mount} but it holds no manifest.json" in refused.stderr
    assert refused.stdout == ""
    assert _entrypoint(stub_bin, **base) == "churn serve http=8080 grpc=8081"

    # The storage initializer downloaded a version folder: serve exactly that folder.
    (mount / "manifest.json").write_text("{}")
    assert _entrypoint(stub_bin, **seldon_v1) == (
        f"churn serve --model-dir {mount} http=9000 grpc=9500"
    )
    assert _entrypoint(stub_bin, **base) == f"churn serve --model-dir {mount} http=8080 grpc=8081"
    assert _entrypoint(stub_bin, **seldon_v2) == (
        "mlserver start /mnt/agent/models http=8080 grpc=8081"
    )
    assert _entrypoint(stub_bin, **base, CHURN_MODEL_DIR="/models/v3") == (
        "churn serve --model-dir /models/v3 http=8080 grpc=8081"
    )


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/v2/health/live" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def health_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _healthcheck(url: str, **env: str) -> int:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "docker/healthcheck.py"), url],
        env={**os.environ, **env},
        capture_output=True,
        timeout=30,
    ).returncode


def test_healthcheck_script(health_server):
    port = str(health_server)
    live = "http://127.0.0.1:{CHURN_SERVING__HTTP_PORT}/v2/health/live"
    assert _healthcheck(live, CHURN_SERVING__HTTP_PORT=port) == 0
    assert _healthcheck(f"http://127.0.0.1:{port}/v2/health/ready") == 1
    health_server_port_closed = "http://127.0.0.1:1/v2/health/live"
    assert _healthcheck(health_server_port_closed) == 1
