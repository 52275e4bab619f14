"""The rollout decision asset: one step of shadow → canary → promote / roll back per run."""

import json

import dagster as dg

from churn_assets.assets.landing import WAREHOUSE_POOL
from churn_assets.plots import markdown_table
from churn_assets.resources import DeploymentTargetResource, PlatformResource
from churn_assets.rollout_control import AUDIT_TABLE, run_rollout_step
from churn_assets.warehouse import connect

__all__ = ["rollout_assets", "rollout_decision"]


@dg.asset(
    group_name="rollout",
    kinds={"duckdb", "seldon"},
    pool=WAREHOUSE_POOL,
    deps=["registered_model", "live_performance"],
)
def rollout_decision(
    context: dg.AssetExecutionContext,
    platform: PlatformResource,
    deployment_target: DeploymentTargetResource,
) -> dg.MaterializeResult:
    """The next rollout step for the registered challenger, applied to the deployment target.

    Starts a shadow for a new challenger; judges shadow evidence (mirrored requests, agreement,
    score-distribution KS, latency overhead) and canary evidence (error rate, p99 latency, live
    AUC against the champion); advances, promotes or rolls back. Every decision, waits included,
    is appended to the ``rollout_decisions`` audit table with its inputs, reasons and figures.
    """
    settings = platform.settings()
    target = deployment_target.target(settings)
    with connect(settings.warehouse_path) as con:
        record = run_rollout_step(settings, con, target, run_id=context.run.run_id)
        history = con.execute(f"SELECT count(*) FROM {AUDIT_TABLE}").fetchall()[0][0]
    decision, after = record.decision, record.decision.next_state
    context.log.info(
        f"rollout {decision.action}: {record.state_before.phase} -> {after.phase}; "
        + " | ".join(decision.reasons)
    )
    figures = [{"figure": k, "value": round(v, 4)} for k, v in sorted(decision.figures.items())]
    return dg.MaterializeResult(
        metadata={
            "action": decision.action,
            "phase_from": record.state_before.phase.value,
            "phase": after.phase.value,
            "champion": after.champion,
            "challenger": after.challenger or record.state_before.challenger or "none",
            "challenger_traffic": float(decision.traffic),
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "figures": dg.MetadataValue.md(markdown_table(figures) if figures else "none"),
            "target": record.target,
            "applied": dg.MetadataValue.json(record.applied or {}),
            "evidence": dg.MetadataValue.json(json.loads(json.dumps(record.evidence, default=str))),
            "decisions_recorded": int(history),
        }
    )


rollout_assets = [rollout_decision]
