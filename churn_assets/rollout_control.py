"""Runs the rollout state machine against the world: evidence in, decision out, audit kept.

``churn_assets.rollout`` decides; this module feeds it and records what it decided:

* **Evidence** comes from the source ``rollout.evidence`` names (``churn_assets.evidence``): the
  serving router's counters (``router``) or Prometheus and the warehouse (``prometheus``). The
  decision records the source and, per figure, the query behind it; its reasons end with a line
  naming which source gave which figure. A source that cannot be reached gives the decision
  "hold: evidence unavailable" (state unchanged, never a promotion); the next run tries again.
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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from churn_assets.config import Settings
from churn_assets.deploy import DeploymentError, DeploymentTarget, deployment_for
from churn_assets.evidence import Evidence, EvidenceSource, EvidenceUnavailable, evidence_source
from churn_assets.evidence.router import serving_url
from churn_assets.registry import ModelRegistry
from churn_assets.rollout import (
    TERMINAL_PHASES,
    Decision,
    Phase,
    RolloutPolicy,
    RolloutState,
    adopt,
    decide,
    start,
    traffic_share,
)
from churn_assets.warehouse import publish_read_model

__all__ = [
    "AUDIT_TABLE",
    "RolloutRecord",
    "active_challenger",
    "champion_changed_by_hand",
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


def _judge(
    source: EvidenceSource,
    state: RolloutState,
    baseline: Mapping[str, Any],
    policy: RolloutPolicy,
    now: float,
) -> tuple[Decision, dict[str, Any]]:
    """The policy's decision on the source's evidence; a hold when the source is unreachable."""
    try:
        evidence = source.collect(state, baseline, now)
    except EvidenceUnavailable as exc:
        log.warning("rollout holds: evidence unavailable from %s: %s", source.name, exc)
        reason = f"hold: evidence unavailable from {source.name}: {exc}"
        hold = Decision("hold", state, traffic_share(state, policy), (reason,), {})
        return hold, {"source": source.name, "unavailable": str(exc), **source.describe()}
    decision = decide(state, policy, shadow=evidence.shadow, canary=evidence.canary, now=now)
    return _with_provenance(decision, evidence), evidence.record()


def _with_provenance(decision: Decision, evidence: Evidence) -> Decision:
    """``decision`` with the source's "no data yet" reasons (when it waits) and a last reason
    naming which source gave which figure."""
    reasons = list(decision.reasons)
    if decision.action == "wait":
        reasons += [f"no data yet: {why}" for why in evidence.waiting]
    if evidence.figures:
        reasons.append(evidence.provenance())
    return replace(decision, reasons=tuple(reasons))


def _decide(
    settings: Settings,
    source: EvidenceSource,
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
    return _judge(source, state, baseline, policy, now)


def run_rollout_step(
    settings: Settings,
    con: duckdb.DuckDBPyConnection,
    target: DeploymentTarget,
    *,
    run_id: str,
    now: float | None = None,
    evidence: EvidenceSource | None = None,
) -> RolloutRecord:
    """Decide the next rollout step on ``evidence`` (default: the source ``rollout.evidence``
    names), apply it through ``target``, record it and publish the read models. A failed apply
    is recorded (``applied`` false, the error in ``applied_detail``) with the state unchanged,
    then raised."""
    now = time.time() if now is None else now
    registry = ModelRegistry(settings.registry_dir)
    state = current_state(con, registry)
    policy = RolloutPolicy.from_settings(settings)
    source = evidence if evidence is not None else evidence_source(settings, con)
    decision, evidence_record = _decide(
        settings, source, state, registry.aliases(), _step_baseline(con), policy, now
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
        record = RolloutRecord(failed, state, evidence_record, None, target_name)
        _append(con, settings, record, run_id, now)
        raise error
    if decision.action not in ("wait", "hold"):
        _sync_registry(registry, decision)
    record = RolloutRecord(decision, state, evidence_record, applied, target_name)
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
