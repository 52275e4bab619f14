"""The model registry (``storage.registry_dir``), read only: registered versions and their test
metrics, the champion's reference sample and the feature contract it was trained with."""

from dataclasses import dataclass
from typing import Any

import pandas as pd

from churn_assets.config import Settings
from churn_assets.contract import Contract, ContractError
from dashboards.sources import Unavailable

__all__ = ["FormContract", "form_contract", "reference_sample", "registry_versions"]

METRIC_COLUMNS = {
    "test_roc_auc": "ROC-AUC",
    "test_pr_auc": "PR-AUC",
    "test_brier": "Brier",
    "test_log_loss": "log loss",
    "test_calibration_error": "calibration error",
}


def registry_versions(settings: Settings) -> pd.DataFrame | Unavailable:
    """Registered versions with their test metrics and aliases, newest first.

    The registry is read-only here (manifests and the alias file; hashes are verified by whoever
    loads an artefact).
    """
    from churn_assets.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(settings.registry_dir)
    try:
        versions = registry.versions()
        aliases = registry.aliases()
    except RegistryError as exc:
        return Unavailable("Model registry", str(exc))
    if not versions:
        return Unavailable(
            "Model registry",
            f"no model is registered in {settings.registry_dir}",
            "Run the Dagster training_job.",
        )
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for version in reversed(versions):
        metrics = version.metadata.get("metrics", {})
        row: dict[str, Any] = {
            "version": version.version,
            "aliases": ", ".join(sorted(by_version.get(version.version, []))) or "—",
            "registered_at": version.registered_at[:19].replace("T", " "),
        }
        for key, label in METRIC_COLUMNS.items():
            value = metrics.get(key)
            row[label] = None if value is None else round(float(value), 4)
        row["code"] = version.code_version[:10]
        rows.append(row)
    return pd.DataFrame(rows)


def reference_sample(settings: Settings, ref: str = "champion") -> pd.DataFrame | Unavailable:
    """The training reference sample stored with a registered version (what drift compares to)."""
    from churn_assets.outliers import REFERENCE_FILE, load_reference_frame
    from churn_assets.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(settings.registry_dir)
    try:
        version = registry.get(ref)
        if REFERENCE_FILE not in version.files:
            return Unavailable(
                "Reference sample", f"{version.version} was registered without {REFERENCE_FILE}"
            )
        data = registry.read_file(version.version, REFERENCE_FILE)
    except RegistryError as exc:
        return Unavailable("Reference sample", str(exc), "Run the Dagster training_job.")
    return load_reference_frame({REFERENCE_FILE: data})


@dataclass(frozen=True)
class FormContract:
    """The feature contract the prediction form is built from, and where it came from."""

    contract: Contract
    source: str


def form_contract(settings: Settings, ref: str = "champion") -> FormContract:
    """The contract ``ref`` (the champion) was trained with (its ``contract.json``; a version
    from before contracts was trained on the default contract), or the configured contract
    while no model is registered. A stored contract that cannot be read is an error: the form
    must not offer other features than the model takes."""
    from churn_assets.model import CONTRACT_FILE, stored_contract
    from churn_assets.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(settings.registry_dir)
    try:
        version = registry.get(ref)
    except RegistryError as exc:
        return FormContract(settings.contract, f"the configured contract ({exc})")
    try:
        contract = stored_contract(registry, version)
    except RegistryError as exc:
        raise ContractError(f"{version.version}'s {CONTRACT_FILE} cannot be used: {exc}") from exc
    default = "" if CONTRACT_FILE in version.files else " (the default)"
    return FormContract(contract, f"{version.version}'s contract{default}")
