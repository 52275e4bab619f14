"""The platform's Dagster jobs (shared by the definitions, sensors and schedules)."""

import dagster as dg

__all__ = ["landing_job", "monitoring_job", "retraining_job", "rollout_job", "training_job"]

landing_job = dg.define_asset_job(
    "landing_job",
    selection=dg.AssetSelection.groups("landing"),
    description="Land every data topic into the warehouse.",
)

training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.groups("ml", "analytics"),
    description="Features, training set, candidate model, gates, registration, SHAP, segments.",
)

monitoring_job = dg.define_asset_job(
    "monitoring_job",
    selection=dg.AssetSelection.groups("monitoring"),
    description="Drift report, outlier report and live performance, with their alerts.",
)

retraining_job = dg.define_asset_job(
    "retraining_job",
    selection=dg.AssetSelection.groups("ml", "analytics")
    | dg.AssetSelection.assets("rollout_decision"),
    description=(
        "Retrain: features, training set, candidate, blocking gates, registration as challenger, "
        "then the first rollout decision puts the challenger in shadow. Launched by "
        "retraining_sensor, weekly_retraining_schedule, `churn retrain` or the launchpad."
    ),
)

rollout_job = dg.define_asset_job(
    "rollout_job",
    selection=dg.AssetSelection.assets("rollout_decision"),
    description="One rollout step: judge the evidence, then advance, promote, roll back or wait.",
)
