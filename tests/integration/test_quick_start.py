"""docs/QUICK_START.md works as written: its shell blocks run for real, in order.

The convention is documented at the top of the guide (an HTML comment): ```bash blocks run,
```bash background blocks start a long-running process, ```bash after-interrupt blocks run after
Ctrl-C in those, ```bash notest blocks are only shown. The blocks run against a temporary config
and free ports, set through the environment variables the guide itself documents.
"""

import json
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from churn_assets.broker import EmbeddedBroker
from churn_assets.config import REPO_ROOT, load_settings
from tests.conftest import write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GUIDE = REPO_ROOT / "docs" / "QUICK_START.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
KINDS = {"", "background", "after-interrupt", "notest"}
BLOCK_TIMEOUT_S = 240


@dataclass(frozen=True)
class Block:
    kind: str  # "" (run), "background", "after-interrupt" or "notest"
    code: str


def shell_blocks(text: str) -> list[Block]:
    """The guide's ```bash blocks in document order; other languages are example output."""
    blocks = []
    for info, code in FENCE.findall(text):
        words = info.split()
        if not words or words[0] != "bash":
            continue
        kind = " ".join(words[1:])
        assert kind in KINDS, f"unknown block tag {info!r}; the guide's comment lists the tags"
        blocks.append(Block(kind, code))
    return blocks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bash(code: str) -> list[str]:
    return ["bash", "-euo", "pipefail", "-c", code]


# Substring of a block -> what its output must show. Every key must match a block, so a guide
# edit that drops one of these steps fails here rather than silently testing less.
EXPECTED_OUTPUT = {
    "churn up --no-serve": ["[1/5] broker ready", "[2/5] topics ready", "[4/5] training", "v1"],
    "/predict": [],  # checked as JSON below
    "/explain": ['"method":"shap"'],
    "churn status": ["landed_customer_events", "last landed offsets"],
    "churn models list": ["champion"],
    "/router/metrics": ['"champion":"v1"', "predictions_total{"],
    "churn broker stop": ["stopped"],
}


def test_guide_blocks_follow_the_convention_and_name_the_default_addresses():
    text = GUIDE.read_text()
    blocks = shell_blocks(text)
    kinds = [b.kind for b in blocks]
    assert kinds.count("background") == kinds.count("after-interrupt") == 1
    assert kinds.index("background") < kinds.index("after-interrupt")
    for block in blocks:
        if block.kind != "notest":
            # Ports come from the documented overrides, so the test never takes the defaults.
            assert not re.search(r"127\.0\.0\.1:\d", block.code), block.code
    settings = load_settings(REPO_ROOT / "config" / "config.yaml")
    for url in (
        f"http://127.0.0.1:{settings.dagster.webserver_port}",
        f"http://127.0.0.1:{settings.serving.http_port}/docs",
        f"http://127.0.0.1:{settings.dashboard.port}",
    ):
        assert url in text, f"the guide should point at {url}"


def test_run_sh_is_bootstrap_then_churn_up_as_the_guide_says():
    """The guide runs `churn up`'s steps instead of run.sh and says run.sh is exactly
    bootstrap + `churn up`; this keeps that sentence true."""
    commands = [
        line.strip()
        for line in (REPO_ROOT / "scripts" / "run.sh").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-2:] == ["./scripts/bootstrap.sh", 'exec .venv/bin/churn up "$@"']
    assert "`./scripts/bootstrap.sh` followed by `.venv/bin/churn up`" in GUIDE.read_text()


def test_quick_start_commands_work_as_written(tmp_path):
    blocks = [b for b in shell_blocks(GUIDE.read_text()) if b.kind != "notest"]
    config_path = write_config(tmp_path)
    settings = load_settings(config_path)
    env = {
        **os.environ,
        "CHURN_CONFIG": str(config_path),
        "CHURN_SIMULATOR__CUSTOMERS": "2000",
        "CHURN_SERVING__HTTP_PORT": str(free_port()),
        "CHURN_SERVING__GRPC_PORT": str(free_port()),
        "CHURN_DAGSTER__WEBSERVER_PORT": str(free_port()),
        "CHURN_DASHBOARD__PORT": str(free_port()),
    }
    env.pop("CHURN_ADMIN_TOKEN", None)
    background: list[tuple[subprocess.Popen, Path]] = []
    outputs: list[tuple[str, str]] = []
    try:
        for index, block in enumerate(blocks):
            log = tmp_path / f"block{index}.log"
            if block.kind == "background":
                with log.open("w") as out:
                    process = subprocess.Popen(
                        bash(block.code),
                        cwd=REPO_ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                background.append((process, log))
                continue
            if block.kind == "after-interrupt":
                for process, process_log in background:
                    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in its terminal
                    code = process.wait(timeout=60)
                    assert code == 0, f"Ctrl-C exit {code}:\n{process_log.read_text()[-3000:]}"
                background.clear()
            result = subprocess.run(
                bash(block.code),
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
            output = result.stdout + result.stderr
            log.write_text(output)
            assert result.returncode == 0, f"block {index} failed:\n{block.code}\n{output[-4000:]}"
            outputs.append((block.code, result.stdout + result.stderr))
    finally:
        for process, _ in background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        EmbeddedBroker(settings.run_dir).stop()  # whatever a failed run left behind

    for key, expected in EXPECTED_OUTPUT.items():
        matching = [output for code, output in outputs if key in code]
        assert matching, f"no block of the guide runs {key!r}"
        for needle in expected:
            assert any(needle in output for output in matching), (key, needle, matching)

    (predict,) = [output for code, output in outputs if "/predict" in code]
    prediction = json.loads(predict.strip().splitlines()[-1])
    assert prediction["model_version"] == "v1" and prediction["arm"] == "primary"
    assert prediction["customer_id"] == "C-quickstart"
    assert 0.5 < prediction["probability"] <= 1  # a new, unhappy month-to-month customer
    (explain,) = [output for code, output in outputs if "/explain" in code]
    explanation = json.loads(explain.strip().splitlines()[-1])
    assert len(explanation["top_contributions"]) == 3
    assert settings.registry_dir.joinpath("v1", "manifest.json").is_file()
    assert not settings.run_dir.joinpath("broker.json").exists()  # `churn broker stop` worked
