"""The Dagster code location: gathers assets, checks, jobs, resources, sensors and schedules."""

import dagster as dg

from churn_assets.assets.landing import landing_assets
from churn_assets.assets.ml import ml_asset_checks, ml_assets
from churn_assets.assets.monitoring import monitoring_assets, monitoring_checks
from churn_assets.assets.rollout import rollout_assets
from churn_assets.jobs import (
    landing_job,
    monitoring_job,
    retraining_job,
    rollout_job,
    training_job,
)
from churn_assets.resources import DeploymentTargetResource, PlatformResource
from sensors import all_schedules, all_sensors

defs = dg.Definitions(
    assets=[*landing_assets, *ml_assets, *monitoring_assets, *rollout_assets],
    asset_checks=[*ml_asset_checks, *monitoring_checks],
    jobs=[landing_job, training_job, monitoring_job, retraining_job, rollout_job],
    sensors=all_sensors,
    schedules=all_schedules,
    resources={
        "platform": PlatformResource(),
        "deployment_target": DeploymentTargetResource(),
    },
    # Steps share one DuckDB writer pool anyway; in-process execution saves a Python start-up
    # (dagster, xgboost, shap imports) per step on small machines.
    executor=dg.in_process_executor,
)
