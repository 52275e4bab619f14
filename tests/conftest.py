"""Shared fixtures: isolated settings files and a real embedded broker per test."""

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from churn_assets.broker import EmbeddedBroker
from churn_assets.config import REPO_ROOT, Settings, load_settings
from churn_assets.kafka import ensure_topics

ARTIFACTS = REPO_ROOT / "test-artifacts"


def write_config(directory: Path, **sections: dict[str, Any]) -> Path:
    """A copy of config/config.yaml with storage under ``directory`` and ``sections`` merged in."""
    data = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    data["storage"] = {
        "data_dir": str(directory / "data"),
        "warehouse_path": str(directory / "data" / "warehouse.duckdb"),
        "read_models_dir": str(directory / "data" / "read_models"),
        "registry_dir": str(directory / "data" / "models"),
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    config_dir = directory / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Path]:
    def factory(**sections: dict[str, Any]) -> Path:
        return write_config(tmp_path, **sections)

    return factory


@pytest.fixture
def settings_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, landing={"batch_max_messages": 500, "batch_max_seconds": 1.0})


@pytest.fixture
def broker_settings(settings_path: Path) -> Iterator[Settings]:
    """Settings wired to a fresh embedded Tansu broker (memory storage) with all topics created.

    A broker starts in well under a second, so each test gets its own and topics never leak
    between tests.
    """
    settings = load_settings(settings_path)
    broker = EmbeddedBroker(settings.run_dir)
    broker.start()
    try:
        ensure_topics(settings)
        yield settings
    finally:
        broker.stop()


@pytest.fixture
def churn_cli(settings_path: Path) -> list[str]:
    """argv prefix that runs the real CLI in a subprocess against the test's config."""
    return [sys.executable, "-m", "churn_assets.cli", "--config", str(settings_path)]
