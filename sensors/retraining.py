"""Retraining triggers: ``retraining_sensor`` (drift, performance, feedback volume, with
hysteresis) and ``weekly_retraining_schedule`` (``retraining.schedule``)."""

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import duckdb

from churn_assets.config import Settings, load_settings
from churn_assets.jobs import retraining_job
from churn_assets.monitoring import read_monitoring
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.retraining import TriggerSnapshot, evaluate_triggers
from churn_assets.rollout_control import (
    active_challenger,
    read_rollout_state,
    rollout_in_progress,
)
from churn_assets.warehouse import ReadModelMissing, read_model_table

__all__ = ["retraining_sensor", "snapshot_for", "weekly_retraining_schedule"]

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def in_flight(instance: dg.DagsterInstance, job_name: str) -> bool:
    """Whether a run of ``job_name`` is queued or running."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT), limit=1)
    return bool(runs)


def _champion_auc(settings: Settings, champion: str | None) -> dict | None:
    rows = (read_monitoring(settings.read_models_dir).get("performance") or {}).get("auc") or []
    mine = {r["kind"]: r for r in rows if r["model_version"] == champion and r["arm"] == "primary"}
    realised = mine.get("realised")
    if realised and realised["labelled"] >= settings.monitoring.min_labelled_rows:
        return realised
    return mine.get("estimated")


def _labels_since(settings: Settings, since: datetime | None) -> int:
    """Feedback rows landed after ``since`` (all when None), from the published read model."""
    try:
        landed = read_model_table(settings.read_models_dir, "landed_feedback", ["landed_at"])
    except ReadModelMissing:
        return 0
    if since is None:
        return landed.num_rows
    con = duckdb.connect()
    try:
        con.register("landed", landed)
        query = "SELECT count(*) FROM landed WHERE landed_at > ?"
        return int(con.execute(query, [since]).fetchall()[0][0])
    finally:
        con.close()


def snapshot_for(settings: Settings, now: datetime) -> TriggerSnapshot:
    """What the triggers look at, gathered from the registry and the read models."""
    registry = ModelRegistry(settings.registry_dir)
    aliases = registry.aliases()
    versions = registry.versions()
    latest = max(versions, key=lambda v: v.number) if versions else None
    retraining = settings.retraining
    return TriggerSnapshot(
        now=now,
        enabled=retraining.enabled,
        hold=timedelta(minutes=retraining.hold_minutes),
        cooldown=timedelta(minutes=retraining.cooldown_minutes),
        min_samples=retraining.min_samples,
        performance_threshold=retraining.performance_threshold,
        champion=aliases.get("champion"),
        drift=read_monitoring(settings.read_models_dir).get("drift"),
        champion_auc=_champion_auc(settings, aliases.get("champion")),
        new_labels=_labels_since(
            settings, datetime.fromisoformat(latest.registered_at) if latest else None
        ),
        last_trained_version=latest.version if latest else None,
        rollout_challenger=active_challenger(read_rollout_state(settings.read_models_dir), aliases),
    )


@dg.sensor(
    name="retraining_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    job=retraining_job,
    description=(
        "Requests the retraining_job when drift is confirmed, the champion's live AUC is below "
        "retraining.performance_threshold, or retraining.min_samples new labels have landed; "
        "with a hold period, a cool-down and one retraining per episode (see "
        "churn_assets/retraining.py). Off when retraining.enabled is false."
    ),
)
def retraining_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    settings = platform.settings()
    cursor = json.loads(context.cursor) if context.cursor else {}
    if "champion" not in ModelRegistry(settings.registry_dir).aliases():
        return dg.SensorResult(skip_reason="no champion model yet; run the training_job first")
    outcome = evaluate_triggers(snapshot_for(settings, datetime.now(UTC)), cursor)
    new_cursor = json.dumps(outcome.cursor, sort_keys=True)
    if outcome.run_key is None:
        return dg.SensorResult(skip_reason=outcome.skip_reason, cursor=new_cursor)
    if in_flight(context.instance, retraining_job.name):
        # Keep the old cursor: the trigger fires once the running retraining has finished.
        return dg.SensorResult(skip_reason="a retraining_job run is already in flight")
    context.log.info(f"retraining requested ({outcome.run_key}): {'; '.join(outcome.reasons)}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=outcome.run_key,
                tags={
                    "churn/retraining_reason": ",".join(outcome.triggers),
                    "churn/retraining_detail": "; ".join(outcome.reasons)[:1000],
                },
            )
        ],
        cursor=new_cursor,
    )


def _configured_cron() -> str:
    """``retraining.schedule`` from the configuration this code location loads with. A schedule's
    cron is part of its definition, so a change needs a code-location reload."""
    return load_settings().retraining.schedule


@dg.schedule(
    name="weekly_retraining_schedule",
    cron_schedule=_configured_cron(),
    job=retraining_job,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Retrains on retraining.schedule (default Sunday 02:00 UTC) unless disabled or a "
        "rollout is in progress."
    ),
)
def weekly_retraining_schedule(context: dg.ScheduleEvaluationContext, platform: PlatformResource):
    settings = platform.settings()
    if not settings.retraining.enabled:
        return dg.SkipReason("retraining.enabled is false")
    rolling = rollout_in_progress(settings)
    if rolling is not None:
        return dg.SkipReason(f"a rollout of {rolling} is in progress; the next week retrains")
    scheduled = context.scheduled_execution_time
    key = scheduled.isoformat() if scheduled else datetime.now(UTC).isoformat()
    return dg.RunRequest(
        run_key=f"retrain:schedule:{key}",
        tags={"churn/retraining_reason": "schedule"},
    )
