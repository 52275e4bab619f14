"""A bad feature contract stops the platform's start (`churn up`, `churn serve`, `churn land`)
before anything starts, with one line naming the feature and the problem."""

import copy
import subprocess
import sys

import pytest
import yaml

from churn_assets.config import REPO_ROOT
from tests.conftest import write_config

pytestmark = pytest.mark.integration

DEFAULT = yaml.safe_load((REPO_ROOT / "config" / "features.yaml").read_text())


def _unknown_kind(raw):
    raw["features"][0]["kind"] = "integr"


def _bounds_reversed(raw):
    raw["features"][1].update(min=500, max=10)


def _duplicate_name(raw):
    raw["features"].append(copy.deepcopy(raw["features"][2]))


def _alias_of_two_values(raw):
    raw["features"][3]["categories"]["one_year"].append("2 year")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_unknown_kind, "feature 'customer_tenure': unknown kind 'integr'"),
        (_bounds_reversed, "feature 'monthly_charges': bounds reversed: min 500 is above max 10"),
        (_duplicate_name, "feature 'total_charges': the name is declared twice"),
        (
            _alias_of_two_values,
            "feature 'contract_type': '2 year' would spell both 'one_year' and 'two_year'",
        ),
    ],
    ids=["unknown-kind", "bounds-reversed", "duplicate-name", "alias-of-two-values"],
)
@pytest.mark.parametrize("command", ["up", "serve", "land"])
def test_a_bad_contract_stops_the_start_naming_the_feature(tmp_path, change, message, command):
    raw = copy.deepcopy(DEFAULT)
    change(raw)
    contract = tmp_path / "features.yaml"
    contract.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = write_config(tmp_path, features={"contract": str(contract)})
    done = subprocess.run(
        [sys.executable, "-m", "churn_assets.cli", "--config", str(config), command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    # Nothing started: no broker, no warehouse, no registry.
    assert not (tmp_path / "data").exists()
