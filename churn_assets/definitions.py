"""The Dagster code location: gathers assets, checks, jobs, resources and sensors."""

import dagster as dg

from churn_assets.assets.landing import landing_assets
from churn_assets.assets.ml import ml_asset_checks, ml_assets
from churn_assets.assets.monitoring import monitoring_assets, monitoring_checks
from churn_assets.resources import PlatformResource
from sensors import all_sensors

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

defs = dg.Definitions(
    assets=[*landing_assets, *ml_assets, *monitoring_assets],
    asset_checks=[*ml_asset_checks, *monitoring_checks],
    jobs=[landing_job, training_job, monitoring_job],
    sensors=all_sensors,
    resources={"platform": PlatformResource()},
    # Steps share one DuckDB writer pool anyway; in-process execution saves a Python start-up
    # (dagster, xgboost, shap imports) per step on small machines.
    executor=dg.in_process_executor,
)
