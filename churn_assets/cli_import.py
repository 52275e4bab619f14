"""``churn import``: a customer export into the platform, through Kafka (docs/YOUR_DATA.md)."""

import sys
from pathlib import Path
from typing import Any

import click

from churn_assets.cli_common import fail, settings_of

__all__ = ["import_export"]


@click.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--mapping",
    "mapping_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="YAML mapping of the export's columns (customer_id, observed_at or as_of, label, "
    "positive, negative, features).",
)
@click.option(
    "--map",
    "maps",
    multiple=True,
    metavar="COLUMN=FEATURE",
    help="Map one export column to a feature (repeatable; over the mapping file).",
)
@click.option("--id-column", default=None, help="Column holding the customer id.")
@click.option("--time-column", default=None, help="Column holding each row's observation time.")
@click.option("--as-of", default=None, help="One observation time for a whole snapshot (ISO 8601).")
@click.option("--label-column", default=None, help="Column holding the churn label.")
@click.option("--positive", default=None, help="The label value that means churned (Yes).")
@click.option(
    "--rejects",
    "rejects_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where rejected rows go (default: PATH with .rejects.csv).",
)
@click.pass_context
def import_export(ctx: click.Context, path: Path, **options: Any) -> None:
    """Validate a CSV, Parquet or JSON-lines export with the feature contract and produce its
    rows to churn.customers (and labels to ml.feedback); landing stores them. Importing the same
    file again lands nothing twice."""
    from churn_assets.importer import (
        ImportError_,
        plan_import,
        produce_plan,
        read_export,
    )
    from churn_assets.kafka import make_producer

    settings = settings_of(ctx)
    try:
        mapping = _mapping(options)
        frame = read_export(path)
        plan = plan_import(frame, mapping, settings.contract, settings.training.horizon_days)
    except ImportError_ as exc:
        raise fail(exc) from None
    rejects = options["rejects_path"] or path.with_suffix(".rejects.csv")
    if plan.rejects:
        plan.write_rejects(rejects)
    bad_rows = len({e.row for e in plan.rejects})
    click.echo(
        f"{path.name}: {plan.rows} rows, {len(plan.events)} valid, {bad_rows} rejected"
        + (f" (reasons in {rejects})" if bad_rows else ""),
        err=True,
    )
    total = len(plan.events) + len(plan.outcomes)
    try:
        producer = make_producer(settings)
        with click.progressbar(length=total, label="producing", file=sys.stderr) as bar:
            events, outcomes = produce_plan(
                producer, plan, settings.contract, on_progress=bar.update
            )
    except Exception as exc:
        raise fail(exc) from None
    click.echo(
        f"produced {events} customer events and {outcomes} outcomes; `churn land` stores them"
    )


def _mapping(options: dict[str, Any]) -> Any:
    from churn_assets.importer import ImportError_, ImportMapping, _aware

    features: dict[str, str] = {}
    base: dict[str, Any] = {}
    if options["mapping_path"] is not None:
        loaded = ImportMapping.from_yaml(options["mapping_path"])
        base = {
            "customer_id": loaded.customer_id,
            "observed_at": loaded.observed_at,
            "as_of": loaded.as_of,
            "label": loaded.label,
            "positive": loaded.positive,
            "negative": loaded.negative,
        }
        features = dict(loaded.features)
    for item in options["maps"]:
        column, sep, feature = item.partition("=")
        if not sep or not column or not feature:
            raise ImportError_(f"--map {item!r}: expected COLUMN=FEATURE")
        features[feature] = column
    for key, option in (
        ("customer_id", "id_column"),
        ("observed_at", "time_column"),
        ("label", "label_column"),
        ("positive", "positive"),
    ):
        if options[option] is not None:
            base[key] = options[option]
    if options["as_of"] is not None:
        base["as_of"] = _aware(options["as_of"], "--as-of")
    if not base.get("customer_id"):
        raise ImportError_("name the customer id column (--id-column or customer_id in --mapping)")
    return ImportMapping(**{k: v for k, v in base.items() if v is not None}, features=features)
