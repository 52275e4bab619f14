"""``rollout_sensor``: keeps a rollout moving by requesting ``rollout_job`` runs."""

import json

import dagster as dg

from churn_assets.jobs import rollout_job
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.rollout_control import (
    active_challenger,
    champion_changed_by_hand,
    read_rollout_state,
)
from sensors.retraining import in_flight

__all__ = ["rollout_sensor"]


@dg.sensor(
    name="rollout_sensor",
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    job=rollout_job,
    description=(
        "While a challenger is registered but not judged, a rollout is in shadow, canary or "
        "blue-green, or the registry's champion was changed by hand, requests one rollout_job "
        "run per tick (never two at once). Each run records one decision: wait, advance, "
        "promote, switch, roll back or adopt."
    ),
)
def rollout_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    settings = platform.settings()
    state = read_rollout_state(settings.read_models_dir)
    aliases = ModelRegistry(settings.registry_dir).aliases()
    challenger = active_challenger(state, aliases)
    adopted = champion_changed_by_hand(state, aliases)
    if challenger is None and adopted is None:
        phase = state["phase"] if state else "idle"
        return dg.SensorResult(skip_reason=f"no rollout in progress (phase {phase})")
    subject = challenger or f"adopt-{adopted}"
    if in_flight(context.instance, rollout_job.name):
        return dg.SensorResult(skip_reason="a rollout_job run is already in flight")
    cursor = json.loads(context.cursor) if context.cursor else {}
    tick = int(cursor.get(subject, 0)) + 1
    cursor[subject] = tick
    phase = state["phase"] if state else "idle"
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"rollout:{subject}:{tick}",
                tags={"churn/rollout": subject, "churn/phase": phase},
            )
        ],
        cursor=json.dumps(cursor, sort_keys=True),
    )
