"""The ``churn`` command line: broker, topics, simulator, landing, status and the whole platform."""

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from churn_assets.cli_common import embedded_broker, fail, settings_of

__all__ = ["main"]


_settings = settings_of
_fail = fail


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default: $CHURN_CONFIG or config/config.yaml).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, verbose: bool) -> None:
    """churn-platform: a churn scoring platform on Kafka, DuckDB, Dagster and Seldon."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


# -- broker ----------------------------------------------------------------------------------------


@main.group()
def broker() -> None:
    """Start, stop and inspect the embedded Kafka-compatible broker (Tansu)."""


_embedded = embedded_broker


@broker.command("start")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port to listen on (default: kafka.embedded.port; 0 picks a free one).",
)
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C stops the broker.")
@click.pass_context
def broker_start(ctx: click.Context, port: int | None, foreground: bool) -> None:
    """Start the embedded broker (idempotent) and wait until it answers."""
    from churn_assets.broker import BrokerError

    settings = _settings(ctx)
    embedded = _embedded(settings, port)
    try:
        state = embedded.start(tie_to_parent=foreground)
    except BrokerError as exc:
        raise _fail(exc) from None
    click.echo(f"broker ready on {state.bootstrap_servers} (pid {state.pid})")
    if foreground:
        _wait_for_interrupt()
        embedded.stop()
        click.echo("broker stopped")


@broker.command("stop")
@click.pass_context
def broker_stop(ctx: click.Context) -> None:
    """Stop the embedded broker. Its in-memory topics are lost; landed data is not."""
    stopped = _embedded(_settings(ctx)).stop()
    click.echo(f"broker (pid {stopped.pid}) stopped" if stopped else "no broker was running")


def _wait_for_interrupt() -> None:
    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


# -- topics ----------------------------------------------------------------------------------------


@main.group()
def topics() -> None:
    """Create and list the platform's Kafka topics."""


@topics.command("create")
@click.pass_context
def topics_create(ctx: click.Context) -> None:
    """Create every platform topic that is missing, with kafka.partitions partitions."""
    from churn_assets.kafka import ensure_topics

    settings = _settings(ctx)
    try:
        result = ensure_topics(settings)
    except Exception as exc:
        raise _fail(exc) from None
    for topic, outcome in result.items():
        click.echo(f"{topic:22} {outcome}")


# -- simulator -------------------------------------------------------------------------------------


@main.command()
@click.option("--customers", type=click.IntRange(1), default=None, help="Initial customer base.")
@click.option("--days", type=click.IntRange(1), default=None, help="Simulated days.")
@click.option("--seed", type=int, default=None, help="Random seed (same seed, same events).")
@click.option(
    "--scenario",
    type=click.Choice(["none", "covariate_drift", "concept_drift", "outlier_burst"]),
    default=None,
    help="Drift or outlier scenario.",
)
@click.option(
    "--scenario-start-day",
    type=click.IntRange(0),
    default=None,
    help="Simulated day the scenario switches on.",
)
@click.option(
    "--rate",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Cap on events per second (0 = as fast as the broker takes them).",
)
@click.pass_context
def simulate(ctx: click.Context, **options: Any) -> None:
    """Produce a simulated customer base to churn.customers and outcomes to ml.feedback."""
    from churn_assets.cli_up import produce_demo, simulation_config, simulator_refusal

    settings = _settings(ctx)
    if (refusal := simulator_refusal(settings)) is not None:
        raise click.ClickException(f"cannot simulate: {refusal}")
    config = simulation_config(
        settings,
        seed=options["seed"],
        customers=options["customers"],
        days=options["days"],
        scenario=options["scenario"],
        scenario_start_day=options["scenario_start_day"],
    )
    try:
        produce_demo(settings, config, rate=options["rate"])
    except Exception as exc:
        raise _fail(exc) from None


# -- landing ---------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--topic",
    "topic_names",
    multiple=True,
    type=click.Choice(["churn.customers", "ml.predictions", "ml.feedback"]),
    help="Topic to land (repeatable; default: all data topics).",
)
@click.option(
    "--max-messages",
    type=click.IntRange(1),
    default=None,
    help="Stop after this many messages (default: drain to the end).",
)
@click.pass_context
def land(ctx: click.Context, topic_names: tuple[str, ...], max_messages: int | None) -> None:
    """Land data topics into the DuckDB warehouse (what the Dagster landing assets run).

    Do not run this while Dagster landing runs are active: DuckDB allows one writer per file.
    """
    from churn_assets.landing import Lander
    from churn_assets.schemas import DATA_TOPICS

    settings = _settings(ctx)
    for topic in topic_names or DATA_TOPICS:

        def progress(report, topic=topic) -> None:
            click.echo(
                f"  {topic}: batch {report.batches}, {report.rows_landed} rows landed, "
                f"{report.dead_lettered} dead-lettered, {report.replayed} replayed",
                err=True,
            )

        try:
            report = Lander(settings, topic, on_batch=progress, max_messages=max_messages).run()
            counts = report.published
        except Exception as exc:
            raise _fail(exc) from None
        click.echo(
            f"{topic}: landed {report.rows_landed}, dead-lettered {report.dead_lettered}, "
            f"replayed (already landed, not inserted) {report.replayed} in "
            f"{report.batches} batches ({report.duration_s:.1f}s); "
            f"offsets {report.describe_ranges()}; "
            f"table now {counts[next(iter(counts))]} rows"
        )
        if report.dead_letters_pending:
            click.echo(
                f"  {report.dead_letters_pending} dead letters not yet confirmed on "
                "churn.dead-letter; the next landing run publishes them again",
                err=True,
            )


# -- status ----------------------------------------------------------------------------------------


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Broker, topics with message counts, landed row counts, replays, dead letters and stored
    offsets."""
    import duckdb

    from churn_assets.broker import read_state
    from churn_assets.kafka import scan_topic
    from churn_assets.schemas import ALL_TOPICS
    from churn_assets.warehouse import (
        LANDING_TABLES,
        read_model_path,
        read_model_rows,
        read_model_table,
    )

    settings = _settings(ctx)
    if settings.kafka.uses_embedded_broker:
        state = read_state(settings.run_dir)
        broker_up = state is not None
        click.echo(
            f"broker: embedded, {'running on ' + state.bootstrap_servers if state else 'stopped'}"
        )
    else:
        broker_up = True
        click.echo(f"broker: external, {settings.kafka.bootstrap_servers}")
    if broker_up:
        click.echo("topics (messages per partition):")
        for topic in ALL_TOPICS:
            try:
                extents = scan_topic(settings, topic)
            except Exception as exc:
                click.echo(f"  {topic:22} unavailable: {exc}")
                continue
            parts = " ".join(f"p{e.partition}={e.messages}" for e in extents)
            click.echo(f"  {topic:22} {sum(e.messages for e in extents):>9}  {parts}")
    read_models = settings.read_models_dir
    click.echo(f"landed (published read models in {read_models}):")
    # Each read model is read through one open file (read_model_table / read_model_rows), so a
    # version published meanwhile by a running platform is never half-read.
    con = duckdb.connect()
    try:
        # Valid messages whose own id had landed already (a re-produced message, or the same
        # message in a restarted broker's new log), summed over the log epochs.
        replayed: dict[str, int] = {}
        if read_model_path(read_models, "landing_replays").exists():
            con.register(
                "replays", read_model_table(read_models, "landing_replays", ["topic", "replayed"])
            )
            replayed = {
                topic: int(count)
                for topic, count in con.execute(
                    "SELECT topic, sum(replayed) FROM replays GROUP BY topic"
                ).fetchall()
            }
        for topic, table in LANDING_TABLES.items():
            if read_model_path(read_models, table).exists():
                click.echo(
                    f"  {table:24} {read_model_rows(read_models, table):>9} rows, "
                    f"replayed (not inserted): {replayed.get(topic, 0)}"
                )
            else:
                click.echo(f"  {table:24} not landed yet")
        if read_model_path(read_models, "dead_letters").exists():
            dlq = read_model_table(read_models, "dead_letters")
            con.register("dlq", dlq)
            # Published before the outbox: every dead letter counts as unconfirmed.
            unconfirmed = "published_at IS NULL" if "published_at" in dlq.column_names else "true"
            total, pending = con.execute(
                f"SELECT count(*), count(*) FILTER (WHERE {unconfirmed}) FROM dlq"
            ).fetchall()[0]
            click.echo(
                f"  {'dead_letters':24} {total:>9} rows, "
                f"not yet confirmed on churn.dead-letter: {pending}"
            )
        if read_model_path(read_models, "landing_offsets").exists():
            con.register("offsets", read_model_table(read_models, "landing_offsets"))
            click.echo("last landed offsets (next offset to read):")
            for topic, partition, next_offset, updated in con.execute(
                "SELECT topic, kafka_partition, next_offset, updated_at FROM offsets "
                "ORDER BY topic, kafka_partition"
            ).fetchall():
                click.echo(f"  {topic:22} p{partition}: {next_offset} (at {updated})")
    finally:
        con.close()


# -- serving -----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--http-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="REST port (default: serving.http_port).",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="gRPC port (default: serving.grpc_port).",
)
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="CHURN_MODEL_DIR",
    default=None,
    help="Serve only this version folder (manifest.json + artefacts, as `churn models export` "
    "writes it and Seldon Core v1 mounts it at /mnt/models) as the champion, instead of the "
    "registry; its version must equal $CHURN_MODEL_VERSION when that is set. "
    "Env: CHURN_MODEL_DIR.",
)
@click.pass_context
def serve(
    ctx: click.Context, http_port: int | None, grpc_port: int | None, model_dir: Path | None
) -> None:
    """Serve the registered models: V2 REST + gRPC (MLServer), router, explanations, metrics.

    Admin endpoints need CHURN_ADMIN_TOKEN in the environment. Ctrl-C stops the server.
    """
    from churn_assets.config import load_settings
    from churn_assets.registry import RegistryError
    from serving.errors import ServingError
    from serving.server import run

    settings = _settings(ctx)
    overrides: dict[str, dict[str, Any]] = {}
    ports = {k: v for k, v in {"http_port": http_port, "grpc_port": grpc_port}.items() if v}
    if ports:
        overrides["serving"] = ports
    if model_dir is not None:
        from serving.standalone import model_dir_overrides

        expected = os.environ.get("CHURN_MODEL_VERSION") or None
        try:
            overrides |= model_dir_overrides(settings, model_dir, expected)
        except RegistryError as exc:
            raise _fail(exc) from None
    if overrides:
        settings = load_settings(ctx.obj["config_path"], **overrides)
    try:
        run(settings)
    except ServingError as exc:
        raise _fail(exc) from None


@main.command()
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Port (default: dashboard.port)."
)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.pass_context
def dashboard(ctx: click.Context, port: int | None, address: str) -> None:
    """Serve the Panel dashboard (`panel serve dashboards/app.py`); Ctrl-C stops it.

    Its admin buttons use CHURN_ADMIN_TOKEN from the environment (the serving process's token).
    """
    from dashboards.serve import panel_command

    settings = _settings(ctx)
    command = panel_command(port or settings.dashboard.port, address)
    env = dict(os.environ)
    if ctx.obj["config_path"] is not None:
        env["CHURN_CONFIG"] = str(Path(ctx.obj["config_path"]).resolve())
    click.echo(f"dashboard on http://{address}:{port or settings.dashboard.port}/app")
    sys.stdout.flush()
    os.execve(command[0], command, env)


def _register_subcommands() -> None:
    from churn_assets.cli_import import import_export
    from churn_assets.cli_models import models
    from churn_assets.cli_rollout import retrain, rollout, traffic
    from churn_assets.cli_up import up

    main.add_command(up)
    main.add_command(models)
    main.add_command(retrain)
    main.add_command(rollout)
    main.add_command(traffic)
    main.add_command(import_export)


_register_subcommands()


if __name__ == "__main__":
    main()
