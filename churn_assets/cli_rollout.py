"""``churn retrain`` (the manual retraining trigger) and ``churn rollout`` (its progress)."""

import json
import subprocess
import sys
from pathlib import Path

import click

from churn_assets.config import REPO_ROOT, ConfigError, Settings, load_settings

__all__ = ["retrain", "rollout"]


def _load(ctx: click.Context) -> Settings:
    try:
        return load_settings(ctx.ensure_object(dict).get("config_path"))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.option(
    "--reason",
    default="manual",
    show_default=True,
    help="Recorded as the run's churn/retraining_reason tag.",
)
@click.pass_context
def retrain(ctx: click.Context, reason: str) -> None:
    """Launch the Dagster retraining_job now: training set, candidate, gates, registration as
    challenger and the start of its shadow rollout.

    The run is recorded in the platform's Dagster instance (data/dagster_home), so it shows in
    the Dagster UI beside the sensor-launched ones. It ignores retraining.enabled, which only
    stops the automatic triggers.
    """
    from churn_assets.cli import _dagster_env

    settings = _load(ctx)
    config_path = ctx.obj.get("config_path")
    env = _dagster_env(settings, Path(config_path) if config_path else None)
    tags = json.dumps({"churn/retraining_reason": reason})
    dagster_bin = str(Path(sys.executable).with_name("dagster"))
    command = [
        dagster_bin,
        "job",
        "execute",
        "-m",
        "churn_assets.definitions",
        "-j",
        "retraining_job",
        "--tags",
        tags,
    ]
    click.echo(f"launching retraining_job ({reason})")
    done = subprocess.run(command, env=env, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise click.ClickException(
            f"the retraining run failed (exit code {done.returncode}); a blocked quality gate, "
            "too little data or an unreachable deployment target shows in its log above"
        )
    click.echo("retraining_job succeeded; `churn rollout status` shows the challenger's rollout")


@click.group()
def rollout() -> None:
    """Inspect the automatic rollout (shadow, canary, promote or roll back)."""


@rollout.command("status")
@click.option("--last", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print the state and decisions as JSON.")
@click.pass_context
def rollout_status(ctx: click.Context, last: int, as_json: bool) -> None:
    """The rollout's phase and its last decisions with their reasons (from the read models)."""
    from churn_assets.rollout_control import AUDIT_TABLE, read_rollout_state
    from churn_assets.warehouse import ReadModelMissing, load_read_model

    settings = _load(ctx)
    state = read_rollout_state(settings.read_models_dir)
    if state is None:
        raise click.ClickException(
            "no rollout decision recorded yet: the rollout_decision asset publishes its state "
            "after the first retraining_job or rollout_job run"
        )
    try:
        decisions = load_read_model(settings.read_models_dir, AUDIT_TABLE).tail(last)
    except ReadModelMissing as exc:
        raise click.ClickException(str(exc)) from None
    rows = [
        {
            "decided_at": row.decided_at.isoformat(),
            "action": row.action,
            "phase": f"{row.phase_from} -> {row.phase_to}",
            "challenger": row.challenger,
            "traffic": row.traffic,
            "reasons": json.loads(row.reasons),
        }
        for row in decisions.itertuples()
    ]
    if as_json:
        public = {k: v for k, v in state.items() if k != "history"}
        click.echo(json.dumps({"state": public, "decisions": rows}, indent=1, default=str))
        return
    click.echo(
        f"phase {state['phase']}: champion {state['champion']}, "
        f"challenger {state.get('challenger') or 'none'} (updated {state.get('updated_at')})"
    )
    for row in rows:
        click.echo(
            f"{row['decided_at']}  {row['action']:<12} {row['phase']:<28} "
            f"challenger {row['challenger'] or '-'} at {row['traffic']:.0%}"
        )
        for reason in row["reasons"]:
            click.echo(f"    - {reason}")
