"""Monitoring assets on real DuckDB files, the real registry and a real broker."""

import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from churn_assets.assets.ml import ml_asset_checks, ml_assets
from churn_assets.assets.monitoring import monitoring_assets, monitoring_checks
from churn_assets.kafka import scan_topic
from churn_assets.model import load_model
from churn_assets.monitoring import read_monitoring
from churn_assets.performance import join_outcomes
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.schemas import FEATURE_NAMES, Topics
from churn_assets.simulator import SimulationConfig, simulate_frames
from churn_assets.warehouse import connect, ensure_schema, load_read_model
from serving.metrics import ServingMetrics
from serving.monitoring import MonitoringFeed
from tests.ml_fixtures import write_landed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def write_predictions(settings, events: pd.DataFrame, version: str, scores: np.ndarray) -> None:
    """Landed predictions as serving would mirror them: one per customer event."""
    frame = pd.DataFrame(
        {
            "kafka_topic": Topics.PREDICTIONS,
            "kafka_partition": 0,
            "kafka_offset": np.arange(len(events)),
            "request_id": [uuid.uuid4().hex for _ in range(len(events))],
            "customer_id": events["customer_id"].to_numpy(),
            "model_name": "churn",
            "model_version": version,
            "arm": "primary",
            "score": scores,
            "latency_ms": 1.0,
            "status": "ok",
            "error": None,
            "features": None,
            "predicted_at": events["event_time"].to_numpy(),
            "landed_at": datetime.now(UTC),
        }
    )
    with connect(settings.warehouse_path) as con:
        ensure_schema(con)
        con.register("incoming", frame)
        con.execute("INSERT INTO landed_predictions BY NAME SELECT * FROM incoming")
        con.unregister("incoming")


def run(settings_path, assets):
    return dg.materialize(
        assets,
        resources={"platform": PlatformResource(config_path=str(settings_path))},
        raise_on_error=False,
    )


def test_monitoring_flags_covariate_drift_and_reports_live_performance(
    broker_settings, settings_path
):
    settings = broker_settings
    events, feedback = simulate_frames(
        SimulationConfig(
            seed=42,
            customers=2000,
            days=90,
            scenario="covariate_drift",
            scenario_start_day=75,
        )
    )
    write_landed(settings, events, feedback)
    assert run(settings_path, [*ml_assets, *ml_asset_checks]).success
    model = load_model(ModelRegistry(settings.registry_dir), "champion")

    scored = events.loc[events["event_time"] >= events["event_time"].min() + timedelta(days=40)]
    write_predictions(settings, scored, model.version, model.predict_frame(scored))

    result = run(settings_path, [*monitoring_assets, *monitoring_checks])
    assert result.success

    monitoring = read_monitoring(settings.read_models_dir)
    flags = {f: v["drift"] for f, v in monitoring["drift"]["features"].items()}
    assert flags["monthly_charges"] and flags["payment_method"]
    for untouched in (
        "customer_tenure",
        "support_tickets",
        "login_frequency",
        "contract_type",
        "internet_service",
    ):
        assert not flags[untouched], untouched
    history = load_read_model(settings.read_models_dir, "drift_history")
    assert set(FEATURE_NAMES) <= set(history["feature"])
    alerts = scan_topic(settings, Topics.DRIFT_ALERTS)
    assert sum(e.messages for e in alerts) == 1

    checks = {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert not checks["drift_report_no_drift"].passed

    rates = monitoring["outliers"]["rates"]
    assert 0 <= rates["isolation_forest"] < 0.2 and 0 <= rates["mahalanobis"] < 0.2

    # Realised AUC matches a direct computation on the same joined rows.
    with connect(settings.warehouse_path, read_only=True) as con:
        predictions = con.execute("SELECT * FROM landed_predictions").df()
        landed_feedback = con.execute("SELECT * FROM landed_feedback").df()
    for frame, columns in (
        (predictions, ["predicted_at"]),
        (landed_feedback, ["outcome_time", "observed_at"]),
    ):
        for column in columns:
            frame[column] = pd.to_datetime(frame[column], utc=True)
    as_of = max(predictions["predicted_at"].max(), landed_feedback["observed_at"].max())
    joined = join_outcomes(
        predictions,
        landed_feedback,
        horizon_days=settings.training.horizon_days,
        as_of=as_of.to_pydatetime(),
    )
    labelled = joined.loc[joined["labelled"]]
    direct = roc_auc_score(labelled["label"], labelled["score"])
    auc = {(r["kind"]): r["roc_auc"] for r in monitoring["performance"]["auc"]}
    assert auc["realised"] == pytest.approx(direct, abs=1e-12)
    assert abs(auc["estimated"] - auc["realised"]) < 0.1

    # The serving process exports the figures, and drift_detected_total moves once per report.
    metrics = ServingMetrics()
    feed = MonitoringFeed(settings.read_models_dir, metrics)
    feed.refresh()
    feed.refresh()
    text = metrics.render()[0].decode()
    assert 'drift_detected_total{feature="monthly_charges"} 1.0' in text
    assert 'drift_flag{feature="customer_tenure"} 0.0' in text
    assert 'model_roc_auc{arm="primary",kind="realised",version="v1"}' in text
