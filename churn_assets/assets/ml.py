"""ML assets: features, training set, candidate model, quality gates, registry, SHAP, segments,
calibration.

Thin wrappers around the Dagster-free core (features, training, candidate, registry, explain).
Every asset and asset check runs in the ``duckdb_warehouse`` pool (one DuckDB writer at a time).
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING

import dagster as dg
import pandas as pd
import pyarrow as pa

from churn_assets.assets.landing import WAREHOUSE_POOL
from churn_assets.assets.waiting import wait_for
from churn_assets.calibration import CalibrationError, calibration_table, scoring_rows
from churn_assets.candidate import (
    current_champion,
    evaluate_gates,
    load_candidate,
    parity_gate,
    stage_candidate,
    train_candidate,
    training_set_for,
)
from churn_assets.config import Settings
from churn_assets.explain import ShapExplainer
from churn_assets.features import customer_features_as_of
from churn_assets.model import load_model
from churn_assets.plots import bar_chart_markdown, calibration_markdown, markdown_table
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.segments import segment_table
from churn_assets.training import (
    TrainingSet,
    assert_point_in_time,
    landed_frames,
)
from churn_assets.warehouse import connect, ensure_schema, publish_read_model

if TYPE_CHECKING:  # the type Dagster takes for a metadata value, not re-exported by ``dagster``
    from dagster._core.definitions.metadata import RawMetadataValue

__all__ = [
    "calibration",
    "candidate_model",
    "customer_features",
    "customer_segments",
    "feature_importance",
    "ml_asset_checks",
    "ml_assets",
    "registered_model",
    "training_set",
]


# What an ML asset waits for before anything has landed.
WAITING_FOR_EVENTS = (
    "landed customer events (produce to churn.customers, e.g. `churn simulate`; the "
    "kafka_landing_sensor lands them)"
)
WAITING_FOR_OUTCOMES = (
    "landed outcomes (churned or retained, on ml.feedback; the kafka_landing_sensor lands them)"
)


def _load_landed(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    with connect(settings.warehouse_path) as con:
        ensure_schema(con, settings.contract)
        return landed_frames(con, settings.contract)


def _replace_table(settings: Settings, table: str, frame: pd.DataFrame) -> int:
    """Replace a warehouse table with ``frame`` and publish it as a read model."""
    arrow = pa.Table.from_pandas(frame, preserve_index=False)  # noqa: F841 - read by DuckDB
    with connect(settings.warehouse_path) as con:
        con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM arrow")
        _, rows = publish_read_model(con, settings.read_models_dir, table, f"SELECT * FROM {table}")
    return rows


@dg.asset(
    group_name="ml",
    kinds={"duckdb", "pandas"},
    pool=WAREHOUSE_POOL,
    deps=["landed_customer_events"],
    output_required=False,
)
def customer_features(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult]:
    """Each customer's latest state as of the newest landed event, plus history features
    (events in 30 days, login and ticket trends, days since the last event). Waits (no
    materialisation) until a customer event has landed."""
    settings = platform.settings()
    events, _ = _load_landed(settings)
    if events.empty:
        wait_for(context, WAITING_FOR_EVENTS)
        return
    as_of = events["event_time"].max()
    frame = customer_features_as_of(
        events, as_of.to_pydatetime(), contract=settings.contract
    ).assign(as_of=as_of)
    rows = _replace_table(settings, "customer_features", frame)
    context.log.info(f"features for {rows} customers as of {as_of}")
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "as_of": str(as_of),
            "preview": dg.MetadataValue.md(frame.head(10).to_markdown(index=False)),
        }
    )


@dg.asset(
    group_name="ml",
    kinds={"duckdb", "pandas"},
    pool=WAREHOUSE_POOL,
    deps=["landed_customer_events", "landed_feedback"],
    output_required=False,
)
def training_set(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult]:
    """Point-in-time training rows: features as of each snapshot, label = churn within the
    horizon after it; time-based train/validation/test split with purging, or for snapshot
    data (a static export) a seeded, label-stratified split by customer (metadata says which
    and why). Waits (no materialisation, so nothing downstream trains) until customer events
    and outcomes have landed; too little of them to train on is an error."""
    settings = platform.settings()
    events, feedback = _load_landed(settings)
    for landed, what in ((events, WAITING_FOR_EVENTS), (feedback, WAITING_FOR_OUTCOMES)):
        if landed.empty:
            wait_for(context, what)
            return
    built = training_set_for(settings, events, feedback)
    rows = _replace_table(settings, "training_set", built.frame)
    by_split = built.frame.groupby("split")["label"].agg(["size", "mean"])
    context.log.info(f"training set: {rows} rows, snapshots {len(built.plan.all)}")
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "snapshots": len(built.plan.all),
            "known_at": str(built.known_at),
            "split_method": built.split_method,
            "split_reason": built.split_reason,
            "contract_digest": settings.contract.digest,
            "splits": dg.MetadataValue.md(
                markdown_table(
                    [
                        {"split": s, "rows": int(r["size"]), "positive_rate": round(r["mean"], 4)}
                        for s, r in by_split.iterrows()
                    ]
                )
            ),
        }
    )


@dg.asset_check(asset=training_set, blocking=True, pool=WAREHOUSE_POOL)
def training_set_point_in_time(platform: PlatformResource) -> dg.AssetCheckResult:
    """Features as of each test snapshot do not change when later events are deleted."""
    settings = platform.settings()
    events, _ = _load_landed(settings)
    with connect(settings.warehouse_path) as con:
        snapshots = [
            row[0]
            for row in con.execute(
                "SELECT DISTINCT snapshot_time FROM training_set ORDER BY 1 DESC LIMIT 3"
            ).fetchall()
        ]
    for snapshot in snapshots:
        assert_point_in_time(
            events, pd.Timestamp(snapshot).to_pydatetime(), contract=settings.contract
        )
    return dg.AssetCheckResult(passed=True, metadata={"snapshots_checked": len(snapshots)})


class CandidateModelConfig(dg.Config):
    shuffle_labels: bool = False
    """Train on shuffled labels: a deliberately bad candidate, to see the gates stop it."""


def _stored_training_set(settings: Settings) -> TrainingSet:
    """The rows the ``training_set`` asset materialised (not rebuilt from the landed tables)."""
    with connect(settings.warehouse_path) as con:
        frame = con.execute("SELECT * FROM training_set ORDER BY snapshot_time, customer_id").df()
    frame["snapshot_time"] = pd.to_datetime(frame["snapshot_time"], utc=True)
    return TrainingSet.from_frame(frame, settings.training.horizon_days)


@dg.asset(
    group_name="ml",
    kinds={"xgboost", "scikit-learn"},
    pool=WAREHOUSE_POOL,
    deps=[training_set],
)
def candidate_model(
    context: dg.AssetExecutionContext, config: CandidateModelConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """XGBoost candidate and logistic-regression baseline on the configured feature contract,
    evaluated on the holdout (test split); staged for the quality gates."""
    settings = platform.settings()
    built = _stored_training_set(settings)
    registry = ModelRegistry(settings.registry_dir)
    candidate = train_candidate(
        built,
        settings,
        champion=current_champion(registry),
        shuffle_labels=config.shuffle_labels,
        on_progress=context.log.info,
    )
    stage_candidate(candidate, settings)
    report = candidate.report
    metrics = report["metrics"]
    baseline = report["baseline"]
    comparison = [
        {
            "metric": name,
            "xgboost": round(metrics[f"test_{name}"], 4),
            "baseline": round(baseline[name], 4),
        }
        for name in ("roc_auc", "pr_auc", "brier", "log_loss", "calibration_error")
    ]
    metadata: dict[str, RawMetadataValue] = {
        "test_roc_auc": metrics["test_roc_auc"],
        "test_pr_auc": metrics["test_pr_auc"],
        "test_brier": metrics["test_brier"],
        "test_log_loss": metrics["test_log_loss"],
        "test_calibration_error": metrics["test_calibration_error"],
        "baseline_roc_auc": baseline["roc_auc"],
        "threshold": metrics["test_threshold"],
        "best_iteration": report["best_iteration"],
        "shuffled_labels": report["shuffled_labels"],
        "model_vs_baseline": dg.MetadataValue.md(markdown_table(comparison)),
        "lift_by_decile": dg.MetadataValue.md(markdown_table(report["deciles"])),
        "confusion_matrix": dg.MetadataValue.json(report["confusion"]),
        "calibration": dg.MetadataValue.md(
            calibration_markdown(
                {
                    "xgboost": report["calibration_curve"],
                    "baseline": report["baseline_calibration_curve"],
                }
            )
        ),
        "training_window": dg.MetadataValue.json(report["training_window"]),
        "data_fingerprint": report["data_fingerprint"],
        "contract_digest": report["contract_digest"],
        "split_method": report["split"]["method"],
        "split_reason": report["split"]["reason"],
        "rows_by_split": dg.MetadataValue.json(report["rows"]),
    }
    if report["simulator_best_auc"] is not None:
        # Only under the default contract, whose features the simulator's formula reads.
        metadata["simulator_best_auc"] = report["simulator_best_auc"]
    if report["champion"]:
        metadata["champion_version"] = report["champion"]["version"]
        metadata["champion_roc_auc"] = report["champion"]["roc_auc"]
    return dg.MaterializeResult(metadata=metadata)


def _gate_check(name: str, gate_key: str, description: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=candidate_model,
        name=name,
        blocking=True,
        description=description,
        pool=WAREHOUSE_POOL,
    )
    def _check(platform: PlatformResource) -> dg.AssetCheckResult:
        settings = platform.settings()
        gate = evaluate_gates(load_candidate(settings), settings)[gate_key]
        return dg.AssetCheckResult(
            passed=gate.passed,
            description=gate.description,
            metadata={
                "observed": gate.observed if gate.observed is not None else "n/a",
                "threshold": gate.threshold if gate.threshold is not None else "n/a",
            },
        )

    return _check


@dg.asset_check(asset=candidate_model, blocking=True, pool=WAREHOUSE_POOL)
def candidate_model_transformer_parity(platform: PlatformResource) -> dg.AssetCheckResult:
    """Training-path and serving-path transforms (and a reloaded model) agree on test rows."""
    settings = platform.settings()
    built = _stored_training_set(settings)
    gate = parity_gate(load_candidate(settings), built.part("test").head(500))
    return dg.AssetCheckResult(
        passed=gate.passed,
        description=gate.description,
        metadata={"observed": gate.observed, "threshold": gate.threshold},
    )


gate_checks = [
    _gate_check(
        "candidate_model_auc_above_threshold",
        "auc",
        "Test ROC-AUC reaches retraining.performance_threshold.",
    ),
    _gate_check(
        "candidate_model_not_worse_than_champion",
        "vs_champion",
        "AUC is within training.gates.max_auc_drop_vs_champion of the champion's.",
    ),
    _gate_check(
        "candidate_model_calibration",
        "calibration",
        "Expected calibration error is at most training.gates.max_calibration_error.",
    ),
    _gate_check(
        "candidate_model_min_training_rows",
        "min_training_rows",
        "At least training.gates.min_training_rows labelled training rows.",
    ),
    candidate_model_transformer_parity,
]


# In the warehouse pool although it writes only the registry: it must not interleave with
# rollout_decision (same pool), which reads and moves the registry aliases.
@dg.asset(group_name="ml", kinds={"xgboost"}, pool=WAREHOUSE_POOL, deps=[candidate_model])
def registered_model(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> dg.MaterializeResult:
    """The gated candidate registered as the next version: champion if there is none yet,
    otherwise challenger. Refused while a rollout is in progress: the new challenger would
    replace the one being judged."""
    from churn_assets.rollout_control import rollout_in_progress

    settings = platform.settings()
    rolling = rollout_in_progress(settings)
    if rolling is not None:
        raise RuntimeError(
            f"a rollout of {rolling} is in progress or pending (`churn rollout status`); let it "
            "finish or roll it back (admin API /router/rollback, the dashboard) before "
            "registering another challenger"
        )
    candidate = load_candidate(settings)
    registry = ModelRegistry(settings.registry_dir)
    report = candidate.report
    version = registry.register(
        candidate.model.to_files(),
        {
            "metrics": report["metrics"],
            "baseline": report["baseline"],
            "simulator_best_auc": report["simulator_best_auc"],
            "training_window": report["training_window"],
            "data_fingerprint": report["data_fingerprint"],
            "contract_digest": report["contract_digest"],
            "split": report["split"],
            "params": report["params"],
            "rows": report["rows"],
            "horizon_days": report["horizon_days"],
            "seed": report["seed"],
        },
    )
    alias = "challenger" if "champion" in registry.aliases() else "champion"
    registry.set_alias(alias, version.version)
    context.log.info(f"registered {version.version} as {alias}")
    return dg.MaterializeResult(
        metadata={
            "version": version.version,
            "alias": alias,
            "test_roc_auc": report["metrics"]["test_roc_auc"],
            "parent_version": version.parent_version or "none",
            "code_version": version.code_version,
        }
    )


@dg.asset(group_name="ml", kinds={"shap"}, pool=WAREHOUSE_POOL, deps=[registered_model])
def feature_importance(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> dg.MaterializeResult:
    """Mean |SHAP| per model input for the newest registered version, on the test holdout."""
    settings = platform.settings()
    registry = ModelRegistry(settings.registry_dir)
    newest = registry.versions()[-1].version
    model = load_model(registry, newest)
    with connect(settings.warehouse_path) as con:
        test = con.execute(
            "SELECT * FROM training_set WHERE split = 'test' USING SAMPLE 5000 ROWS (reservoir, 7)"
        ).df()
    importance = ShapExplainer(model).global_importance(model.transformer.transform(test))
    importance["model_version"] = newest
    _replace_table(settings, "feature_importance", importance)
    return dg.MaterializeResult(
        metadata={
            "model_version": newest,
            "rows_explained": len(test),
            "importance": dg.MetadataValue.md(
                markdown_table(importance.round(4).drop(columns="model_version").to_dict("records"))
            ),
            "plot": dg.MetadataValue.md(
                bar_chart_markdown(
                    importance["feature"], importance["mean_abs_shap"], "mean |SHAP| (log-odds)"
                )
            ),
        }
    )


@dg.asset(
    group_name="analytics",
    kinds={"duckdb", "parquet"},
    pool=WAREHOUSE_POOL,
    deps=[customer_features, registered_model],
)
def customer_segments(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> dg.MaterializeResult:
    """Risk tiers from the champion's scores and observed churn by contract, tenure and payment
    cohorts, published as a read model for the dashboard."""
    settings = platform.settings()
    model = load_model(ModelRegistry(settings.registry_dir), "champion")
    _, feedback = _load_landed(settings)
    with connect(settings.warehouse_path) as con:
        customers = con.execute("SELECT * FROM customer_features").df()
    customers["risk"] = model.predict_frame(customers)
    churned = set(feedback.loc[feedback["churned"], "customer_id"])
    customers["churned"] = customers["customer_id"].isin(churned)
    segments = segment_table(customers, model.version, model.contract)
    rows = _replace_table(settings, "customer_segments", segments)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "model_version": model.version or "",
            "segments": dg.MetadataValue.md(
                markdown_table(segments.round(4).drop(columns="model_version").to_dict("records"))
            ),
        }
    )


@dg.asset(
    group_name="analytics",
    kinds={"duckdb", "parquet"},
    pool=WAREHOUSE_POOL,
    deps=[training_set, registered_model],
    output_required=False,
)
def calibration(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult]:
    """The champion's predicted churn rate beside the realised churn rate over its horizon, by
    score decile and by segment, with the calibration error band (read model ``calibration``;
    definitions in docs/ML.md). Scored on the training set's newest fully labelled test rows.
    Waits while there is no champion or no training set."""
    settings = platform.settings()
    registry = ModelRegistry(settings.registry_dir)
    if "champion" not in registry.aliases():
        wait_for(context, "a champion model (the training_job registers the first one)")
        return
    with connect(settings.warehouse_path) as con:
        tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
    if "training_set" not in tables:
        wait_for(context, "a training set (the training_job builds it)")
        return
    model = load_model(registry, "champion")
    version = registry.get("champion")
    horizon = settings.training.horizon_days  # the stored training set's labels
    trained_horizon = version.metadata.get("horizon_days", horizon)
    if trained_horizon != horizon:
        raise CalibrationError(
            f"the champion {version.version} predicts churn within {trained_horizon} days but "
            f"the training set labels churn within training.horizon_days = {horizon}: retrain, "
            "or set the horizon back, to compare like with like"
        )
    rows = scoring_rows(_stored_training_set(settings).frame)
    table = calibration_table(
        rows,
        model.predict_frame(rows),
        contract=model.contract,
        model_version=version.version,
        horizon_days=int(horizon),
        calibration_error=float(version.metadata["metrics"]["test_calibration_error"]),
    )
    published = _replace_table(settings, "calibration", table)
    deciles = table.loc[table["grouping"] == "decile"]
    outside = deciles.loc[
        (deciles["observed_rate"] - deciles["predicted_rate"]).abs() > deciles["tolerance"]
    ]
    scored_at = rows["snapshot_time"].max()
    context.log.info(
        f"calibration of {version.version} on {len(rows)} customers scored at {scored_at}: "
        f"{len(outside)} of {len(deciles)} deciles outside the tolerance"
    )
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": published,
            "model_version": version.version,
            "horizon_days": int(horizon),
            "customers": len(rows),
            "scored_at": str(scored_at),
            "deciles_outside_tolerance": len(outside),
            "deciles": dg.MetadataValue.md(
                markdown_table(
                    deciles.drop(columns=["grouping", "horizon_days", "model_version"])
                    .round(4)
                    .to_dict("records")
                )
            ),
        }
    )


ml_assets = [
    customer_features,
    training_set,
    candidate_model,
    registered_model,
    feature_importance,
    customer_segments,
    calibration,
]
ml_asset_checks = [training_set_point_in_time, *gate_checks]
