"""Retraining triggers: episodes, hold, cool-down, rollout and enable switches; the schedule."""

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from churn_assets.config import load_settings
from churn_assets.resources import DeploymentTargetResource, PlatformResource
from churn_assets.retraining import TriggerSnapshot, evaluate_triggers
from sensors.retraining import weekly_retraining_schedule
from tests.conftest import write_config

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BASE = TriggerSnapshot(
    now=T0,
    enabled=True,
    hold=timedelta(0),
    cooldown=timedelta(minutes=60),
    min_samples=1000,
    performance_threshold=0.75,
    champion="v1",
    last_trained_version="v1",
)


def report(report_id: str, at: datetime, drift: bool = True, version: str = "v1") -> dict:
    return {
        "report_id": report_id,
        "computed_at": at.isoformat(),
        "model_version": version,
        "drift": drift,
        "features": {"monthly_charges": {"drift": drift}, "login_frequency": {"drift": False}},
        "multivariate": {"drift": False},
    }


class Sensor:
    """Feeds snapshots through evaluate_triggers with a JSON round trip of the cursor."""

    def __init__(self) -> None:
        self.cursor: dict = {}
        self.fired: list[str] = []

    def tick(self, snapshot: TriggerSnapshot):
        outcome = evaluate_triggers(snapshot, self.cursor)
        self.cursor = json.loads(json.dumps(outcome.cursor))
        if outcome.run_key:
            self.fired.append(outcome.run_key)
        return outcome


def test_one_drift_episode_gives_one_retraining():
    sensor = Sensor()
    first = sensor.tick(replace(BASE, drift=report("r1", T0)))
    assert first.run_key == "retrain:drift-r1" and first.triggers == ("drift",)
    assert "monthly_charges" in first.reasons[0] and "login_frequency" not in first.reasons[0]
    # The same drift keeps being reported, also after the cool-down: still the same episode.
    for hours in (1, 5, 30):
        at = T0 + timedelta(hours=hours)
        later = sensor.tick(replace(BASE, now=at, drift=report(f"r{hours}", at)))
        assert later.run_key is None and "already retrained" in later.skip_reason
    # No drift closes the episode; drift after that is a new episode.
    calm = T0 + timedelta(hours=31)
    assert sensor.tick(replace(BASE, now=calm, drift=report("quiet", calm, False))).run_key is None
    again = T0 + timedelta(hours=32)
    assert sensor.tick(replace(BASE, now=again, drift=report("r9", again))).run_key == (
        "retrain:drift-r9"
    )
    assert sensor.fired == ["retrain:drift-r1", "retrain:drift-r9"]


def test_drift_must_hold_across_reports_for_the_hold_period():
    sensor = Sensor()
    held = replace(BASE, hold=timedelta(minutes=30))
    for minutes in (0, 10, 29):
        at = T0 + timedelta(minutes=minutes)
        outcome = sensor.tick(replace(held, now=at, drift=report(f"r{minutes}", at)))
        assert outcome.run_key is None and f"held {minutes} of 30 min" in outcome.skip_reason
    at = T0 + timedelta(minutes=31)
    assert sensor.tick(replace(held, now=at, drift=report("r31", at))).run_key == "retrain:drift-r0"


def test_a_drift_blip_shorter_than_the_hold_fires_nothing():
    sensor = Sensor()
    held = replace(BASE, hold=timedelta(minutes=30))
    sensor.tick(replace(held, drift=report("r0", T0)))
    at = T0 + timedelta(minutes=10)
    sensor.tick(replace(held, now=at, drift=report("calm", at, drift=False)))
    at = T0 + timedelta(minutes=45)
    outcome = sensor.tick(replace(held, now=at, drift=report("r45", at)))
    assert outcome.run_key is None and "held 0 of 30 min" in outcome.skip_reason


def test_reports_about_another_version_are_ignored():
    outcome = Sensor().tick(replace(BASE, drift=report("old", T0, version="v0")))
    assert outcome.run_key is None and "no drift report about the current champion" in (
        outcome.skip_reason
    )


def test_the_cool_down_delays_a_new_trigger_without_losing_it():
    sensor = Sensor()
    sensor.tick(replace(BASE, drift=report("r1", T0)))
    at = T0 + timedelta(minutes=20)
    low = {"roc_auc": 0.70, "kind": "realised", "labelled": 500}
    blocked = sensor.tick(replace(BASE, now=at, champion_auc=low))
    assert blocked.run_key is None and "cooling down for 40 more min" in blocked.skip_reason
    at = T0 + timedelta(minutes=61)
    fired = sensor.tick(replace(BASE, now=at, champion_auc=low))
    assert fired.triggers == ("performance",) and fired.run_key.startswith("retrain:performance-")
    assert "realised AUC 0.700 < 0.75" in fired.reasons[0]


def test_nothing_fires_during_a_rollout_or_when_disabled_but_fires_after():
    sensor = Sensor()
    during = sensor.tick(replace(BASE, drift=report("r1", T0), rollout_challenger="v2"))
    assert during.run_key is None and "rollout of v2 is in progress" in during.skip_reason
    off = sensor.tick(replace(BASE, drift=report("r1", T0), enabled=False))
    assert off.run_key is None and "retraining.enabled is false" in off.skip_reason
    assert sensor.tick(replace(BASE, drift=report("r1", T0))).run_key == "retrain:drift-r1"


def test_feedback_volume_fires_once_per_trained_version():
    sensor = Sensor()
    few = sensor.tick(replace(BASE, new_labels=999))
    assert few.run_key is None and "999 labelled outcomes" in few.skip_reason
    assert sensor.tick(replace(BASE, new_labels=1000)).run_key == "retrain:feedback-after-v1"
    later = T0 + timedelta(days=2)
    assert sensor.tick(replace(BASE, now=later, new_labels=5000)).run_key is None
    after_v2 = sensor.tick(
        replace(BASE, now=later, new_labels=1200, last_trained_version="v2", champion="v2")
    )
    assert after_v2.run_key == "retrain:feedback-after-v2"


def test_simultaneous_triggers_make_one_request():
    low = {"roc_auc": 0.6, "kind": "estimated", "labelled": 0}
    outcome = Sensor().tick(
        replace(BASE, drift=report("r1", T0), champion_auc=low, new_labels=4000)
    )
    assert outcome.triggers == ("drift", "performance", "feedback")
    assert outcome.run_key.startswith("retrain:drift-r1+performance-v1@")
    assert outcome.run_key.endswith("+feedback-after-v1") and len(outcome.reasons) == 3


def test_performance_recovery_closes_the_episode():
    sensor = Sensor()
    held = replace(BASE, hold=timedelta(minutes=30))
    low = {"roc_auc": 0.7, "kind": "realised", "labelled": 500}
    sensor.tick(replace(held, champion_auc=low))
    good = {"roc_auc": 0.8, "kind": "realised", "labelled": 500}
    assert (
        "AUC 0.800 >= 0.75"
        in sensor.tick(replace(held, now=T0 + timedelta(minutes=20), champion_auc=good)).skip_reason
    )
    late = sensor.tick(replace(held, now=T0 + timedelta(minutes=40), champion_auc=low))
    assert late.run_key is None and "for 0 of 30 min" in late.skip_reason


def _evaluate_schedule(config, when: datetime):
    with dg.build_schedule_context(
        scheduled_execution_time=when,
        resources={"platform": PlatformResource(config_path=str(config))},
    ) as context:
        return weekly_retraining_schedule.evaluate_tick(context)


def test_weekly_schedule_follows_the_config_and_the_enabled_switch(tmp_path):
    assert weekly_retraining_schedule.cron_schedule == load_settings().retraining.schedule
    sunday = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    on = _evaluate_schedule(write_config(tmp_path / "on"), sunday)
    [request] = on.run_requests
    assert request.run_key == f"retrain:schedule:{sunday.isoformat()}"
    assert request.tags["churn/retraining_reason"] == "schedule"
    off = _evaluate_schedule(write_config(tmp_path / "off", retraining={"enabled": False}), sunday)
    assert not off.run_requests and "retraining.enabled is false" in off.skip_message
    busy_config = write_config(tmp_path / "busy")
    read_models = load_settings(busy_config).read_models_dir
    read_models.mkdir(parents=True)
    state = {"phase": "canary", "champion": "v1", "challenger": "v2", "step_index": 0}
    (read_models / "rollout_state.json").write_text(json.dumps(state))
    busy = _evaluate_schedule(busy_config, sunday)
    assert not busy.run_requests and "rollout of v2 is in progress" in busy.skip_message


def test_deployment_target_resource_errors_are_specific(tmp_path, monkeypatch):
    settings = load_settings(write_config(tmp_path))
    monkeypatch.delenv("CHURN_ADMIN_TOKEN", raising=False)
    with pytest.raises(Exception, match="CHURN_ADMIN_TOKEN is not set"):
        DeploymentTargetResource().target(settings)
    monkeypatch.setenv("CHURN_ADMIN_TOKEN", "t0ken")
    local = DeploymentTargetResource().target(settings)
    assert local.describe()["base_url"] == f"http://127.0.0.1:{settings.serving.http_port}"
    seldon = DeploymentTargetResource(kind="seldon_v2").target(settings)
    assert seldon.describe()["kind"] == "v2" and seldon.describe()["namespace"] == "churn"
    with pytest.raises(Exception, match="unknown deployment target 'ftp'"):
        DeploymentTargetResource(kind="ftp").target(settings)
