"""When to retrain: triggers with hysteresis, evaluated by ``retraining_sensor``.

Three automatic triggers (the weekly schedule and the manual launch live in Dagster):

* **drift**: the latest drift report about the current champion flags drift;
* **performance**: the champion's live AUC (realised with ``monitoring.min_labelled_rows``
  labels, the label-free estimate otherwise) is below ``retraining.performance_threshold``;
* **feedback**: ``retraining.min_samples`` labelled outcomes have landed since the last training.

Hysteresis, so one episode gives one retraining and not a storm:

* A drift or performance condition opens an **episode** when first seen and closes when a later
  observation no longer shows it. An episode fires at most once.
* **Hold**: an episode fires only once it has lasted ``retraining.hold_minutes``: for drift,
  between the first and the latest drifted report (two reports must agree, unless the hold is
  0); for performance, in wall-clock time since first seen.
* **Cool-down**: after any automatic request, none for ``retraining.cooldown_minutes``.
* Nothing fires while a rollout is in progress, nor when ``retraining.enabled`` is false;
  episodes are still tracked, so a condition that ends meanwhile fires nothing.

Run keys are deterministic (the drift episode's first report id, the performance episode's
start, the last trained version for feedback), so the sensor never requests the same
retraining twice. Everything here is pure: the sensor gathers a :class:`TriggerSnapshot` and
keeps the JSON cursor.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

__all__ = ["TriggerOutcome", "TriggerSnapshot", "evaluate_triggers"]


@dataclass(frozen=True)
class TriggerSnapshot:
    """What the sensor observed at ``now``."""

    now: datetime
    enabled: bool
    hold: timedelta
    cooldown: timedelta
    min_samples: int
    performance_threshold: float
    champion: str | None
    drift: Mapping[str, Any] | None = None
    champion_auc: Mapping[str, Any] | None = None
    new_labels: int = 0
    last_trained_version: str | None = None
    rollout_challenger: str | None = None


@dataclass(frozen=True)
class TriggerOutcome:
    """A retraining request (``run_key`` and ``reasons``) or why there is none."""

    cursor: dict[str, Any]
    run_key: str | None = None
    reasons: tuple[str, ...] = ()
    triggers: tuple[str, ...] = ()
    skip_reason: str | None = None
    observations: dict[str, str] = field(default_factory=dict)


def _iso(value: datetime) -> str:
    return value.isoformat()


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _track_drift(snapshot: TriggerSnapshot, episode: dict[str, Any] | None):
    """The drift episode after this observation, whether it is confirmed, and a description."""
    report = snapshot.drift
    if not report or snapshot.champion is None or report.get("model_version") != snapshot.champion:
        return episode, False, "no drift report about the current champion yet"
    computed = _parse(str(report["computed_at"]))
    if not report.get("drift"):
        return None, False, f"drift report {report['report_id']}: no drift"
    if episode is None:
        episode = {"id": str(report["report_id"]), "since": _iso(computed), "fired": False}
    lasted = computed - _parse(episode["since"])
    flagged = sorted(f for f, v in (report.get("features") or {}).items() if v.get("drift"))
    if (report.get("multivariate") or {}).get("drift"):
        flagged.append("multivariate")
    text = (
        f"drift in {', '.join(flagged) or 'the prediction score'} since report {episode['id']}, "
        f"held {lasted.total_seconds() / 60:.0f} of {snapshot.hold.total_seconds() / 60:.0f} min"
    )
    if episode["fired"]:
        text += " (this episode already retrained)"
    confirmed = lasted >= snapshot.hold and not episode["fired"]
    return episode, confirmed, text


def _track_performance(snapshot: TriggerSnapshot, episode: dict[str, Any] | None):
    row = snapshot.champion_auc
    if not row or row.get("roc_auc") is None or snapshot.champion is None:
        return episode, False, "no live AUC for the champion yet"
    auc, kind = float(row["roc_auc"]), row.get("kind", "estimated")
    if auc >= snapshot.performance_threshold:
        return None, False, f"{kind} AUC {auc:.3f} >= {snapshot.performance_threshold}"
    if episode is None or episode.get("champion") != snapshot.champion:
        episode = {
            "id": f"{snapshot.champion}@{_iso(snapshot.now)}",
            "champion": snapshot.champion,
            "since": _iso(snapshot.now),
            "fired": False,
        }
    lasted = snapshot.now - _parse(episode["since"])
    text = (
        f"{snapshot.champion} {kind} AUC {auc:.3f} < {snapshot.performance_threshold} for "
        f"{lasted.total_seconds() / 60:.0f} of {snapshot.hold.total_seconds() / 60:.0f} min"
    )
    if episode["fired"]:
        text += " (this episode already retrained)"
    return episode, lasted >= snapshot.hold and not episode["fired"], text


def evaluate_triggers(snapshot: TriggerSnapshot, cursor: Mapping[str, Any]) -> TriggerOutcome:
    """The retraining request for ``snapshot``, given the previous ``cursor`` (``{}`` at first)."""
    state: dict[str, Any] = {
        "drift": cursor.get("drift"),
        "performance": cursor.get("performance"),
        "feedback_fired_for": cursor.get("feedback_fired_for"),
        "last_fired_at": cursor.get("last_fired_at"),
    }
    drift, drift_ready, drift_text = _track_drift(snapshot, state["drift"])
    perf, perf_ready, perf_text = _track_performance(snapshot, state["performance"])
    state["drift"], state["performance"] = drift, perf
    feedback_key = f"feedback-after-{snapshot.last_trained_version or 'none'}"
    feedback_ready = (
        snapshot.new_labels >= snapshot.min_samples and state["feedback_fired_for"] != feedback_key
    )
    feedback_text = (
        f"{snapshot.new_labels} labelled outcomes landed since "
        f"{snapshot.last_trained_version or 'the start'} (retrain at {snapshot.min_samples})"
    )
    observations = {"drift": drift_text, "performance": perf_text, "feedback": feedback_text}

    ready: list[tuple[str, str, str]] = []
    if drift_ready:
        ready.append(("drift", f"drift-{drift['id']}", drift_text))
    if perf_ready:
        ready.append(("performance", f"performance-{perf['id']}", perf_text))
    if feedback_ready:
        ready.append(("feedback", feedback_key, feedback_text))

    def outcome(skip: str) -> TriggerOutcome:
        return TriggerOutcome(cursor=state, skip_reason=skip, observations=observations)

    if not ready:
        return outcome("no retraining trigger is ready: " + "; ".join(observations.values()))
    names = ", ".join(name for name, _, _ in ready)
    if not snapshot.enabled:
        return outcome(f"retraining.enabled is false ({names} would trigger)")
    if snapshot.rollout_challenger is not None:
        return outcome(
            f"a rollout of {snapshot.rollout_challenger} is in progress ({names} waits for it)"
        )
    if state["last_fired_at"] is not None:
        since = snapshot.now - _parse(state["last_fired_at"])
        if since < snapshot.cooldown:
            left = (snapshot.cooldown - since).total_seconds() / 60
            return outcome(f"cooling down for {left:.0f} more min ({names} would trigger)")
    for name, _, _ in ready:
        if name == "feedback":
            state["feedback_fired_for"] = feedback_key
        else:
            state[name] = {**state[name], "fired": True}
    state["last_fired_at"] = _iso(snapshot.now)
    return TriggerOutcome(
        cursor=state,
        run_key="retrain:" + "+".join(key for _, key, _ in ready),
        reasons=tuple(text for _, _, text in ready),
        triggers=tuple(name for name, _, _ in ready),
        observations=observations,
    )
