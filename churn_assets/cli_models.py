"""``churn models``: list, inspect, promote, roll back and export versions of the model registry."""

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from churn_assets.config import ConfigError, load_settings
from churn_assets.registry import ModelRegistry, ModelVersion, RegistryError

__all__ = ["models"]

METRIC = "test_roc_auc"


def _registry(ctx: click.Context) -> ModelRegistry:
    obj = ctx.ensure_object(dict)
    try:
        settings = load_settings(obj.get("config_path"))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return ModelRegistry(settings.registry_dir)


def _registry_errors_as_click(command: Callable[..., Any]) -> Callable[..., Any]:
    """Report :class:`RegistryError` as a one-line CLI error (exit code 1) instead of a trace."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def _metric(version: ModelVersion) -> str:
    metrics = version.metadata.get("metrics")
    value = metrics.get(METRIC) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, int | float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))
    return "\n".join(line.rstrip() for line in [head, *lines])


def _aliases_of(registry: ModelRegistry) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(registry.aliases().items()):
        by_version.setdefault(version, []).append(alias)
    return by_version


@click.group()
def models() -> None:
    """List, inspect, promote, roll back and export registered model versions."""


@models.command("list")
@click.pass_context
@_registry_errors_as_click
def list_versions(ctx: click.Context) -> None:
    """Show every version with its aliases, registration time, parent, test ROC AUC and whether
    its artefacts are intact (a damaged version is quarantined: serving leaves it out)."""
    registry = _registry(ctx)
    names = registry.version_names()
    if not names:
        click.echo(f"no model versions registered in {registry.root}")
        return
    aliases = _aliases_of(registry)
    rows, damaged = [], {}
    for name in names:
        aliased = ",".join(aliases.get(name, [])) or "-"
        problem: str | None
        try:
            v = registry.get(name)
        except RegistryError as exc:  # a damaged manifest
            problem, row = str(exc), [name, aliased, "-", "-", "-"]
        else:
            problem = registry.damage(v)
            row = [name, aliased, v.registered_at, v.parent_version or "-", _metric(v)]
        if problem is not None:
            damaged[name] = problem
        rows.append([*row, "ok" if problem is None else "quarantined"])
    header = ["VERSION", "ALIASES", "REGISTERED_AT", "PARENT", METRIC.upper(), "STATUS"]
    click.echo(_table(header, rows))
    for name, problem in damaged.items():
        click.echo(f"{name} quarantined: {problem}")


@models.command("show")
@click.argument("ref")
@click.pass_context
@_registry_errors_as_click
def show(ctx: click.Context, ref: str) -> None:
    """Print the manifest of REF (a version like v3, or champion/challenger) as JSON, with the
    feature contract it was trained with (features with kind, bounds or categories, derived
    features) and the contract's digest: what a request to it must carry."""
    registry = _registry(ctx)
    version = registry.get(ref)
    shown = {
        **version.manifest(),
        "path": str(version.path),
        "aliases": _aliases_of(registry).get(version.version, []),
        "contract": _contract_of(registry, version),
    }
    click.echo(json.dumps(shown, indent=2))


def _contract_of(registry: ModelRegistry, version: ModelVersion) -> dict[str, Any]:
    """The version's contract (its ``contract.json``, verified; a version registered before
    contracts was trained on the default contract) with its digest."""
    from churn_assets.contract import ContractError
    from churn_assets.model import CONTRACT_FILE, stored_contract

    try:
        contract = stored_contract(registry, version)
    except ContractError as exc:
        raise click.ClickException(str(exc)) from None
    source = (
        CONTRACT_FILE
        if CONTRACT_FILE in version.files
        else f"the default contract (no {CONTRACT_FILE})"
    )
    recorded = version.metadata.get("contract_digest")
    if recorded is not None and recorded != contract.digest:
        raise click.ClickException(
            f"{version.version}: its metadata records contract digest {recorded}, but its "
            f"{CONTRACT_FILE} has digest {contract.digest}"
        )
    return {"digest": contract.digest, "source": source, **contract.as_dict()}


@models.command("promote")
@click.argument("ref", default="challenger")
@click.pass_context
@_registry_errors_as_click
def promote(ctx: click.Context, ref: str) -> None:
    """Make REF (default: the challenger) the champion; the old champion is kept for rollback."""
    registry = _registry(ctx)
    previous = registry.aliases().get("champion")
    champion = registry.promote(ref)
    click.echo(f"champion: {champion.version} (was {previous or 'none'})")


@models.command("rollback")
@click.pass_context
@_registry_errors_as_click
def rollback(ctx: click.Context) -> None:
    """Make the previous champion the champion again."""
    registry = _registry(ctx)
    previous = registry.aliases().get("champion")
    champion = registry.rollback()
    click.echo(f"champion: {champion.version} (rolled back from {previous or 'none'})")


@models.command("export")
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
@_registry_errors_as_click
def export(ctx: click.Context, ref: str, dest: Path) -> None:
    """Write version REF to DEST/<version>/, the folder a Seldon model bucket needs.

    The folder holds the version's artefacts (SHA-256 verified on the way out and again on every
    load), its manifest.json and a model-settings.json for Seldon Core 2 (MLServer runtime
    serving.standalone.ChurnModel). Upload it as s3://churn-models/<version>, e.g.
    `aws s3 cp --recursive DEST/v3 s3://churn-models/v3`: SeldonDeployment predictors (modelUri)
    and Seldon Core 2 Models (storageUri) load it from there. An existing DEST/<version> is never
    overwritten.
    """
    from serving.standalone import export_version

    folder = export_version(_registry(ctx), ref, dest)
    click.echo(f"exported {folder.name} to {folder}")
