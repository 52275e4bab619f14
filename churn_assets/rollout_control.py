"""Runs the rollout state machine against the world: evidence in, decision out, audit kept.

``churn_assets.rollout`` decides; this module feeds it and records what it decided:

* **Evidence.** Shadow evidence comes from the serving API's ``GET /router/shadow-analysis``
  (pairs where the challenger shadowed the champion); canary evidence from ``GET /router/metrics``
  (the challenger's canary requests and errors since the step began, its recent p99 latency) and
  from the ``performance`` section of the monitoring read model that ``live_performance``
  publishes (AUC per version and arm: realised when both arms have
  ``monitoring.min_labelled_rows`` labels, the label-free estimate otherwise).
* **The audit table** ``rollout_decisions`` in the warehouse holds one row per decision, waits
  included: inputs (``evidence``), reasons, figures, the state after it and what the deployment
  target did. Its last row (in insertion order, not by clock) is the rollout's current state.
  Dagster's ``rollout_decision`` asset is its only writer (in the warehouse pool);
  ``rollout_decisions.parquet`` and ``rollout_state.json`` are published beside the other read
  models for sensors, the dashboard and notebooks.
* **Changes made by hand** (an operator's promote or rollback through the admin API, the
  dashboard or ``churn models``) show up as a registry champion the rollout did not choose; the
  next decision adopts it (``adopt``) instead of fighting it, and applies it, so a registry-only
  change (``churn models promote``) reaches the live traffic too.
* A version that was rolled back, promoted or champion before is never rolled out again by
  itself, even if a ``challenger`` alias still names it.

No Dagster imports: the asset, the sensors and the CLI call in here.
"""

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import requests

from churn_assets.config import Settings
from churn_assets.deploy import DeploymentError, DeploymentTarget, deployment_for
from churn_assets.monitoring import read_monitoring
from churn_assets.registry import ModelRegistry
from churn_assets.rollout import (
    TERMINAL_PHASES,
    CanaryEvidence,
    Decision,
    Phase,
    RolloutPolicy,
    RolloutState,
    ShadowEvidence,
    adopt,
    decide,
    start,
)
from churn_assets.warehouse import publish_read_model

__all__ = [
    "AUDIT_TABLE",
    "RolloutRecord",
    "active_challenger",
    "champion_changed_by_hand",
    "collect_evidence",
    "current_state",
    "read_rollout_state",
    "rollout_in_progress",
    "run_rollout_step",
    "serving_url",
]

log = logging.getLogger(__name__)

AUDIT_TABLE = "rollout_decisions"
STATE_READ_MODEL = "rollout_state.json"
_NO_CHANGE = frozenset({"wait", "hold"})

AUDIT_DDL = f"""
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
    decision_id VARCHAR PRIMARY KEY,
    decided_at TIMESTAMPTZ NOT NULL,
    run_id VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    phase_from VARCHAR NOT NULL,
    phase_to VARCHAR NOT NULL,
    champion VARCHAR NOT NULL,
    challenger VARCHAR,
    traffic DOUBLE NOT NULL,
    reasons VARCHAR NOT NULL,
    figures VARCHAR NOT NULL,
    evidence VARCHAR NOT NULL,
    target VARCHAR NOT NULL,
    applied BOOLEAN NOT NULL,
    applied_detail VARCHAR NOT NULL,
    state VARCHAR NOT NULL
)
"""
_READ_MODEL_SQL = f"""
SELECT decision_id, decided_at, run_id, action, phase_from, phase_to, champion, challenger,
       traffic, reasons, figures, evidence, target, applied, applied_detail
FROM {AUDIT_TABLE} ORDER BY rowid
"""


class RolloutControlError(RuntimeError):
    """The rollout cannot take a step; the message says what is missing."""


def serving_url(settings: Settings) -> str:
    """Base URL clients use to reach serving (evidence source, local deployment target,
    dashboard, `churn traffic`): ``serving.url``, else built from ``serving.host``/``http_port``."""
    if settings.serving.url:
        return settings.serving.url.rstrip("/")
    host = settings.serving.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{settings.serving.http_port}"


# ------------------------------------------------------------------------------------- state


def current_state(con: duckdb.DuckDBPyConnection, registry: ModelRegistry) -> RolloutState:
    """The state after the last recorded decision; before any, idle on the registry champion."""
    con.execute(AUDIT_DDL)
    rows = con.execute(f"SELECT state FROM {AUDIT_TABLE} ORDER BY rowid DESC LIMIT 1").fetchall()
    if rows:
        return RolloutState.from_dict(json.loads(rows[0][0]))
    champion = registry.aliases().get("champion")
    if champion is None:
        raise RolloutControlError(
            f"no champion in the registry ({registry.root}); run the training_job first"
        )
    return RolloutState(Phase.IDLE, champion, None)


def _step_baseline(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The evidence recorded by the decision that started the current phase or step."""
    rows = con.execute(
        f"SELECT evidence FROM {AUDIT_TABLE} WHERE action NOT IN ('wait', 'hold') "
        "ORDER BY rowid DESC LIMIT 1"
    ).fetchall()
    return json.loads(rows[0][0]) if rows else {}


def read_rollout_state(read_models_dir: Path) -> dict[str, Any] | None:
    """The published rollout state (``RolloutState.to_dict()`` plus ``updated_at``), or None
    before the first decision."""
    path = read_models_dir / STATE_READ_MODEL
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise RolloutControlError(f"{path} is not valid JSON: {exc}") from exc


def _judged_before(history: Any, version: str) -> bool:
    """Whether a rollout already finished with ``version`` (rolled back or promoted) or it
    served as champion: such a version is never rolled out again by itself."""
    return any(
        entry.get("champion") == version
        or (entry.get("challenger") == version and entry.get("to") in ("rolled_back", "promoted"))
        for entry in history or ()
    )


def rollout_in_progress(settings: Settings) -> str | None:
    """The version being rolled out (shadow, canary, blue-green) or registered as challenger
    and not judged yet, or None."""
    aliases = ModelRegistry(settings.registry_dir).aliases()
    return active_challenger(read_rollout_state(settings.read_models_dir), aliases)


def champion_changed_by_hand(
    state: Mapping[str, Any] | None, aliases: Mapping[str, str]
) -> str | None:
    """The registry champion when it is not the one the rollout state records, else None."""
    champion = aliases.get("champion")
    if state is None or champion is None or champion == state.get("champion"):
        return None
    return champion


def active_challenger(state: Mapping[str, Any] | None, aliases: Mapping[str, str]) -> str | None:
    """The version a rollout is (or should start) rolling out, or None: the challenger of an
    active phase, or a registered challenger that no rollout has judged yet."""
    if state is not None and state.get("phase") not in {p.value for p in TERMINAL_PHASES}:
        return state.get("challenger")
    challenger = aliases.get("challenger")
    if challenger is None or challenger == aliases.get("champion"):
        return None
    if state is not None and _judged_before(state.get("history"), challenger):
        return None
    return challenger


# ---------------------------------------------------------------------------------- evidence


def _get_json(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    try:
        response = requests.get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        raise RolloutControlError(f"GET {url} failed: {exc}; is the serving process up?") from exc
    if response.status_code != 200:
        raise RolloutControlError(
            f"GET {url} answered HTTP {response.status_code}: {response.text[:300]}"
        )
    return response.json()


def _arm_counts(requests_by_key: Mapping[str, int], version: str, arm: str) -> tuple[int, int]:
    total = errors = 0
    for key, count in requests_by_key.items():
        key_version, key_arm, status = key.split("/")
        if key_version == version and key_arm == arm:
            total += int(count)
            errors += int(count) if status != "ok" else 0
    return total, errors


def _auc_rows(settings: Settings, champion: str, challenger: str) -> dict[str, Any]:
    """Champion (primary arm) and challenger (canary arm) AUC of one kind for both."""
    rows = (read_monitoring(settings.read_models_dir).get("performance") or {}).get("auc") or []
    by_key = {(r["model_version"], r["arm"], r["kind"]): r for r in rows}
    minimum = settings.monitoring.min_labelled_rows
    pair = {}
    for kind in ("realised", "estimated"):
        champ = by_key.get((champion, "primary", kind))
        chall = by_key.get((challenger, "canary", kind))
        if kind == "realised" and not (
            champ and chall and champ["labelled"] >= minimum and chall["labelled"] >= minimum
        ):
            continue
        pair = {"kind": kind, "champion": champ, "challenger": chall}
        break
    return pair


def collect_evidence(
    settings: Settings, state: RolloutState, baseline: Mapping[str, Any], now: float
) -> tuple[ShadowEvidence | None, CanaryEvidence | None, dict[str, Any]]:
    """Evidence for ``state``'s phase, and the raw inputs recorded in the audit table."""
    base = serving_url(settings)
    raw: dict[str, Any] = {"source": base}
    metrics = _get_json(f"{base}/router/metrics")
    counts = metrics.get("requests", {})
    raw["router_state"] = metrics.get("state")
    if state.challenger is None:
        return None, None, raw
    total, errors = _arm_counts(counts, state.challenger, "canary")
    raw["canary_requests_total"] = total
    raw["canary_errors_total"] = errors
    if state.phase in (Phase.SHADOW, Phase.BLUE_GREEN_READY):
        analysis = _get_json(f"{base}/router/shadow-analysis?version={state.challenger}")
        raw["shadow_analysis"] = analysis
        pairs, errors = int(analysis.get("pairs") or 0), int(analysis.get("errors") or 0)
        if not pairs and not errors:
            return None, None, raw
        shadow = ShadowEvidence(
            requests=pairs,
            agreement_rate=float(analysis.get("agreement_rate", 0.0)),
            ks_statistic=float(analysis.get("ks_statistic", 0.0)),
            latency_overhead_ms=float(analysis.get("latency_overhead_ms", 0.0)),
            errors=errors,
        )
        return shadow, None, raw
    if state.phase is not Phase.CANARY:
        return None, None, raw
    base_requests = int(baseline.get("canary_requests_total", 0))
    base_errors = int(baseline.get("canary_errors_total", 0))
    if total < base_requests or errors < base_errors:
        # The counters went backwards: serving restarted during the step. Count from its start.
        raw["serving_restarted"] = True
        base_requests = base_errors = 0
    step_requests = total - base_requests
    step_errors = errors - base_errors
    latency = metrics.get("latency_ms", {}).get(f"{state.challenger}/canary", {})
    auc = _auc_rows(settings, state.champion, state.challenger)
    raw["auc"] = auc
    champ, chall = auc.get("champion"), auc.get("challenger")

    def rows_behind(row: Mapping[str, Any] | None) -> int:
        if row is None:
            return 0
        return int(row["labelled"] if auc["kind"] == "realised" else row.get("rows", 0))

    def positives(row: Mapping[str, Any] | None) -> float | None:
        if row is None or row.get("positives") is None:
            return None
        return min(float(row["positives"]), float(rows_behind(row)))

    started = state.step_started_at if state.step_started_at is not None else now
    canary = CanaryEvidence(
        requests=max(step_requests, 0),
        errors=min(max(step_errors, 0), max(step_requests, 0)),
        p99_latency_ms=float(latency.get("p99", 0.0)),
        champion_auc=None if champ is None else champ.get("roc_auc"),
        challenger_auc=None if chall is None else chall.get("roc_auc"),
        champion_labelled=rows_behind(champ),
        challenger_labelled=rows_behind(chall),
        auc_kind=auc.get("kind", "estimated"),
        elapsed_s=max(now - started, 0.0),
        champion_positives=positives(champ),
        challenger_positives=positives(chall),
    )
    return None, canary, raw


# ------------------------------------------------------------------------------------ a step


@dataclass(frozen=True)
class RolloutRecord:
    """One recorded decision."""

    decision: Decision
    state_before: RolloutState
    evidence: dict[str, Any]
    applied: dict[str, Any] | None
    target: str

    def row(self, run_id: str, decided_at: datetime) -> dict[str, Any]:
        after = self.decision.next_state
        return {
            "decision_id": uuid.uuid4().hex,
            "decided_at": decided_at,
            "run_id": run_id,
            "action": self.decision.action,
            "phase_from": self.state_before.phase.value,
            "phase_to": after.phase.value,
            "champion": after.champion,
            "challenger": after.challenger or self.state_before.challenger,
            "traffic": float(self.decision.traffic),
            "reasons": json.dumps(list(self.decision.reasons)),
            "figures": json.dumps(self.decision.figures),
            "evidence": json.dumps(self.evidence, default=str),
            "target": self.target,
            "applied": self.applied is not None,
            "applied_detail": json.dumps(self.applied or {}, default=str),
            "state": json.dumps(after.to_dict()),
        }


def _sync_registry(registry: ModelRegistry, decision: Decision) -> None:
    """Registry aliases follow the decision (the local server also syncs them itself)."""
    after = decision.next_state
    aliases = registry.aliases()
    if aliases.get("champion") != after.champion:
        registry.set_alias("champion", after.champion)
    if after.challenger is None and "challenger" in registry.aliases():
        registry.clear_alias("challenger")


def _decide(
    settings: Settings,
    state: RolloutState,
    aliases: Mapping[str, str],
    baseline: Mapping[str, Any],
    policy: RolloutPolicy,
    now: float,
) -> tuple[Decision, dict[str, Any]]:
    champion = aliases.get("champion")
    if champion and champion != state.champion:
        how = "promoted" if champion == state.challenger else "made champion (rollback or promote)"
        reason = f"{champion} was {how} outside the rollout; adopting it, {state.champion} retires"
        return adopt(state, champion, now=now, reason=reason), {"aliases": dict(aliases)}
    challenger = aliases.get("challenger")
    if (
        state.phase in TERMINAL_PHASES
        and challenger
        and challenger != state.champion
        and not _judged_before(state.history, challenger)
    ):
        return start(state, challenger, now=now), {"aliases": dict(aliases)}
    shadow, canary, raw = collect_evidence(settings, state, baseline, now)
    return decide(state, policy, shadow=shadow, canary=canary, now=now), raw


def run_rollout_step(
    settings: Settings,
    con: duckdb.DuckDBPyConnection,
    target: DeploymentTarget,
    *,
    run_id: str,
    now: float | None = None,
) -> RolloutRecord:
    """Decide the next rollout step, apply it through ``target``, record it and publish the
    read models. A failed apply is recorded (``applied`` false, the error in
    ``applied_detail``) with the state unchanged, then raised."""
    now = time.time() if now is None else now
    registry = ModelRegistry(settings.registry_dir)
    state = current_state(con, registry)
    policy = RolloutPolicy.from_settings(settings)
    decision, evidence = _decide(
        settings, state, registry.aliases(), _step_baseline(con), policy, now
    )
    describe = target.describe()
    target_name = str(describe.get("target", type(target).__name__))
    applied: dict[str, Any] | None = None
    error: DeploymentError | None = None
    if decision.action not in _NO_CHANGE:
        try:
            applied = target.apply(deployment_for(decision))
        except DeploymentError as exc:
            error = exc
    if error is not None:
        failed = Decision(
            "wait",
            state,
            decision.traffic,
            (*decision.reasons, f"NOT APPLIED ({decision.action}): {error}"),
            decision.figures,
        )
        record = RolloutRecord(failed, state, evidence, None, target_name)
        _append(con, settings, record, run_id, now)
        raise error
    if decision.action not in ("wait", "hold"):
        _sync_registry(registry, decision)
    record = RolloutRecord(decision, state, evidence, applied, target_name)
    _append(con, settings, record, run_id, now)
    return record


def _append(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    record: RolloutRecord,
    run_id: str,
    now: float,
) -> None:
    import pandas as pd

    decided_at = datetime.fromtimestamp(now, UTC)
    frame = pd.DataFrame([record.row(run_id, decided_at)])
    con.execute(AUDIT_DDL)
    con.register("decision_row", frame)
    try:
        con.execute(f"INSERT INTO {AUDIT_TABLE} BY NAME SELECT * FROM decision_row")
    finally:
        con.unregister("decision_row")
    publish_read_model(con, settings.read_models_dir, AUDIT_TABLE, _READ_MODEL_SQL)
    state = record.decision.next_state.to_dict() | {"updated_at": decided_at.isoformat()}
    path = settings.read_models_dir / STATE_READ_MODEL
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
