"""``monitoring_sensor``: refreshes the monitoring assets when new data has landed."""

import dagster as dg

from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource

__all__ = ["monitoring_sensor"]

DRIFT_ASSETS = [dg.AssetKey("drift_report"), dg.AssetKey("outlier_report")]
PERFORMANCE_ASSETS = [dg.AssetKey("live_performance")]


def latest_storage_id(instance: dg.DagsterInstance, key: str) -> int | None:
    """Storage id of the newest materialisation of ``key`` (ids only grow), or None."""
    records = instance.fetch_materializations(dg.AssetKey(key), limit=1).records
    return records[0].storage_id if records else None


def _newer(instance: dg.DagsterInstance, sources: list[str], report: str) -> list[int] | None:
    """The sources' storage ids when one of them is newer than ``report``'s, else None."""
    ids = [latest_storage_id(instance, key) for key in sources]
    landed = [i for i in ids if i is not None]
    if not landed:
        return None
    done = latest_storage_id(instance, report)
    if done is not None and max(landed) < done:
        return None
    return [i or 0 for i in ids]


@dg.sensor(
    name="monitoring_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[*DRIFT_ASSETS, *PERFORMANCE_ASSETS],
    description=(
        "Drift and outlier reports after new customer events land; live performance after new "
        "predictions or feedback land. Needs a champion. Run keys are the landing runs' "
        "materialisation ids, so one landing gives one refresh."
    ),
)
def monitoring_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    settings = platform.settings()
    if "champion" not in ModelRegistry(settings.registry_dir).aliases():
        return dg.SensorResult(skip_reason="no champion model yet; run the training_job first")
    requests = []
    events = _newer(context.instance, ["landed_customer_events"], "drift_report")
    if events is not None:
        requests.append(
            dg.RunRequest(
                run_key=f"monitoring:events:{events[0]}",
                asset_selection=DRIFT_ASSETS,
                tags={"churn/trigger": "customer events landed"},
            )
        )
    outcomes = _newer(
        context.instance, ["landed_predictions", "landed_feedback"], "live_performance"
    )
    if outcomes is not None and outcomes[0]:
        requests.append(
            dg.RunRequest(
                run_key=f"monitoring:outcomes:{outcomes[0]}:{outcomes[1]}",
                asset_selection=PERFORMANCE_ASSETS,
                tags={"churn/trigger": "predictions or feedback landed"},
            )
        )
    if not requests:
        return dg.SensorResult(skip_reason="no newly landed data since the last reports")
    return dg.SensorResult(run_requests=requests)
