import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from churn_assets.cli import main

pytestmark = pytest.mark.unit


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *all_commands(main)], ids=lambda p: " ".join(p) or "churn")
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    command = main
    for name in path:
        command = command.commands[name]
    assert command.help, f"{' '.join(path)} has no help text"


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "churn_assets.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("broker", "topics", "simulate", "land", "status", "up"):
        assert command in result.stdout


def test_bad_config_stops_the_cli_with_the_specific_message(config_factory):
    path = config_factory(kafka={"partitions": "three"})
    result = CliRunner().invoke(main, ["--config", str(path), "status"])
    assert result.exit_code == 1
    assert "kafka.partitions' = 'three'" in result.output
    assert "valid integer" in result.output


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "missing.yaml"), "status"])
    assert result.exit_code == 1
    assert "config file not found" in result.output


def test_the_simulator_refuses_a_contract_it_does_not_speak(tmp_path, config_factory):
    import yaml

    from churn_assets.config import REPO_ROOT

    raw = yaml.safe_load((REPO_ROOT / "config" / "features.yaml").read_text())
    raw["features"].append({"name": "senior_citizen", "kind": "boolean"})
    contract = tmp_path / "features.yaml"
    contract.write_text(yaml.safe_dump(raw))
    path = config_factory(features={"contract": str(contract)})
    result = CliRunner().invoke(main, ["--config", str(path), "simulate", "--customers", "10"])
    assert result.exit_code == 1
    assert "cannot simulate: the simulator produces the default contract's features" in (
        result.output
    )
    assert "churn import" in result.output
