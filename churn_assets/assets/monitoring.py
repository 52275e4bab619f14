"""Monitoring assets: drift report, outlier report and live performance, with alerts.

Reference = the champion's training sample (stored with the version); live = the landed traffic
of the last ``monitoring.live_window_days``. Reports are kept as history tables and published as
read models; the latest figures go to the serving process's ``/metrics`` through the monitoring
read model, and drift and outlier events go to ``ml.drift-alerts`` and ``ml.outliers``.
"""

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa

from churn_assets.assets.landing import WAREHOUSE_POOL
from churn_assets.assets.waiting import wait_for
from churn_assets.config import Settings
from churn_assets.contract import Contract
from churn_assets.kafka import make_producer
from churn_assets.model import ScoringModel, load_model
from churn_assets.monitoring import publish_monitoring_section
from churn_assets.outliers import load_outlier_scorer, load_reference_frame
from churn_assets.plots import markdown_table
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.schemas import DriftAlert, OutlierEvent, Topics, encode_message
from churn_assets.warehouse import connect, ensure_schema, publish_read_model

__all__ = [
    "drift_report",
    "live_events_sql",
    "live_performance",
    "monitoring_assets",
    "monitoring_checks",
    "outlier_report",
]

LIVE_EVENTS_SQL = """
SELECT event_id, customer_id, event_time, {features}
FROM landed_customer_events
WHERE event_time > (SELECT max(event_time) FROM landed_customer_events) - to_seconds(?)
"""


def live_events_sql(contract: Contract) -> str:
    """The live window's query for ``contract``'s feature columns (names the contract has
    checked: lower-case letters, digits and underscores; quoted all the same)."""
    return LIVE_EVENTS_SQL.format(features=", ".join(f'"{name}"' for name in contract.names))


class MonitoringError(RuntimeError):
    """Monitoring cannot run on the data at hand (the message says what is missing)."""


# What a monitoring asset waits for when there is nothing to monitor yet.
WAITING_FOR_CHAMPION = "a champion model (the training_job registers the first one)"
WAITING_FOR_EVENTS = (
    "landed customer events in the live window (produce to churn.customers; the "
    "kafka_landing_sensor lands them)"
)
WAITING_FOR_PREDICTIONS = (
    "landed predictions (serve traffic: serving mirrors every prediction to ml.predictions and "
    "the kafka_landing_sensor lands them)"
)


def _champion(settings: Settings) -> tuple[ScoringModel, dict[str, bytes]] | None:
    """The champion and its files, or None while the registry has none."""
    registry = ModelRegistry(settings.registry_dir)
    if "champion" not in registry.aliases():
        return None
    model = load_model(registry, "champion")
    files = model.to_files()
    return model, files


def _live_events(settings: Settings, contract: Contract) -> pd.DataFrame:
    """The landed events of the live window with ``contract``'s features (the champion's);
    empty when nothing has landed in it."""
    seconds = settings.monitoring.live_window_days * 86_400
    with connect(settings.warehouse_path) as con:
        ensure_schema(con, settings.contract)
        columns = {row[0] for row in con.execute("DESCRIBE landed_customer_events").fetchall()}
        lacking = [name for name in contract.names if name not in columns]
        if lacking:
            raise MonitoringError(
                f"landed_customer_events has no column for the champion's features {lacking}: "
                "land events with the contract the champion was trained on"
            )
        live = con.execute(live_events_sql(contract), [seconds]).df()
    live["event_time"] = pd.to_datetime(live["event_time"], utc=True)
    return live


def _append_history(settings: Settings, table: str, frame: pd.DataFrame) -> int:
    arrow = pa.Table.from_pandas(frame, preserve_index=False)  # noqa: F841 - read by DuckDB
    with connect(settings.warehouse_path) as con:
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM arrow LIMIT 0")
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM arrow")
        _, rows = publish_read_model(con, settings.read_models_dir, table, f"SELECT * FROM {table}")
    return rows


def _produce(settings: Settings, topic: str, messages: list[tuple[str, bytes]]) -> int:
    if not messages:
        return 0
    producer = make_producer(settings)
    for key, value in messages:
        producer.produce(topic, key=key.encode(), value=value)
    remaining = producer.flush(15)
    if remaining:
        raise MonitoringError(f"{remaining} messages to {topic} were not delivered within 15 s")
    return len(messages)


@dg.asset(
    group_name="monitoring",
    kinds={"scipy", "duckdb"},
    pool=WAREHOUSE_POOL,
    deps=["landed_customer_events", "registered_model"],
    output_required=False,
)
def drift_report(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult]:
    """Feature drift (KS, chi-square), multivariate MMD and prediction drift of the live window
    against the champion's training reference, all FDR-corrected together, each held to an
    effect-size floor. Waits (no materialisation) while there is no champion or no live event."""
    from churn_assets.drift import drift_report as compute_drift

    settings = platform.settings()
    cfg = settings.monitoring.drift_detection
    champion = _champion(settings)
    if champion is None:
        wait_for(context, WAITING_FOR_CHAMPION)
        return
    model, files = champion
    contract = model.contract
    reference = load_reference_frame(files, contract.names)
    live = _live_events(settings, contract)
    if live.empty:
        wait_for(context, WAITING_FOR_EVENTS)
        return
    report = compute_drift(
        reference,
        live[list(contract.names)],
        contract=contract,
        threshold=cfg.threshold,
        correction=cfg.correction,
        mmd_sample=cfg.mmd_sample,
        seed=settings.training.seed,
        reference_scores=model.predict_frame(reference),
        live_scores=model.predict_frame(live),
    )
    report_id = uuid.uuid4().hex
    computed_at = datetime.now(UTC)
    window_start, window_end = live["event_time"].min(), live["event_time"].max()
    history = report.to_frame().assign(
        report_id=report_id,
        computed_at=computed_at,
        model_version=model.version,
        window_start=window_start,
        window_end=window_end,
        live_rows=len(live),
    )
    rows = _append_history(settings, "drift_history", history)
    features = {
        row["feature"]: {"p_value": float(row["p_value_corrected"]), "drift": bool(row["drift"])}
        for row in history.to_dict("records")
    }
    publish_monitoring_section(
        settings.read_models_dir,
        "drift",
        {
            "report_id": report_id,
            "computed_at": computed_at.isoformat(),
            "model_version": model.version,
            "drift": bool(report.drift),
            "features": features,
            "multivariate": report.multivariate,
        },
    )
    alerts = 0
    if report.drift:
        # Features, the prediction score and the multivariate test can each raise the report.
        flagged = [f for f, v in features.items() if v["drift"]]
        p_values = {f: features[f]["p_value"] for f in flagged}
        if report.multivariate.get("drift"):
            flagged.append("multivariate_mmd")
            p_values["multivariate_mmd"] = float(report.multivariate["p_value_corrected"])
        alert = DriftAlert(
            alert_id=report_id,
            model_version=model.version or "",
            detector="ks+chi2+mmd",
            features=flagged,
            p_values=p_values,
            threshold=cfg.threshold,
            window_start=window_start.to_pydatetime(),
            window_end=window_end.to_pydatetime(),
            raised_at=computed_at,
        )
        alerts = _produce(
            settings, Topics.DRIFT_ALERTS, [(report_id, encode_message(Topics.DRIFT_ALERTS, alert))]
        )
    context.log.info(f"drift report {report_id}: drifted {report.drifted_features or 'none'}")
    yield dg.MaterializeResult(
        metadata={
            "report_id": report_id,
            "drift": report.drift,
            "drifted_features": ", ".join(report.drifted_features) or "none",
            "live_rows": len(live),
            "reference_rows": len(reference),
            "alerts_sent": alerts,
            "history_rows": rows,
            "features": dg.MetadataValue.md(
                markdown_table(
                    history[
                        [
                            "feature",
                            "detector",
                            "statistic",
                            "p_value",
                            "p_value_corrected",
                            "effect_size",
                            "drift",
                        ]
                    ]
                    .round(4)
                    .to_dict("records")
                )
            ),
            "multivariate": dg.MetadataValue.json(report.multivariate),
        }
    )


@dg.asset_check(asset=drift_report, blocking=False, pool=WAREHOUSE_POOL)
def drift_report_no_drift(platform: PlatformResource) -> dg.AssetCheckResult:
    """Warns when the latest drift report flags features."""
    from churn_assets.monitoring import read_monitoring

    drift = read_monitoring(platform.settings().read_models_dir).get("drift") or {}
    flagged = sorted(f for f, v in (drift.get("features") or {}).items() if v["drift"])
    return dg.AssetCheckResult(
        passed=not flagged,
        severity=dg.AssetCheckSeverity.WARN,
        description="features flagged by the latest drift report",
        metadata={"flagged": ", ".join(flagged) or "none"},
    )


@dg.asset(
    group_name="monitoring",
    kinds={"scikit-learn", "duckdb"},
    pool=WAREHOUSE_POOL,
    deps=["landed_customer_events", "registered_model"],
    output_required=False,
)
def outlier_report(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult]:
    """IsolationForest and Mahalanobis outlier rates of the live window against the expected
    contamination, with the most outlying records. Waits (no materialisation) while there is no
    champion or no live event."""
    settings = platform.settings()
    contamination = settings.monitoring.outlier_detection.contamination
    champion = _champion(settings)
    if champion is None:
        wait_for(context, WAITING_FOR_CHAMPION)
        return
    model, files = champion
    live = _live_events(settings, model.contract)
    if live.empty:
        wait_for(context, WAITING_FOR_EVENTS)
        return
    scorer = load_outlier_scorer(model.transformer, files)
    x = model.transformer.transform(live)
    iso_scores, iso_flags = scorer.score_isolation_forest(x)
    maha_scores, maha_flags = scorer.score_mahalanobis(x)
    rates = {
        "isolation_forest": float(np.mean(iso_flags)),
        "mahalanobis": float(np.mean(maha_flags)),
    }
    computed_at = datetime.now(UTC)
    scored = live.assign(
        isolation_forest_score=iso_scores,
        mahalanobis_score=maha_scores,
        outlier=iso_flags & maha_flags,
    )
    top = scored.sort_values("isolation_forest_score", ascending=False).head(20)
    history = pd.DataFrame(
        [
            {
                "computed_at": computed_at,
                "model_version": model.version,
                "detector": d,
                "rate": r,
                "expected": contamination,
                "live_rows": len(live),
            }
            for d, r in rates.items()
        ]
    )
    _append_history(settings, "outlier_history", history)
    publish_monitoring_section(
        settings.read_models_dir,
        "outliers",
        {
            "computed_at": computed_at.isoformat(),
            "rates": rates,
            "expected": contamination,
        },
    )
    events = [
        (
            str(row["event_id"]),
            encode_message(
                Topics.OUTLIERS,
                OutlierEvent(
                    event_id=f"outlier-{row['event_id']}",
                    customer_id=row["customer_id"],
                    detector="isolation_forest+mahalanobis",
                    score=float(row["isolation_forest_score"]),
                    threshold=float(scorer.isolation_forest.threshold),
                    detected_at=computed_at,
                ),
            ),
        )
        for row in top.loc[top["outlier"]].to_dict("records")
    ]
    sent = _produce(settings, Topics.OUTLIERS, events)
    context.log.info(f"outlier rates {rates} (expected {contamination})")
    yield dg.MaterializeResult(
        metadata={
            "isolation_forest_rate": rates["isolation_forest"],
            "mahalanobis_rate": rates["mahalanobis"],
            "expected_rate": contamination,
            "events_sent": sent,
            "top_outliers": dg.MetadataValue.md(
                markdown_table(
                    top[["customer_id", *model.contract.names, "isolation_forest_score"]]
                    .round(3)
                    .to_dict("records")
                )
            ),
        }
    )


@dg.asset(
    group_name="monitoring",
    kinds={"duckdb", "pandas"},
    pool=WAREHOUSE_POOL,
    deps=["landed_predictions", "landed_feedback"],
    output_required=False,
)
def live_performance(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult]:
    """Ground truth joined to landed predictions: realised ROC-AUC, precision/recall and
    calibration per version and arm over time, and a label-free estimate where labels are
    pending. Waits (no materialisation) until a prediction has landed."""
    from churn_assets.performance import OVERALL, auc_rows, join_outcomes, performance_report

    settings = platform.settings()
    with connect(settings.warehouse_path) as con:
        ensure_schema(con, settings.contract)
        predictions = con.execute("SELECT * FROM landed_predictions").df()
        feedback = con.execute("SELECT * FROM landed_feedback").df()
    if predictions.empty:
        wait_for(context, WAITING_FOR_PREDICTIONS)
        return
    for frame, columns in (
        (predictions, ["predicted_at"]),
        (feedback, ["outcome_time", "observed_at"]),
    ):
        for column in columns:
            frame[column] = pd.to_datetime(frame[column], utc=True)
    as_of = max(
        predictions["predicted_at"].max(),
        feedback["observed_at"].max() if not feedback.empty else predictions["predicted_at"].max(),
    )
    joined = join_outcomes(
        predictions,
        feedback,
        horizon_days=settings.training.horizon_days,
        as_of=as_of.to_pydatetime(),
    )
    table = performance_report(joined).assign(computed_at=datetime.now(UTC))
    rows = _append_history(settings, "performance_history", table)
    overall = table.loc[table["period"].astype(str) == OVERALL]
    publish_monitoring_section(settings.read_models_dir, "performance", {"auc": auc_rows(table)})
    context.log.info(f"live performance over {len(joined)} predictions as of {as_of}")
    yield dg.MaterializeResult(
        metadata={
            "predictions": len(joined),
            "labelled": int(joined["labelled"].sum()),
            "history_rows": rows,
            "overall": dg.MetadataValue.md(
                markdown_table(
                    overall.drop(columns=["computed_at"]).round(4).astype(str).to_dict("records")
                )
            ),
        }
    )


@dg.asset_check(asset=live_performance, blocking=False, pool=WAREHOUSE_POOL)
def live_performance_above_threshold(platform: PlatformResource) -> dg.AssetCheckResult:
    """Error when a version/arm's live AUC (realised, or estimated while labels are few) is
    below retraining.performance_threshold."""
    from churn_assets.monitoring import read_monitoring

    settings = platform.settings()
    threshold = settings.retraining.performance_threshold
    rows = (read_monitoring(settings.read_models_dir).get("performance") or {}).get("auc") or []
    chosen: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["model_version"], row["arm"])
        if row["kind"] == "realised" and row["labelled"] >= settings.monitoring.min_labelled_rows:
            chosen[key] = row
        elif key not in chosen and row["kind"] == "estimated":
            chosen[key] = row
    low = [
        f"{v}/{a} {r['kind']} AUC {r['roc_auc']:.3f}"
        for (v, a), r in chosen.items()
        if r["roc_auc"] is not None and r["roc_auc"] < threshold
    ]
    return dg.AssetCheckResult(
        passed=not low,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"live AUC per version/arm against {threshold}",
        metadata={"below_threshold": "; ".join(low) or "none", "threshold": threshold},
    )


monitoring_assets = [drift_report, outlier_report, live_performance]
monitoring_checks = [drift_report_no_drift, live_performance_above_threshold]
