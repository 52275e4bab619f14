"""Concept drift shows in live performance (realised vs estimated), not in feature drift.

Real simulation, real training, the real drift report and performance code; no Dagster needed.
"""

import uuid
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from churn_assets.candidate import train_candidate
from churn_assets.config import load_settings
from churn_assets.drift import drift_report
from churn_assets.performance import estimated_performance, join_outcomes, realised_performance
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.simulator import SimulationConfig, simulate_frames
from churn_assets.training import build_training_set

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRIFT_DAY = 80


def after_drift(scenario: str):
    events, feedback = simulate_frames(
        SimulationConfig(
            seed=42,
            customers=4000,
            days=150,
            scenario=scenario,
            scenario_start_day=DRIFT_DAY,
        )
    )
    start = events["event_time"].min()
    cut = start + timedelta(days=75)
    training_set = build_training_set(
        events[events["event_time"] < cut],
        feedback[feedback["observed_at"] < cut],
        horizon_days=14,
        step_days=3,
        label_grace_days=10,
    )
    model = train_candidate(training_set, load_settings()).model
    # Live window after the switch, early enough that every label has matured by the end.
    live = events[
        (events["event_time"] >= start + timedelta(days=DRIFT_DAY + 5))
        & (events["event_time"] < start + timedelta(days=105))
    ]
    predictions = pd.DataFrame(
        {
            "request_id": [uuid.uuid4().hex for _ in range(len(live))],
            "customer_id": live["customer_id"].to_numpy(),
            "model_version": "v1",
            "arm": "primary",
            "score": model.predict_frame(live),
            "status": "ok",
            "predicted_at": pd.to_datetime(live["event_time"].to_numpy(), utc=True),
        }
    )
    joined = join_outcomes(
        predictions, feedback, horizon_days=14, as_of=feedback["observed_at"].max().to_pydatetime()
    )
    realised = realised_performance(joined, by=("model_version",), period=None).iloc[0]
    estimated = estimated_performance(joined, by=("model_version",), period=None).iloc[0]
    drift = drift_report(
        training_set.part("test")[list(FEATURE_NAMES)], live[list(FEATURE_NAMES)], mmd=False
    )
    return realised, estimated, drift


def test_concept_drift_moves_performance_but_not_feature_drift():
    realised, estimated, drift = after_drift("concept_drift")
    print(
        f"concept drift: observed churn {realised['observed_rate']:.3f} vs expected "
        f"{estimated['observed_rate']:.3f}; realised AUC {realised['roc_auc']:.3f} vs "
        f"estimated {estimated['roc_auc']:.3f}; drifted features {drift.drifted_features}"
    )
    assert realised["observed_rate"] > 1.25 * estimated["observed_rate"]
    assert realised["roc_auc"] < estimated["roc_auc"] - 0.03
    assert drift.drifted_features == []

    realised, estimated, drift = after_drift("none")
    print(
        f"no drift: observed churn {realised['observed_rate']:.3f} vs expected "
        f"{estimated['observed_rate']:.3f}"
    )
    assert (
        abs(realised["observed_rate"] - estimated["observed_rate"])
        < 0.15 * estimated["observed_rate"]
    )
    assert drift.drifted_features == []
    assert np.isfinite(realised["roc_auc"])
