"""The guides' commands work as written.

docs/QUICK_START.md: its shell blocks run for real, in order. The convention is documented at the
top of the guide (an HTML comment): ```bash blocks run, ```bash background blocks start a
long-running process, ```bash after-interrupt blocks run after Ctrl-C in those, ```bash notest
blocks are only shown. The blocks run against a temporary config and free ports, set through the
environment variables the guide itself documents.

docs/QUICK_START.md and docs/OPERATIONS.md: every `churn` command and option they name exists,
and so does every Dagster job, sensor, schedule and asset check, Prometheus alert and config key
they name in code spans.
"""

import json
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from pydantic import BaseModel

from churn_assets.broker import EmbeddedBroker
from churn_assets.cli import main as churn_main
from churn_assets.config import REPO_ROOT, Settings, load_settings
from tests.conftest import write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GUIDE = REPO_ROOT / "docs" / "QUICK_START.md"
GUIDES = (GUIDE, REPO_ROOT / "docs" / "OPERATIONS.md")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
CHURN_COMMAND = re.compile(r"(?:^|[\s/])churn((?: +[\w.=/-]+)+)")
CONFIG_KEY = re.compile(
    r"^(router|monitoring|retraining|kafka|storage|landing|simulator|training|serving|rollout"
    r"|dagster|dashboard)(\.[a-z_]+)+$"
)
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
    "churn up --no-serve": ["[1/8] broker ready", "[2/8] topics ready", "[5/8] training", "v1"],
    "/predict": [],  # checked as JSON below
    "/explain": ['"method":"shap"'],
    "churn status": ["landed_customer_events", "last landed offsets"],
    "churn models list": ["champion"],
    "/router/metrics": ['"champion":"v1"', "predictions_total{"],
    "churn broker stop": ["stopped"],
    "nothing is produced, landed or trained twice": [
        "[3/8] simulation skipped: the warehouse already holds it",
        "[5/8] training skipped: v1 (champion) was trained on exactly this data",
    ],
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


def code_in(path: Path) -> list[str]:
    """The guide's code: fenced blocks and inline code spans."""
    text = path.read_text()
    fenced = [code for _, code in FENCE.findall(text)]
    prose = FENCE.sub("", text)
    return fenced + INLINE_CODE.findall(prose)


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.stem)
def test_every_churn_command_and_option_the_guide_names_exists(guide):
    checked = 0
    for code in code_in(guide):
        for line in code.splitlines():
            for match in CHURN_COMMAND.finditer(line):
                command: click.Command = churn_main
                words = match.group(1).split()
                path = []
                while words and isinstance(command, click.Group) and words[0] in command.commands:
                    command = command.commands[words[0]]
                    path.append(words.pop(0))
                assert path, f"{guide.name}: `churn{match.group(1)}` names no churn command"
                if isinstance(command, click.Group) and words and not words[0].startswith("-"):
                    raise AssertionError(f"{guide.name}: no command `churn {path} {words[0]}`")
                options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
                for word in words:
                    if word.startswith("--"):
                        assert word.split("=")[0] in options, (guide.name, path, word)
                checked += 1
    assert checked >= 5, f"{guide.name}: expected churn commands to check, found {checked}"


def test_dagster_names_alerts_and_config_keys_in_the_guides_exist():
    from churn_assets.definitions import defs

    assets = {a.key.to_user_string() for a in defs.assets}
    checks = {key.name for c in defs.asset_checks for key in c.check_keys}
    runnable = {
        *(j.name for j in defs.jobs),
        *(s.name for s in defs.sensors),
        *(s.name for s in defs.schedules),
    }
    rules = yaml.safe_load((REPO_ROOT / "config" / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    seen = {"runnable": 0, "check": 0, "alert": 0, "config": 0}
    for guide in GUIDES:
        for token in {t.strip() for t in INLINE_CODE.findall(FENCE.sub("", guide.read_text()))}:
            if re.fullmatch(r"[a-z_]+_(job|sensor|schedule)", token):
                assert token in runnable, f"{guide.name}: no Dagster job/sensor/schedule {token}"
                seen["runnable"] += 1
            elif token not in assets and any(token.startswith(f"{a}_") for a in assets):
                assert token in checks, f"{guide.name}: no asset check {token}"
                seen["check"] += 1
            elif re.fullmatch(r"Churn[A-Z]\w+", token):
                assert token in alerts, f"{guide.name}: no Prometheus alert {token}"
                seen["alert"] += 1
            elif CONFIG_KEY.match(token.removesuffix(": true").removesuffix(": false")):
                key = token.split(":")[0]
                model: type[BaseModel] = Settings
                for part in key.split("."):
                    assert part in model.model_fields, f"{guide.name}: no config key {key}"
                    annotation = model.model_fields[part].annotation
                    is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
                    model = annotation if is_section else BaseModel
                seen["config"] += 1
    assert min(seen.values()) > 0, seen
