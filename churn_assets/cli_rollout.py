"""``churn retrain`` (the manual retraining trigger), ``churn rollout`` (its progress) and
``churn traffic`` (demo traffic for the shadow and canary analyses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from churn_assets.config import REPO_ROOT, ConfigError, Settings, load_settings

__all__ = ["retrain", "rollout", "traffic"]


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
    from churn_assets.cli_up import dagster_env

    settings = _load(ctx)
    if settings.rollout.target == "local" and not os.environ.get("CHURN_ADMIN_TOKEN"):
        raise click.ClickException(
            "CHURN_ADMIN_TOKEN is not set: the retraining job ends by putting the challenger in "
            "shadow through the serving admin API, which needs the token the platform serves "
            "with (start ./scripts/run.sh with CHURN_ADMIN_TOKEN set, and export the same "
            "value here), or launch retraining_job from the Dagster UI's launchpad"
        )
    config_path = ctx.obj.get("config_path")
    env = dagster_env(settings, Path(config_path) if config_path else None)
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
    from churn_assets.registry import ModelRegistry
    from churn_assets.rollout_control import AUDIT_TABLE, active_challenger, read_rollout_state
    from churn_assets.warehouse import ReadModelMissing, load_read_model

    settings = _load(ctx)
    state = read_rollout_state(settings.read_models_dir)
    aliases = ModelRegistry(settings.registry_dir).aliases()
    pending = active_challenger(state, aliases)
    if pending is not None and state is not None and state.get("challenger") == pending:
        pending = None  # the challenger of the recorded rollout: not pending, in progress
    pending_state = {
        "phase": "pending",
        "champion": aliases.get("champion"),
        "challenger": pending,
    }
    pending_line = (
        f"phase pending: challenger {pending} is registered and waits for its first rollout "
        f"decision (champion {aliases.get('champion')}); the rollout_sensor starts its shadow "
        "once Dagster runs (`churn up`)"
    )
    if state is None:
        if pending is None:
            raise click.ClickException(
                "no rollout yet: no challenger is registered and no rollout decision was "
                f"recorded (champion {aliases.get('champion') or 'none'}); `churn retrain` "
                "trains a challenger and starts its rollout"
            )
        if as_json:
            click.echo(json.dumps({"state": pending_state, "decisions": []}, indent=1))
        else:
            click.echo(pending_line)
        return
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
        if pending is not None:
            public = pending_state | {"previous": public}
        click.echo(json.dumps({"state": public, "decisions": rows}, indent=1, default=str))
        return
    if pending is not None:
        click.echo(pending_line)
        click.echo(f"before it: phase {state['phase']} (updated {state.get('updated_at')})")
    else:
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


@click.command()
@click.option(
    "--requests", "count", default=1000, show_default=True, type=click.IntRange(1, 10_000_000)
)
@click.option(
    "--rate",
    default=100.0,
    show_default=True,
    type=click.FloatRange(min=0.1, max=100_000),
    help="Scored customers per second.",
)
@click.option(
    "--batch", default=20, show_default=True, type=click.IntRange(1, 1000), help="Per request."
)
@click.option("--seed", default=0, show_default=True, help="Seeds the choice of customers.")
@click.pass_context
def traffic(ctx: click.Context, count: int, rate: float, batch: int, seed: int) -> None:
    """Replay landed customers through the serving API (POST /predict/batch) at a steady rate.

    Demo traffic for the shadow and canary analyses, the mirror and the dashboard: each
    customer's latest landed features (read model landed_customer_events) that the champion's
    feature contract names, customers picked at random with SEED. Sticky canary routing keys on
    the customer id, as for real callers.
    """
    import time

    import numpy as np
    import requests as http

    from churn_assets.model import load_model
    from churn_assets.registry import ModelRegistry, RegistryError
    from churn_assets.rollout_control import serving_url
    from churn_assets.warehouse import ReadModelMissing, load_read_model

    settings = _load(ctx)
    try:
        events = load_read_model(settings.read_models_dir, "landed_customer_events")
    except ReadModelMissing as exc:
        raise click.ClickException(str(exc)) from None
    if events.empty:
        raise click.ClickException("no landed customer events to replay; run `churn simulate`")
    try:
        champion = load_model(ModelRegistry(settings.registry_dir), "champion")
    except RegistryError as exc:
        raise click.ClickException(f"no champion to send traffic to: {exc}") from None
    names = list(champion.contract.names)
    lacking = [name for name in names if name not in events.columns]
    if lacking:
        raise click.ClickException(
            f"the landed customer events have no column for the champion's features {lacking}; "
            "land churn.customers with the champion's feature contract first"
        )
    latest = events.sort_values("event_time").groupby("customer_id").tail(1)
    records = latest[["customer_id", *names]].to_dict("records")
    rng = np.random.default_rng(seed)
    url = f"{serving_url(settings)}/predict/batch"
    started = time.monotonic()
    sent = 0
    arms: dict[str, int] = {}
    with click.progressbar(length=count, label=f"scoring via {url}") as bar:
        while sent < count:
            size = min(batch, count - sent)
            picks = rng.integers(0, len(records), size=size)
            instances = [{k: _plain(v) for k, v in records[i].items()} for i in picks]
            try:
                response = http.post(url, json={"instances": instances}, timeout=30)
            except http.RequestException as exc:
                raise click.ClickException(f"POST {url} failed: {exc}") from None
            if response.status_code != 200:
                raise click.ClickException(
                    f"POST {url} answered HTTP {response.status_code}: {response.text[:300]}"
                )
            for prediction in response.json()["predictions"]:
                key = f"{prediction['model_version']}/{prediction['arm']}"
                arms[key] = arms.get(key, 0) + 1
            sent += size
            bar.update(size)
            pause = sent / rate - (time.monotonic() - started)
            if pause > 0:
                time.sleep(pause)
    elapsed = time.monotonic() - started
    answered = ", ".join(f"{k}: {v}" for k, v in sorted(arms.items()))
    click.echo(f"{sent} customers scored in {elapsed:.1f} s ({answered})")


def _plain(value: object) -> object:
    """A JSON value for a landed cell: NumPy scalars as Python ones, a missing value (a feature
    landed before the contract had it) as null."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    item = getattr(value, "item", None)
    plain = item() if callable(item) else value
    return None if isinstance(plain, float) and plain != plain else plain
