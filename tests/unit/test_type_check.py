"""The type check: mypy over ``churn_assets`` and ``serving`` with the project's configuration
(``[tool.mypy]`` in pyproject.toml: strict on the core modules, ``check_untyped_defs`` on the
rest). mypy's incremental cache (``.mypy_cache``, git-ignored) keeps a repeat run to seconds."""

import subprocess
import sys

import pytest

from churn_assets.config import REPO_ROOT

pytestmark = pytest.mark.unit


def test_churn_assets_and_serving_type_check():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"]
        + ["-p", "churn_assets", "-p", "serving"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mypy found type errors:\n{result.stdout}{result.stderr}"
