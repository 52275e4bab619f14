"""Project-wide rules: lint clean, definitions validate, Dagster-free serving and dashboards."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from churn_assets.config import REPO_ROOT

pytestmark = pytest.mark.unit

BIN = Path(sys.executable).parent


def test_ruff_lint_and_format_are_clean():
    lint = subprocess.run(
        [BIN / "ruff", "check", "."], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout
    fmt = subprocess.run(
        [BIN / "ruff", "format", "--check", "."], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout


def test_dagster_definitions_validate(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [BIN / "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "All code locations passed validation" in output


@pytest.mark.parametrize("package", ["serving", "dashboards"])
def test_package_never_imports_dagster(package):
    for path in (REPO_ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "dagster" for n in names), f"{path} imports dagster"


def test_core_modules_do_not_import_dagster():
    core = ["config", "schemas", "broker", "kafka", "simulator", "landing", "warehouse"]
    code = (
        "import sys\n"
        + "".join(f"import churn_assets.{m}\n" for m in core)
        + ("assert 'dagster' not in sys.modules, 'core imported dagster'\n")
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_serving_path_never_imports_tensorflow():
    code = (
        "import sys\n"
        "import serving.server, serving.plane, serving.runtime, churn_assets.explain\n"
        "bad = [m for m in ('tensorflow', 'alibi', 'alibi_detect', 'seldon_core', 'dagster')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_feature_names_live_in_the_default_contract_only():
    """Landing, serving, training, drift and dashboard code take their features from a contract:
    the default contract's names appear only in config/features.yaml, the simulator (which
    speaks that contract's vocabulary) and tests."""
    from churn_assets.schemas import DEFAULT_CONTRACT

    names = [*DEFAULT_CONTRACT.names, *DEFAULT_CONTRACT.trends, *DEFAULT_CONTRACT.category_values]
    names += [d.name for d in DEFAULT_CONTRACT.derived]
    allowed = {REPO_ROOT / "churn_assets" / "simulator.py"}
    found = []
    for package in ("churn_assets", "serving", "dashboards", "sensors"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if path in allowed:
                continue
            text = path.read_text()
            found += [
                f"{path.relative_to(REPO_ROOT)}: {n}" for n in sorted(set(names)) if n in text
            ]
    assert found == []
