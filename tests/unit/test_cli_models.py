import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from churn_assets.cli_models import models
from churn_assets.contract import contract_from_dict
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import DEFAULT_CONTRACT

pytestmark = pytest.mark.unit


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config" / "config.yaml"
    path.parent.mkdir()
    path.write_text(f"storage:\n  registry_dir: {tmp_path / 'models'}\n")
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


@pytest.fixture
def two_versions(registry: ModelRegistry) -> ModelRegistry:
    registry.register({"model.ubj": b"one"}, {"metrics": {"test_roc_auc": 0.81234}})
    registry.set_alias("champion", "v1")
    registry.register({"model.ubj": b"two"}, {"metrics": {"test_roc_auc": 0.9}})
    registry.set_alias("challenger", "v2")
    return registry


def run(config_path: Path, *args: str):
    return CliRunner().invoke(models, list(args), obj={"config_path": config_path})


def test_list_shows_versions_aliases_parent_and_metric(config_path, two_versions):
    result = run(config_path, "list")
    assert result.exit_code == 0, result.output
    header, first, second = result.output.splitlines()
    assert header.split() == [
        "VERSION",
        "ALIASES",
        "REGISTERED_AT",
        "PARENT",
        "TEST_ROC_AUC",
        "STATUS",
    ]
    v1 = two_versions.get("v1")
    assert first.split() == ["v1", "champion", v1.registered_at, "-", "0.8123", "ok"]
    assert second.split()[:2] == ["v2", "challenger"]
    assert second.split()[3:] == ["v1", "0.9000", "ok"]


def test_list_reports_damaged_versions_as_quarantined(config_path, two_versions):
    """A changed artefact and a corrupt manifest: each version is listed as quarantined with
    the reason, and the intact version is still listed as it was."""
    (two_versions.root / "v1" / "model.ubj").write_bytes(b"tampered")
    (two_versions.root / "v2" / "manifest.json").write_text("{not json")
    result = run(config_path, "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[0] == "v1" and lines[1].split()[-1] == "quarantined"
    assert lines[2].split() == ["v2", "challenger", "-", "-", "-", "quarantined"]
    assert lines[3].startswith("v1 quarantined: ") and "model.ubj" in lines[3]
    assert lines[4].startswith("v2 quarantined: ") and "manifest.json" in lines[4]
    two_versions.register({"model.ubj": b"three"}, {})
    assert run(config_path, "list").output.splitlines()[3].split()[-1] == "ok"


def test_list_without_metric_or_versions(config_path, registry):
    result = run(config_path, "list")
    assert result.exit_code == 0
    assert "no model versions registered in" in result.output
    registry.register({"model.ubj": b"x"}, {"notes": "no metrics yet"})
    result = run(config_path, "list")
    assert result.exit_code == 0
    assert result.output.splitlines()[1].split()[-3:] == ["-", "-", "ok"]


def test_show_prints_the_manifest_as_json(config_path, two_versions):
    result = run(config_path, "show", "challenger")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    v2 = two_versions.get("v2")
    assert shown["version"] == "v2"
    assert shown["files"] == v2.files
    assert shown["metadata"] == {"metrics": {"test_roc_auc": 0.9}}
    assert shown["code_version"] == v2.code_version
    assert shown["parent_version"] == "v1"
    assert shown["aliases"] == ["challenger"]
    # Registered before contracts (no contract.json): the default contract.
    assert shown["contract"] == {
        "digest": DEFAULT_CONTRACT.digest,
        "source": "the default contract (no contract.json)",
        **DEFAULT_CONTRACT.as_dict(),
    }


def _extended_contract_json() -> bytes:
    raw = DEFAULT_CONTRACT.as_dict()
    raw["features"] += [
        {"name": "senior_citizen", "kind": "boolean"},
        {"name": "tech_support", "kind": "category", "categories": ["yes", "no", "no_internet"]},
    ]
    return json.dumps(raw).encode()


def test_show_prints_the_contract_the_version_was_trained_with(config_path, registry):
    contract = contract_from_dict(json.loads(_extended_contract_json()))
    registry.register(
        {"model.ubj": b"one", "contract.json": _extended_contract_json()},
        {"contract_digest": contract.digest},
    )
    result = run(config_path, "show", "v1")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["contract"]
    assert shown["digest"] == contract.digest and shown["source"] == "contract.json"
    features = {f["name"]: f for f in shown["features"]}
    assert list(features)[-2:] == ["senior_citizen", "tech_support"]
    assert features["senior_citizen"]["kind"] == "boolean"
    assert features["tech_support"]["categories"] == {"yes": [], "no": [], "no_internet": []}
    assert (
        features["customer_tenure"] | {"kind": "integer", "min": 0, "max": 600}
        == features["customer_tenure"]
    )
    assert [d["name"] for d in shown["derived"]] == [d.name for d in contract.derived]


def test_show_refuses_a_contract_that_does_not_match_its_recorded_digest(config_path, registry):
    registry.register(
        {"model.ubj": b"one", "contract.json": _extended_contract_json()},
        {"contract_digest": DEFAULT_CONTRACT.digest},
    )
    registry.register({"model.ubj": b"two", "contract.json": b'{"format": 1, "features": []}'}, {})
    result = run(config_path, "show", "v1")
    assert result.exit_code == 1 and "contract digest" in result.stderr, result.output
    result = run(config_path, "show", "v2")
    assert result.exit_code == 1, result.output
    assert "v2 has a bad contract.json" in result.stderr and "'features'" in result.stderr
    assert "Traceback" not in result.output


def test_show_unknown_version_is_a_clear_error(config_path, two_versions):
    result = run(config_path, "show", "v9")
    assert result.exit_code == 1
    assert "Error: no model version 'v9'; versions: v1, v2" in result.stderr
    assert "Traceback" not in result.output


def test_promote_then_rollback(config_path, two_versions):
    result = run(config_path, "promote")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "champion: v2 (was v1)"
    assert two_versions.aliases() == {"champion": "v2"}

    result = run(config_path, "rollback")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "champion: v1 (rolled back from v2)"

    result = run(config_path, "rollback")
    assert result.exit_code == 1
    assert "Error: no previous champion to roll back to" in result.stderr


def test_promote_an_explicit_version_and_errors(config_path, two_versions):
    result = run(config_path, "promote", "v2")
    assert result.exit_code == 0, result.output
    assert "champion: v2" in result.stdout

    result = run(config_path, "promote")
    assert result.exit_code == 1
    assert "alias 'challenger' is not set" in result.stderr

    result = run(config_path, "promote", "v3")
    assert result.exit_code == 1
    assert "no model version 'v3'" in result.stderr


def test_tampered_registry_is_reported_not_crashed(config_path, two_versions):
    """One corrupt manifest does not hide the other versions: it is listed as quarantined."""
    (two_versions.root / "v1" / "manifest.json").write_text("{oops")
    result = run(config_path, "list")
    assert result.exit_code == 0, result.output
    assert "v1 quarantined: manifest.json of version v1 is corrupt" in result.output
    assert result.output.splitlines()[2].split()[-1] == "ok"  # v2
    assert "Traceback" not in result.output


def test_bad_config_is_a_clear_error(tmp_path):
    result = run(tmp_path / "missing.yaml", "list")
    assert result.exit_code == 1
    assert "config file not found" in result.stderr


def test_works_under_a_root_group_that_sets_the_config_path(config_path, two_versions):
    @click.group()
    @click.option("--config", "config_path", type=click.Path(path_type=Path))
    @click.pass_context
    def root(ctx: click.Context, config_path: Path) -> None:
        ctx.ensure_object(dict)
        ctx.obj["config_path"] = config_path

    root.add_command(models)
    result = CliRunner().invoke(root, ["--config", str(config_path), "models", "list"])
    assert result.exit_code == 0, result.output
    assert "v2" in result.output


@pytest.mark.parametrize("path", [[], ["list"], ["show"], ["promote"], ["rollback"], ["export"]])
def test_every_command_has_help(path):
    result = CliRunner().invoke(models, [*path, "--help"])
    assert result.exit_code == 0, result.output
    command = models.commands[path[0]] if path else models
    assert command.help
    assert " ".join(command.help.split()[:5]) in result.output


def test_export_writes_a_version_folder_for_the_bucket(config_path, two_versions, tmp_path):
    dest = tmp_path / "bucket"
    result = run(config_path, "export", "challenger", str(dest))
    assert result.exit_code == 0, result.output
    folder = dest / "v2"
    assert result.stdout.strip() == f"exported v2 to {folder}"
    assert sorted(p.name for p in dest.iterdir()) == ["v2"]  # no staging folder left behind
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "model-settings.json",
        "model.ubj",
    ]
    assert (folder / "model.ubj").read_bytes() == b"two"
    registered = two_versions.get("v2").path / "manifest.json"
    assert (folder / "manifest.json").read_bytes() == registered.read_bytes()
    assert json.loads((folder / "model-settings.json").read_text()) == {
        "name": "churn-v2",
        "implementation": "serving.standalone.ChurnModel",
        "parameters": {"uri": "./", "version": "v2"},
    }


def test_export_never_overwrites(config_path, two_versions, tmp_path):
    dest = tmp_path / "bucket"
    (dest / "v1").mkdir(parents=True)
    (dest / "v1" / "model.ubj").write_bytes(b"someone else's")
    result = run(config_path, "export", "v1", str(dest))
    assert result.exit_code == 1
    assert f"Error: {dest / 'v1'} already exists; refusing to overwrite it" in result.stderr
    assert (dest / "v1" / "model.ubj").read_bytes() == b"someone else's"
    assert sorted(p.name for p in dest.iterdir()) == ["v1"]


def test_export_refuses_a_tampered_artefact(config_path, two_versions, tmp_path):
    (two_versions.root / "v1" / "model.ubj").write_bytes(b"oNe")
    dest = tmp_path / "bucket"
    result = run(config_path, "export", "v1", str(dest))
    assert result.exit_code == 1
    assert "artefact 'model.ubj' of version v1 failed verification: expected sha256" in (
        result.stderr
    )
    assert "Traceback" not in result.output
    assert not (dest / "v1").exists()


def test_export_unknown_version_is_a_clear_error(config_path, two_versions, tmp_path):
    result = run(config_path, "export", "v9", str(tmp_path / "bucket"))
    assert result.exit_code == 1
    assert "Error: no model version 'v9'; versions: v1, v2" in result.stderr
