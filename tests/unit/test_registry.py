import ast
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from churn_assets.config import REPO_ROOT
from churn_assets.registry import (
    CHAMPION_HISTORY_LIMIT,
    ModelRegistry,
    RegistryError,
    TamperedArtifactError,
    VersionNotFound,
    current_code_version,
)

pytestmark = pytest.mark.unit

MODEL = b'{"learner": "gbtree", "trees": [1, 2, 3]}'
TRANSFORMER = b'{"columns": ["tenure", "spend"], "means": [12.5, 40.0]}'


def register(registry: ModelRegistry, auc: float = 0.8):
    return registry.register(
        {"model.ubj": MODEL, "transformer.json": TRANSFORMER},
        {"metrics": {"test_roc_auc": auc}, "training_window": ["2026-01-01", "2026-02-01"]},
    )


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


def test_register_numbers_versions_and_records_parent_and_hashes(registry):
    v1 = register(registry)
    registry.set_alias("champion", "v1")
    v2 = register(registry, auc=0.85)

    assert [v.version for v in registry.versions()] == ["v1", "v2"]
    assert v1.parent_version is None
    assert v2.parent_version == "v1"
    assert v2.path == registry.root / "v2"
    assert v1.files == {
        "model.ubj": hashlib.sha256(MODEL).hexdigest(),
        "transformer.json": hashlib.sha256(TRANSFORMER).hexdigest(),
    }
    assert v2.metadata["metrics"] == {"test_roc_auc": 0.85}
    assert re.fullmatch(r"([0-9a-f]{40}(\+dirty)?|unknown)", v1.code_version)
    assert v1.code_version == current_code_version()
    assert v1.registered_at.endswith("+00:00")

    manifest = json.loads((registry.root / "v2" / "manifest.json").read_text())
    assert manifest["files"] == v2.files
    assert manifest["parent_version"] == "v1"
    assert manifest["metadata"] == v2.metadata
    assert manifest["code_version"] == v2.code_version
    assert not list(registry.root.glob("*.tmp"))


def test_next_version_follows_the_highest_existing_one(registry):
    for _ in range(3):
        register(registry)
    assert register(registry).version == "v4"
    assert [v.version for v in registry.versions()] == ["v1", "v2", "v3", "v4"]


def test_files_round_trip_through_a_new_instance(registry):
    register(registry)
    fresh = ModelRegistry(registry.root)
    assert fresh.read_file("v1", "model.ubj") == MODEL
    assert fresh.read_file("v1", "transformer.json") == TRANSFORMER
    assert fresh.get("v1").metadata["training_window"] == ["2026-01-01", "2026-02-01"]


def test_tampered_file_is_refused_on_every_read(registry):
    register(registry)
    assert registry.read_file("v1", "model.ubj") == MODEL
    path = registry.root / "v1" / "model.ubj"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(TamperedArtifactError) as caught:
        registry.read_file("v1", "model.ubj")
    message = str(caught.value)
    assert "'model.ubj'" in message
    assert "v1" in message
    assert hashlib.sha256(MODEL).hexdigest() in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert registry.read_file("v1", "transformer.json") == TRANSFORMER


def test_deleted_file_is_reported_as_tampered(registry):
    register(registry)
    (registry.root / "v1" / "transformer.json").unlink()
    with pytest.raises(TamperedArtifactError, match="'transformer.json' of version v1 is missing"):
        registry.read_file("v1", "transformer.json")


def test_file_not_in_manifest_is_an_error_listing_the_files(registry):
    register(registry)
    with pytest.raises(RegistryError, match="has no artefact 'weights.bin'.*model.ubj"):
        registry.read_file("v1", "weights.bin")


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"version": "v1"}'],
    ids=["invalid-json", "not-an-object", "missing-keys"],
)
def test_corrupt_manifest_is_a_clear_error(registry, content):
    register(registry)
    (registry.root / "v1" / "manifest.json").write_text(content)
    with pytest.raises(RegistryError, match="manifest.json of version v1 is corrupt"):
        registry.get("v1")
    with pytest.raises(RegistryError, match="corrupt"):
        registry.read_file("v1", "model.ubj")


def test_manifest_with_a_bad_hash_is_corrupt(registry):
    register(registry)
    path = registry.root / "v1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["model.ubj"] = "abc"
    path.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="'model.ubj' has no valid sha256"):
        registry.get("v1")


def test_missing_manifest_is_a_clear_error(registry):
    register(registry)
    (registry.root / "v1" / "manifest.json").unlink()
    with pytest.raises(RegistryError, match="version v1 has no manifest.json"):
        registry.versions()


def test_unknown_ref_lists_available_versions(registry):
    register(registry)
    register(registry)
    for ref in ("v7", "latest", "v01", "../v1"):
        with pytest.raises(VersionNotFound) as caught:
            registry.get(ref)
        assert "versions: v1, v2" in str(caught.value)
        assert repr(ref) in str(caught.value)


def test_unknown_ref_in_an_empty_registry(registry):
    with pytest.raises(VersionNotFound, match="no versions registered"):
        registry.get("v1")
    assert registry.versions() == []
    assert registry.aliases() == {}
    assert registry.history() == []


def test_unset_alias_is_version_not_found(registry):
    register(registry)
    with pytest.raises(VersionNotFound, match="alias 'champion' is not set"):
        registry.get("champion")


def test_promote_and_rollback_sequence(registry):
    register(registry)
    register(registry)
    registry.set_alias("champion", "v1")
    registry.set_alias("challenger", "v2")
    assert registry.get("champion").version == "v1"
    assert registry.get("challenger").version == "v2"

    promoted = registry.promote()
    assert promoted.version == "v2"
    assert registry.aliases() == {"champion": "v2"}

    assert registry.rollback().version == "v1"
    assert registry.aliases() == {"champion": "v1"}
    with pytest.raises(RegistryError, match="no previous champion to roll back to"):
        registry.rollback()
    assert registry.aliases() == {"champion": "v1"}


def test_rollback_walks_back_through_several_promotions(registry):
    for _ in range(3):
        register(registry)
    registry.promote("v1")
    registry.promote("v2")
    registry.promote("v3")
    assert registry.rollback().version == "v2"
    assert registry.rollback().version == "v1"
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()


def test_promote_without_challenger_or_of_the_champion_fails(registry):
    register(registry)
    with pytest.raises(VersionNotFound, match="alias 'challenger' is not set"):
        registry.promote()
    registry.promote("v1")
    with pytest.raises(RegistryError, match="v1 is already the champion"):
        registry.promote("v1")


def test_promote_of_a_non_challenger_keeps_the_challenger(registry):
    for _ in range(3):
        register(registry)
    registry.set_alias("champion", "v1")
    registry.set_alias("challenger", "v3")
    registry.promote("v2")
    assert registry.aliases() == {"champion": "v2", "challenger": "v3"}


def test_aliases_persist_across_instances(registry):
    register(registry)
    register(registry)
    registry.set_alias("champion", "v1")
    registry.set_alias("challenger", "v2")
    registry.promote()

    fresh = ModelRegistry(registry.root)
    assert fresh.aliases() == {"champion": "v2"}
    assert fresh.get("champion").version == "v2"
    assert fresh.rollback().version == "v1"
    assert not (registry.root / "aliases.json.tmp").exists()


def test_set_and_clear_alias_validate_their_arguments(registry):
    register(registry)
    with pytest.raises(RegistryError, match="unknown alias 'production'"):
        registry.set_alias("production", "v1")
    with pytest.raises(VersionNotFound):
        registry.set_alias("challenger", "v9")
    with pytest.raises(RegistryError, match="alias 'challenger' is not set"):
        registry.clear_alias("challenger")
    registry.set_alias("challenger", "v1")
    registry.clear_alias("challenger")
    assert registry.aliases() == {}


def test_corrupt_aliases_file_is_a_clear_error(registry):
    register(registry)
    (registry.root / "aliases.json").write_text('{"aliases": {"production": "v1"}}')
    with pytest.raises(RegistryError, match="aliases.json is corrupt"):
        registry.aliases()


def test_history_records_actions_in_order(registry):
    register(registry)
    register(registry)
    registry.set_alias("champion", "v1")
    registry.set_alias("challenger", "v2")
    registry.promote()
    registry.rollback()
    registry.set_alias("challenger", "v2")
    registry.clear_alias("challenger")

    entries = ModelRegistry(registry.root).history()
    assert [(e["action"], e["version"], e["alias"], e["previous"]) for e in entries] == [
        ("register", "v1", None, None),
        ("register", "v2", None, None),
        ("set_alias", "v1", "champion", None),
        ("set_alias", "v2", "challenger", None),
        ("promote", "v2", "champion", "v1"),
        ("rollback", "v1", "champion", "v2"),
        ("set_alias", "v2", "challenger", None),
        ("clear_alias", None, "challenger", "v2"),
    ]
    assert all(e["at"].endswith("+00:00") for e in entries)
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)


@pytest.mark.parametrize(
    "name", ["../escape.ubj", "sub/model.ubj", "..", ".", "", "manifest.json", "a\\b"]
)
def test_bad_file_names_are_rejected(registry, name):
    with pytest.raises(RegistryError, match="invalid artefact file name"):
        registry.register({name: MODEL}, {})
    assert registry.versions() == []
    assert not (registry.root.parent / "escape.ubj").exists()


def test_files_must_be_bytes_and_present(registry):
    with pytest.raises(RegistryError, match="must be bytes"):
        registry.register({"model.json": {"not": "bytes"}}, {})
    with pytest.raises(RegistryError, match="at least one artefact"):
        registry.register({}, {})


@pytest.mark.parametrize(
    ("metadata", "where"),
    [
        ({"metrics": {"test_roc_auc": float("nan")}}, "metadata['metrics']['test_roc_auc']"),
        ({"loss": [0.1, float("inf")]}, "metadata['loss'][1]"),
        ({"when": object()}, "metadata['when'] is a object"),
        ({"metrics": {1: 0.5}}, "non-string key 1"),
    ],
    ids=["nan", "inf", "object", "int-key"],
)
def test_non_json_metadata_is_rejected(registry, metadata, where):
    with pytest.raises(RegistryError, match="not JSON-serialisable") as caught:
        registry.register({"model.ubj": MODEL}, metadata)
    assert where in str(caught.value)
    assert registry.versions() == []
    assert not registry.root.exists() or not any(registry.root.iterdir())


def test_stale_temporary_directory_is_reported(registry):
    (registry.root / "v1.tmp").mkdir(parents=True)
    with pytest.raises(RegistryError, match="v1.tmp already exists"):
        register(registry)
    assert registry.versions() == []


def test_registry_imports_neither_dagster_nor_pickle():
    code = (
        "import sys\n"
        "import churn_assets.registry\n"
        "import churn_assets.cli_models\n"
        "assert 'dagster' not in sys.modules, 'registry imported dagster'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tree = ast.parse((REPO_ROOT / "churn_assets" / "registry.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    # The standard library's safe modules only (fcntl: the alias lock); never pickle or dagster.
    assert imported <= {"hashlib", "json", "os", "subprocess", "dataclasses", "datetime"} | {
        "pathlib",
        "typing",
        "contextlib",
        "fcntl",
        "collections",
    }


def test_concurrent_alias_changes_from_processes_lose_nothing(tmp_path):
    """Eight processes flip the challenger alias and push champions at once; with the lock the
    champion history records every champion change exactly once, in order."""
    registry = ModelRegistry(tmp_path / "models")
    for _ in range(3):
        registry.register({"model.json": b"{}"}, {"metrics": {}})
    registry.set_alias("champion", "v1")
    code = (
        "import sys\n"
        "from churn_assets.registry import ModelRegistry\n"
        "r = ModelRegistry(sys.argv[1])\n"
        "for i in range(25):\n"
        "    r.set_alias('champion', 'v2' if i % 2 == 0 else 'v3')\n"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "models")]) for _ in range(8)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0] * 8
    changes = [
        e
        for e in ModelRegistry(tmp_path / "models").history()
        if e["action"] == "set_alias"
        and e["alias"] == "champion"
        and e["previous"] not in (None, e["version"])
    ]
    history = json.loads((tmp_path / "models" / "aliases.json").read_text())["champion_history"]
    # Every change was pushed in the order the audit log records them; the stack keeps the
    # newest CHAMPION_HISTORY_LIMIT (the audit log keeps them all).
    assert len(changes) > CHAMPION_HISTORY_LIMIT
    assert history == [e["previous"] for e in changes][-CHAMPION_HISTORY_LIMIT:]


def test_champion_history_is_bounded_and_rollback_still_steps_back(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    for _ in range(2):
        registry.register({"model.json": b"{}"}, {})
    for i in range(CHAMPION_HISTORY_LIMIT + 20):
        registry.set_alias("champion", "v1" if i % 2 == 0 else "v2")
    state = json.loads((tmp_path / "models" / "aliases.json").read_text())
    assert len(state["champion_history"]) == CHAMPION_HISTORY_LIMIT
    assert registry.aliases()["champion"] == "v2"
    assert registry.rollback().version == "v1"
