"""The ``churn`` command line: broker, topics, simulator, landing, status and the whole platform."""

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from churn_assets.config import REPO_ROOT, ConfigError, Settings, load_settings

__all__ = ["main"]


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.obj.get("settings")
    if settings is None:
        try:
            settings = load_settings(ctx.obj["config_path"])
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        ctx.obj["settings"] = settings
    return settings


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


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


def _embedded(settings: Settings, port: int | None = None):
    from churn_assets.broker import EmbeddedBroker

    if not settings.kafka.uses_embedded_broker:
        raise click.ClickException(
            f"kafka.bootstrap_servers is set ({settings.kafka.bootstrap_servers}); the embedded "
            "broker is only used when it is null"
        )
    embedded = settings.kafka.embedded
    return EmbeddedBroker(
        settings.run_dir,
        port=embedded.port if port is None else port,
        startup_timeout_s=embedded.startup_timeout_s,
    )


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
    from churn_assets.kafka import ensure_topics, make_producer
    from churn_assets.simulator import SimulationConfig, Simulator, produce_simulation

    settings = _settings(ctx)
    defaults = settings.simulator
    config = SimulationConfig(
        seed=defaults.seed if options["seed"] is None else options["seed"],
        customers=options["customers"] or defaults.customers,
        days=options["days"] or defaults.days,
        start_date=defaults.start_date,
        scenario=options["scenario"] or defaults.scenario,
        scenario_start_day=defaults.scenario_start_day
        if options["scenario_start_day"] is None
        else options["scenario_start_day"],
    )
    try:
        ensure_topics(settings)
        producer = make_producer(settings)
    except Exception as exc:
        raise _fail(exc) from None
    started = time.monotonic()
    with click.progressbar(length=config.days, label="simulating days", file=sys.stderr) as bar:
        summary = produce_simulation(
            producer, Simulator(config), rate=options["rate"], on_day=lambda _d, _n: bar.update(1)
        )
    elapsed = time.monotonic() - started
    total = summary.customer_events + summary.feedback_events
    click.echo(
        f"produced {summary.customer_events} customer events and {summary.feedback_events} "
        f"outcomes ({summary.churned} churned) in {elapsed:.1f}s "
        f"({total / elapsed:,.0f} events/s); "
        f"scenario={config.scenario}; best achievable 30-day AUC={summary.best_auc_30d:.3f}"
    )


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
                f"{report.dead_lettered} dead-lettered",
                err=True,
            )

        try:
            report = Lander(settings, topic, on_batch=progress, max_messages=max_messages).run()
            counts = report.published
        except Exception as exc:
            raise _fail(exc) from None
        click.echo(
            f"{topic}: landed {report.rows_landed}, dead-lettered {report.dead_lettered} in "
            f"{report.batches} batches ({report.duration_s:.1f}s); "
            f"offsets {report.describe_ranges()}; "
            f"table now {counts[next(iter(counts))]} rows"
        )


# -- status ----------------------------------------------------------------------------------------


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Broker, topics with message counts, landed row counts and stored offsets."""
    import duckdb

    from churn_assets.broker import read_state
    from churn_assets.kafka import scan_topic
    from churn_assets.schemas import ALL_TOPICS
    from churn_assets.warehouse import LANDING_TABLES, read_model_path

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
    con = duckdb.connect()
    try:
        for table in LANDING_TABLES.values():
            path = read_model_path(read_models, table)
            if path.exists():
                rows = con.execute("SELECT count(*) FROM read_parquet(?)", [str(path)]).fetchall()[
                    0
                ]
                click.echo(f"  {table:24} {rows[0] if rows else 0:>9} rows")
            else:
                click.echo(f"  {table:24} not landed yet")
        dlq = read_model_path(read_models, "dead_letters")
        if dlq.exists():
            rows = con.execute("SELECT count(*) FROM read_parquet(?)", [str(dlq)]).fetchall()[0]
            click.echo(f"  {'dead_letters':24} {rows[0] if rows else 0:>9} rows")
        offsets = read_model_path(read_models, "landing_offsets")
        if offsets.exists():
            click.echo("last landed offsets (next offset to read):")
            for topic, partition, next_offset, updated in con.execute(
                "SELECT topic, kafka_partition, next_offset, updated_at FROM read_parquet(?) "
                "ORDER BY topic, kafka_partition",
                [str(offsets)],
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


# -- the whole platform ----------------------------------------------------------------------------


def _dagster_home(settings: Settings) -> Path:
    home = settings.data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "config" / "dagster.yaml", home / "dagster.yaml")
    return home


def _dagster_env(settings: Settings, config_path: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(_dagster_home(settings))
    if config_path is not None:
        env["CHURN_CONFIG"] = str(config_path.resolve())
    return env


@main.command()
@click.option(
    "--simulate/--no-simulate",
    default=True,
    show_default=True,
    help="Produce the simulator's demo data first.",
)
@click.option(
    "--train/--no-train",
    default=True,
    show_default=True,
    help="Train, gate and register a model after landing (Dagster training_job).",
)
@click.option(
    "--serve/--no-serve",
    default=True,
    show_default=True,
    help=(
        "Then run serving (if a model was trained), the dashboard and Dagster (UI and daemon) "
        "until Ctrl-C (off: land, train and exit)."
    ),
)
@click.pass_context
def up(ctx: click.Context, simulate: bool, train: bool, serve: bool) -> None:
    """Run the platform on its embedded defaults: broker, topics, demo data, landing, a trained
    and registered model, then serving, the Panel dashboard and Dagster (UI and daemon).

    Serving starts only when this command trained a model (not with --no-train). Ctrl-C stops
    everything this command started, the broker included. With --no-serve the command lands
    (and trains) and exits, leaving the broker running (`churn broker stop` ends it).
    """
    settings = _settings(ctx)
    started_broker = False
    if settings.kafka.uses_embedded_broker:
        from churn_assets.broker import BrokerError, read_state

        started_broker = read_state(settings.run_dir) is None
        try:
            state = _embedded(settings).start()
        except BrokerError as exc:
            raise _fail(exc) from None
        click.echo(f"[1/5] broker ready on {state.bootstrap_servers}")
    keep_broker = False
    try:
        _run_platform(ctx, settings, simulate=simulate, train=train, serve=serve)
        keep_broker = not serve
    finally:
        if started_broker and not keep_broker:
            _embedded(settings).stop()
            click.echo("broker stopped")


def _run_platform(
    ctx: click.Context, settings: Settings, *, simulate: bool, train: bool, serve: bool
) -> None:
    ctx.invoke(topics_create)
    click.echo("[2/5] topics ready")
    if simulate:
        ctx.invoke(simulate_cmd)
    click.echo("[3/5] landing the data topics through Dagster")
    env = _dagster_env(settings, ctx.obj["config_path"])
    if not env.get("CHURN_ADMIN_TOKEN"):
        # The closed loop (rollout_decision -> serving admin API) needs a shared admin token;
        # without one from the environment, the children share a random one for this session.
        env["CHURN_ADMIN_TOKEN"] = secrets.token_urlsafe(32)
        click.echo(
            "CHURN_ADMIN_TOKEN is not set: serving, Dagster and the dashboard share a random "
            "admin token for this session (set it yourself to call the admin API directly)"
        )
    dagster_bin = str(Path(sys.executable).with_name("dagster"))
    landing = subprocess.run(
        [
            dagster_bin,
            "asset",
            "materialize",
            "-m",
            "churn_assets.definitions",
            "--select",
            "group:landing",
        ],
        env=env,
        cwd=REPO_ROOT,
    )
    if landing.returncode != 0:
        raise click.ClickException(
            f"the Dagster landing run failed (exit code {landing.returncode}); see its log above"
        )
    ctx.invoke(status)
    if train:
        click.echo("[4/5] training, gating and registering a model (Dagster training_job)")
        training = subprocess.run(
            [dagster_bin, "job", "execute", "-m", "churn_assets.definitions", "-j", "training_job"],
            env=env,
            cwd=REPO_ROOT,
        )
        if training.returncode != 0:
            raise click.ClickException(
                f"the Dagster training run failed (exit code {training.returncode}); a blocked "
                "quality gate or too little data shows in its log above"
            )
        ctx.invoke(models_list)
    if not serve:
        return
    children: list[subprocess.Popen[bytes]] = []
    try:
        if train:
            serving = settings.serving
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "churn_assets.cli", *_config_args(ctx), "serve"],
                    env=env,
                    cwd=REPO_ROOT,
                    start_new_session=True,
                )
            )
            click.echo(
                f"[5/5] serving: http://{serving.host}:{serving.http_port} (REST, /docs) and "
                f"{serving.host}:{serving.grpc_port} (gRPC)"
            )
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "churn_assets.cli", *_config_args(ctx), "dashboard"],
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        )
        click.echo(f"[5/5] dashboard: http://127.0.0.1:{settings.dashboard.port}/app")
        port = settings.dagster.webserver_port
        children.append(
            subprocess.Popen(
                [
                    dagster_bin,
                    "dev",
                    "-w",
                    str(REPO_ROOT / "workspace.yaml"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                ],
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        )
        click.echo(f"[5/5] Dagster UI on http://127.0.0.1:{port} (Ctrl-C stops the platform)")
        _wait_for_interrupt_or_exit(children)
    finally:
        for child in children:
            _stop_group(child)


def _config_args(ctx: click.Context) -> list[str]:
    path = ctx.obj["config_path"]
    return ["--config", str(Path(path).resolve())] if path is not None else []


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL whatever of the group is left
    (a leader can exit while its own children are still shutting down)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _wait_for_interrupt_or_exit(processes: list[subprocess.Popen[bytes]]) -> None:
    """Block until Ctrl-C/SIGTERM, or until one of ``processes`` exits on its own."""

    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
    exited = next(p for p in processes if p.poll() is not None)
    raise click.ClickException(
        f"{' '.join(map(str, exited.args[:4]))} exited with code {exited.returncode}; "
        "stopping the platform"
    )


simulate_cmd = simulate


def _register_subcommands() -> None:
    from churn_assets.cli_models import models
    from churn_assets.cli_rollout import retrain, rollout, traffic

    main.add_command(models)
    main.add_command(retrain)
    main.add_command(rollout)
    main.add_command(traffic)


_register_subcommands()
models_list = main.commands["models"].commands["list"]


if __name__ == "__main__":
    main()
