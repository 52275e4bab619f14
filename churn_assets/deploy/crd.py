"""Seldon manifests checked against the Seldon CRDs' ``openAPIV3Schema`` with jsonschema.

Kubernetes-specific keywords (``x-kubernetes-*``) are ignored, as jsonschema ignores unknown
keywords. The CRDs live in ``<repo>/../shared/schemas/seldon`` (``seldon_schema_dir``).
"""

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from churn_assets.config import REPO_ROOT
from churn_assets.deploy.model import DeploymentError

__all__ = ["CRD_FILES", "seldon_schema_dir", "validate_against_crd", "validate_manifest"]

CRD_FILES: dict[str, str] = {
    "SeldonDeployment": "machinelearning.seldon.io_seldondeployments.v1.18.2.yaml",
    "Model": "mlops.seldon.io_models.yaml",
    "Experiment": "mlops.seldon.io_experiments.yaml",
}


def seldon_schema_dir() -> Path:
    """``<repo>/../shared/schemas/seldon``; fails loudly when it is missing."""
    path = REPO_ROOT.parent / "shared" / "schemas" / "seldon"
    if not path.is_dir():
        raise DeploymentError(
            f"Seldon CRD schemas not found at {path}: clone the shared/ repository beside "
            f"{REPO_ROOT.name}/"
        )
    return path


@functools.lru_cache(maxsize=8)
def _load_crd(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with path.open() as handle:
            return yaml.load(handle, Loader=loader)
    except OSError as exc:
        raise DeploymentError(f"cannot read CRD {path}: {exc}") from exc


def validate_against_crd(obj: dict[str, Any], crd_path: Path) -> None:
    """Validate ``obj`` against the CRD's ``openAPIV3Schema`` for its ``apiVersion``.

    Raises ``DeploymentError`` listing every error (path: message).
    """
    crd = _load_crd(Path(crd_path))
    names, group = crd["spec"]["names"], crd["spec"]["group"]
    api_group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    if obj.get("kind") != names["kind"] or api_group != group:
        raise DeploymentError(
            f"{obj.get('apiVersion')}/{obj.get('kind')} does not match CRD "
            f"{group}/{names['kind']} ({crd_path})"
        )
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise DeploymentError(f"CRD {crd_path} has no version {version!r}: {sorted(versions)}")
    schema = versions[version].get("schema", {}).get("openAPIV3Schema")
    if schema is None:
        raise DeploymentError(f"CRD {crd_path} version {version} has no openAPIV3Schema")
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [
            f"  {'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in errors
        ]
        name = obj.get("metadata", {}).get("name")
        raise DeploymentError(
            f"{obj['kind']} {name!r} does not match {Path(crd_path).name}:\n" + "\n".join(lines)
        )


def validate_manifest(obj: dict[str, Any], schema_dir: Path | None = None) -> None:
    """Validate a Seldon manifest against the CRD for its kind (``seldon_schema_dir`` default)."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        raise DeploymentError(f"no CRD known for kind {kind!r}; known: {sorted(CRD_FILES)}")
    validate_against_crd(obj, (schema_dir or seldon_schema_dir()) / CRD_FILES[kind])
