"""``churn up``: the whole platform on its embedded defaults, and safe to run again.

A start does the README's eight steps. On a data directory that already holds the work, it does
not redo it: the simulation is produced only when the warehouse does not hold it yet (a marker
written after its landing, checked against the landed read models), training is skipped when a
registered version was trained on exactly the landed data (same ``data_fingerprint``) or while a
rollout is pending or in progress, and serving always starts from the registry's champion and
challenger, so a rollout resumes where its last decision left it. Every skipped step says why in
one line; every service's URL is printed only once it answers; Ctrl-C or SIGTERM stops
everything this command started.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from churn_assets.cli_common import embedded_broker, fail, settings_of
from churn_assets.config import REPO_ROOT, Settings

__all__ = ["dagster_env", "produce_demo", "simulation_config", "simulator_refusal", "up"]

log = logging.getLogger(__name__)

STEPS = 8
SIMULATION_MARKER = "simulation.json"
# How long each service may take to answer after it was started (2-core machines are slow).
READY_TIMEOUT_S = {"serving": 240.0, "dagster": 300.0, "dashboard": 180.0}
# Stopping: children get SIGTERM (Dagster runs SIGINT, which they record as a cancelled run)
# and this long to exit before SIGKILL; the broker is stopped after them.
STOP_GRACE_S = 6.0
# What a stopped leader leaves in its group (a run worker) gets this long after SIGTERM.
LEFTOVER_GRACE_S = 2.0
# At a stop, messages that arrived after the sensor's last landing run are landed before the
# in-memory broker goes; this bounds how long that may take.
FINAL_LANDING_S = 3.0
# The churn process never turns these into tracebacks: a stop request is a normal end.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LOCK_FILE = "up.lock"


class StopRequested(BaseException):
    """Ctrl-C, SIGTERM or SIGHUP arrived; everything started so far is stopped, then the command
    ends. A BaseException, like KeyboardInterrupt, so no ``except Exception`` on the way (a
    status query, a broker probe) can swallow it."""


def _step(number: int, text: str) -> None:
    click.echo(f"[{number}/{STEPS}] {text}")


# -- Dagster environment ---------------------------------------------------------------------------


def _instance(settings: Settings):
    """The platform's Dagster instance (its storage's schema-migration chatter kept quiet)."""
    import dagster as dg

    logging.getLogger("alembic").setLevel(logging.WARNING)
    return dg.DagsterInstance.from_config(str(_dagster_home(settings)))


def _dagster_home(settings: Settings) -> Path:
    home = settings.data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "config" / "dagster.yaml", home / "dagster.yaml")
    return home


def dagster_env(settings: Settings, config_path: Path | None) -> dict[str, str]:
    """The environment of the platform's Dagster processes: its instance (``DAGSTER_HOME`` under
    the data directory) and the config file."""
    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(_dagster_home(settings))
    if config_path is not None:
        env["CHURN_CONFIG"] = str(config_path.resolve())
    return env


# Runs a live Dagster would be executing (queued runs are the daemon's to launch).
ACTIVE_RUN_STATUSES = ("NOT_STARTED", "STARTING", "STARTED")


def _mark_runs(
    settings: Settings, statuses: Iterable[str], mark: Callable[[Any, Any], None]
) -> list[str]:
    """``mark(instance, run)`` for each of the platform's runs in ``statuses`` (names of
    ``DagsterRunStatus``); returns one line per run (``<job> run <id> (<status>)``)."""
    import dagster as dg

    wanted = [dg.DagsterRunStatus[name] for name in statuses]
    marked = []
    with _instance(settings) as instance:
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=wanted)):
            mark(instance, run)
            marked.append(f"{run.job_name} run {run.run_id[:8]} ({run.status.value})")
    return marked


def reap_interrupted_runs(settings: Settings) -> list[str]:
    """Mark the platform instance's runs that a stop or crash left "started" as canceled and
    free their concurrency-pool slots; returns one line per run.

    Called before this command starts any Dagster process, so no live process owns such a run.
    Left alone, a dead run keeps the ``duckdb_warehouse`` pool's only slot and looks "in
    flight" to the sensors, which would then never launch another rollout or retraining.
    Queued runs stay queued: the daemon launches them.
    """

    def cancel(instance: Any, run: Any) -> None:
        instance.report_run_canceled(
            run, message="interrupted by the platform's last stop; marked canceled by `churn up`"
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)

    return _mark_runs(settings, [*ACTIVE_RUN_STATUSES, "CANCELING"], cancel)


# -- demo data -------------------------------------------------------------------------------------


def simulator_refusal(settings: Settings) -> str | None:
    """Why the simulator cannot feed this platform (``None`` when it can): it speaks the
    default contract's features only."""
    from churn_assets.schemas import DEFAULT_CONTRACT

    if settings.contract.digest == DEFAULT_CONTRACT.digest:
        return None
    return (
        f"the simulator produces the default contract's features, and features.contract is "
        f"{settings.contract_path}; bring your data with `churn import` (docs/YOUR_DATA.md)"
    )


def simulation_config(settings: Settings, **overrides: Any):
    """The simulator's configuration: ``simulator.*`` with non-None ``overrides`` applied."""
    from churn_assets.simulator import SimulationConfig

    values = settings.simulator.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    return SimulationConfig(**values)


def produce_demo(settings: Settings, config: Any, *, rate: float = 0.0):
    """Produce one simulation to the broker with a progress bar; returns its summary."""
    from churn_assets.kafka import ensure_topics, make_producer
    from churn_assets.simulator import Simulator, produce_simulation

    ensure_topics(settings)
    producer = make_producer(settings)
    started = time.monotonic()
    with click.progressbar(length=config.days, label="simulating days", file=sys.stderr) as bar:
        summary = produce_simulation(
            producer, Simulator(config), rate=rate, on_day=lambda _d, _n: bar.update(1)
        )
    elapsed = time.monotonic() - started
    total = summary.customer_events + summary.feedback_events
    click.echo(
        f"produced {summary.customer_events} customer events and {summary.feedback_events} "
        f"outcomes ({summary.churned} churned) in {elapsed:.1f}s "
        f"({total / elapsed:,.0f} events/s); "
        f"scenario={config.scenario}; best achievable 30-day AUC={summary.best_auc_30d:.3f}"
    )
    return summary


@dataclass(frozen=True)
class SimulationRecord:
    """What ``simulation.json`` (in the data directory) says a landed simulation was."""

    config: dict[str, Any]
    id_prefix: str
    customer_events: int
    feedback_events: int
    landed_at: str


def _config_record(config: Any) -> dict[str, Any]:
    record = asdict(config)
    record["start_date"] = config.start_date.isoformat()
    return record


def _read_simulation_record(settings: Settings) -> SimulationRecord | None:
    path = settings.data_dir / SIMULATION_MARKER
    if not path.is_file():
        return None
    try:
        return SimulationRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise click.ClickException(
            f"{path} is corrupt ({exc}); delete it and `churn up` produces the simulation again "
            "(landing skips every message already landed)"
        ) from None


def _write_simulation_record(settings: Settings, config: Any, summary: Any) -> None:
    path = settings.data_dir / SIMULATION_MARKER
    record = SimulationRecord(
        config=_config_record(config),
        id_prefix=config.id_prefix,
        customer_events=summary.customer_events,
        feedback_events=summary.feedback_events,
        landed_at=datetime.now(UTC).isoformat(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    os.replace(tmp, path)


def _landed_ids(settings: Settings, table: str, prefix: str) -> int:
    """Distinct landed message ids ``<prefix><n>``, from the table's read model."""
    import duckdb

    from churn_assets.warehouse import read_model_path, read_model_table

    if not read_model_path(settings.read_models_dir, table).is_file():
        return 0
    con = duckdb.connect()
    try:
        con.register("ids", read_model_table(settings.read_models_dir, table, ["event_id"]))
        # Exactly this simulation's ids: the default base's prefix "ev-42-" must not count
        # another seed-42 simulation's "ev-42-<digest>-<n>".
        rows = con.execute(
            "SELECT count(DISTINCT event_id) FROM ids WHERE regexp_full_match(event_id, ?)",
            [re.escape(prefix) + r"[0-9]+"],
        ).fetchall()
    finally:
        con.close()
    return int(rows[0][0])


def simulation_landed(settings: Settings, config: Any) -> str | None:
    """Why the warehouse already holds this simulation (a one-line summary), or None."""
    record = _read_simulation_record(settings)
    if record is None or record.config != _config_record(config):
        return None
    events = _landed_ids(settings, "landed_customer_events", f"ev-{record.id_prefix}")
    outcomes = _landed_ids(settings, "landed_feedback", f"fb-{record.id_prefix}")
    if events < record.customer_events or outcomes < record.feedback_events:
        return None
    return (
        f"{record.customer_events:,} events and {record.feedback_events:,} outcomes of seed "
        f"{config.seed} ({config.customers:,} customers, {config.days} days, scenario "
        f"{config.scenario}), landed {record.landed_at[:19]}"
    )


def _landing_published(settings: Settings) -> bool:
    """Every landing read model is there. A warehouse of an earlier release lacks some (its
    landing runs published fewer), and a landing run migrates its tables and republishes them,
    so the first start after an upgrade lands even with nothing new on the topics."""
    from churn_assets.warehouse import LANDING_TABLES, read_model_path

    names = [*LANDING_TABLES.values(), "landing_offsets", "landing_replays", "dead_letters"]
    return all(read_model_path(settings.read_models_dir, name).is_file() for name in names)


def _unlanded_topics(settings: Settings) -> list[str]:
    """Data topics with messages past the landing group's committed offsets (what the landing
    sensor asks about): on a restarted embedded broker, none."""
    from churn_assets.kafka import has_new_data
    from churn_assets.schemas import DATA_TOPICS

    return [topic for topic in DATA_TOPICS if has_new_data(settings, topic)]


# -- training --------------------------------------------------------------------------------------


FINGERPRINT_CACHE = "landed_fingerprint.json"


def _landed_state(settings: Settings) -> dict[str, Any]:
    """What the training-set fingerprint depends on, cheaply: rows and the newest landing time
    of the landed events and outcomes (landing only ever adds rows), and the label settings."""
    import duckdb

    from churn_assets.registry import current_code_version
    from churn_assets.warehouse import read_model_path, read_model_table

    state: dict[str, Any] = {
        "training": settings.training.model_dump(
            include={"horizon_days", "snapshot_step_days", "label_grace_days"}
        ),
        # Another feature or label code builds another training set from the same rows.
        "code_version": current_code_version(),
    }
    con = duckdb.connect()
    try:
        for table in ("landed_customer_events", "landed_feedback"):
            if not read_model_path(settings.read_models_dir, table).is_file():
                return {}
            con.register("landed", read_model_table(settings.read_models_dir, table, ["landed_at"]))
            rows, newest = con.execute(
                "SELECT count(*), max(landed_at)::VARCHAR FROM landed"
            ).fetchall()[0]
            state[table] = [int(rows), newest]
    finally:
        con.close()
    return state


def _cached_fingerprint(settings: Settings, compute: Callable[[Settings], str]) -> str:
    """``compute(settings)``, reused while the landed data is unchanged (a restart with nothing
    new to land skips rebuilding the training set, a few seconds on the default data)."""
    path = settings.data_dir / FINGERPRINT_CACHE
    state = _landed_state(settings)
    if state and path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            cached = json.loads(path.read_text())
            if cached["landed"] == state:
                return str(cached["fingerprint"])
    fingerprint = compute(settings)
    _remember_fingerprint(settings, fingerprint, state)
    return fingerprint


def _remember_fingerprint(
    settings: Settings, fingerprint: str, state: dict[str, Any] | None = None
) -> None:
    state = _landed_state(settings) if state is None else state
    if not state:
        return
    path = settings.data_dir / FINGERPRINT_CACHE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"landed": state, "fingerprint": fingerprint}, indent=1))
    os.replace(tmp, path)


def training_skip_reason(settings: Settings) -> str | None:
    """Why start-up training would redo finished work or be refused, or None to train."""
    from churn_assets.candidate import landed_data_fingerprint
    from churn_assets.registry import ModelRegistry
    from churn_assets.rollout_control import read_rollout_state, rollout_in_progress
    from churn_assets.training import TrainingError
    from churn_assets.warehouse import ReadModelMissing

    rolling = rollout_in_progress(settings)
    if rolling is not None:
        state = read_rollout_state(settings.read_models_dir)
        if state is not None and state.get("challenger") == rolling:
            how = f"in progress (phase {state['phase']})"
        else:
            how = "pending (registered as challenger, no rollout decision yet)"
        return (
            f"a rollout of {rolling} is {how}; it continues once Dagster runs "
            "(`churn rollout status`), and a new challenger would replace the one being judged"
        )
    registry = ModelRegistry(settings.registry_dir)
    versions = registry.versions()
    if not versions:
        return None
    try:
        fingerprint = _cached_fingerprint(settings, landed_data_fingerprint)
    except (ReadModelMissing, TrainingError):
        return None  # training itself reports what is missing
    aliases = {version: alias for alias, version in registry.aliases().items()}
    for version in reversed(versions):
        if version.metadata.get("data_fingerprint") == fingerprint:
            role = f" ({aliases[version.version]})" if version.version in aliases else ""
            return (
                f"{version.version}{role} was trained on exactly this data (fingerprint "
                f"{fingerprint[:12]}); `churn retrain` trains again on purpose"
            )
    return None


# -- child processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise :class:`StopRequested` in the main thread while inside."""

    def _raise(signum: int, _frame: Any) -> None:
        _ignore_stop_signals()
        name = signal.Signals(signum).name
        click.echo(f"{name} received: stopping what this command started")
        raise StopRequested(name)

    previous = {sig: signal.signal(sig, _raise) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals() -> None:
    """Once stopping has begun, a second Ctrl-C must not cut the clean-up short."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _spawn(
    command: list[str], env: dict[str, str], log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """A child in its own session (a terminal's Ctrl-C reaches only `churn up`, which stops
    children in order) that the kernel stops if `churn up` dies without cleaning up; its output
    goes to ``log_path`` (appended) when given, else to this terminal."""
    from churn_assets.broker import die_with_parent

    with contextlib.ExitStack() as stack:
        output: dict[str, Any] = {}
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(log_path.open("ab"))
            log.write(f"--- started by churn up at {datetime.now(UTC).isoformat()} ---\n".encode())
            log.flush()
            output = {"stdout": log, "stderr": subprocess.STDOUT}
        return subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
            preexec_fn=die_with_parent,
            **output,
        )


def _tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a service's log, indented, for an error message."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "  (no log)"
    return "\n".join(f"  {line}" for line in text)


def cancel_runs_in_flight(settings: Settings) -> list[str]:
    """Mark the platform's started runs as canceling before Dagster is stopped, so an
    interrupted run is recorded as canceled by the stop, not as an unexpected failure, and the
    next start has nothing to reap. Queued runs stay queued for the next start."""

    def canceling(instance: Any, run: Any) -> None:
        instance.report_run_canceling(run, message="the platform is stopping (`churn up`)")

    return _mark_runs(settings, ACTIVE_RUN_STATUSES, canceling)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command(child: subprocess.Popen[bytes], words: int = 3) -> str:
    """The first ``words`` words of ``child``'s command line."""
    args = child.args
    listed = list(args) if isinstance(args, list | tuple) else [args]
    return " ".join(map(str, listed[:words]))


def stop_children(
    children: list[subprocess.Popen[bytes]],
    *,
    sig: int = signal.SIGTERM,
    grace_s: float = STOP_GRACE_S,
) -> None:
    """Stop children in order: ``sig`` to each leader (``dagster dev`` then shuts its webserver,
    daemon and code server down in order, which a signal to the whole group would race) and up
    to ``grace_s`` for them to exit; then SIGTERM to whatever a leader left in its group (a run
    worker of a run already marked canceled) and :data:`LEFTOVER_GRACE_S` for it; then SIGKILL.
    A leader that had to be killed is named; killed leftovers are only logged."""
    deadline = time.monotonic() + grace_s
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)
    while time.monotonic() < deadline and any(child.poll() is None for child in children):
        time.sleep(0.1)
    hung = [child for child in children if child.poll() is None]
    for child in children:
        if _group_alive(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
    leftovers_deadline = time.monotonic() + LEFTOVER_GRACE_S
    while time.monotonic() < leftovers_deadline and any(_group_alive(c.pid) for c in children):
        time.sleep(0.1)
    for child in children:
        if not _group_alive(child.pid):
            continue
        if child in hung:
            click.echo(
                f"{_command(child)} (pid {child.pid}) did not stop within {grace_s:.0f}s; killed"
            )
        else:
            log.info("killed what %s left running in its process group", _command(child, 1))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def _run_dagster(command: list[str], env: dict[str, str]) -> int:
    """A Dagster CLI run in the foreground; a stop request cancels it (SIGINT, which Dagster
    records as a cancelled run) before it propagates."""
    process = _spawn(command, env)
    try:
        return process.wait()
    except StopRequested:
        _ignore_stop_signals()
        stop_children([process], sig=signal.SIGINT)
        raise


# -- readiness -------------------------------------------------------------------------------------


def _http_ok(url: str, *, data: bytes | None = None, timeout_s: float = 3.0) -> bytes | None:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read() if response.status == 200 else None
    except (OSError, urllib.error.HTTPError, ValueError):
        return None


def _dagster_loaded(base: str) -> bool:
    """The webserver answers and every code location in its workspace has loaded."""
    query = json.dumps(
        {"query": "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"}
    ).encode()
    body = _http_ok(f"{base}/graphql", data=query)
    if body is None:
        return False
    try:
        entries = json.loads(body)["data"]["workspaceOrError"]["locationEntries"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(entries) and all(entry["loadStatus"] == "LOADED" for entry in entries)


@dataclass
class Service:
    step: int
    name: str
    process: subprocess.Popen[bytes]
    probe: Callable[[], bool]
    announce: str
    log: Path


def _await_ready(service: Service, others: list[Service]) -> None:
    """Block until ``service`` answers; a child that exits or a timeout is an error."""
    deadline = time.monotonic() + READY_TIMEOUT_S[service.name]
    while not service.probe():
        for candidate in (service, *others):
            code = candidate.process.poll()
            if code is not None:
                raise click.ClickException(
                    f"{candidate.name} exited with code {code} before it was ready; stopping "
                    f"the platform. The end of {candidate.log}:\n{_tail(candidate.log)}"
                )
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"{service.name} did not answer within {READY_TIMEOUT_S[service.name]:.0f}s; "
                f"stopping the platform. The end of {service.log}:\n{_tail(service.log)}"
            )
        time.sleep(0.5)
    _step(service.step, service.announce)


def _wait_until_stopped_or_exit(services: list[Service]) -> None:
    """Block until a stop request, or until a service exits on its own (an error)."""
    while True:
        for service in services:
            code = service.process.poll()
            if code is not None:
                raise click.ClickException(
                    f"{service.name} exited with code {code}; stopping the platform. The end "
                    f"of {service.log}:\n{_tail(service.log)}"
                )
        time.sleep(0.5)


# -- the command -----------------------------------------------------------------------------------


@click.command()
@click.option(
    "--simulate/--no-simulate",
    default=True,
    show_default=True,
    help="Produce the simulator's demo data, unless the warehouse already holds it.",
)
@click.option(
    "--train/--no-train",
    default=True,
    show_default=True,
    help="Train, gate and register a model after landing (Dagster training_job), unless a "
    "registered version was trained on the same data or a rollout is pending or in progress.",
)
@click.option(
    "--serve/--no-serve",
    default=True,
    show_default=True,
    help="Then run serving (when the registry has a champion), Dagster (UI and daemon) and the "
    "dashboard until Ctrl-C (off: land, train and exit, leaving the broker running).",
)
@click.pass_context
def up(ctx: click.Context, simulate: bool, train: bool, serve: bool) -> None:
    """Run the platform on its embedded defaults: broker, topics, demo data, landing, a trained
    and registered model, then serving, Dagster (UI and daemon) and the Panel dashboard.

    Safe to run again on the same data: finished work (the simulation, a model trained on the
    same data) is skipped with the reason, and serving starts from the registry's champion and
    challenger, so a rollout in progress continues. Each service's URL is printed once it
    answers, then a final "ready" line. Ctrl-C or SIGTERM stops everything this command
    started, the broker included. With --no-serve the command lands (and trains) and exits,
    leaving the broker running (`churn broker stop` ends it).
    """
    ctx.obj["started"] = time.monotonic()
    settings = settings_of(ctx)
    with _data_dir_lock(settings):
        _up(ctx, settings, simulate=simulate, train=train, serve=serve)


@contextlib.contextmanager
def _data_dir_lock(settings: Settings) -> Iterator[None]:
    """One `churn up` per data directory: a second one would reap the first one's live Dagster
    runs and fight over the warehouse and the ports."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    path = settings.run_dir / LOCK_FILE
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise click.ClickException(
                f"another `churn up` (pid {holder}) runs on this data directory "
                f"({settings.data_dir}); stop it first (Ctrl-C in its terminal), or point "
                "storage.data_dir at another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _up(
    ctx: click.Context, settings: Settings, *, simulate: bool, train: bool, serve: bool
) -> None:
    started_broker = False
    keep_broker = False
    try:
        with _stop_signals_raise():
            if settings.kafka.uses_embedded_broker:
                from churn_assets.broker import BrokerError, read_state

                started_broker = read_state(settings.run_dir) is None
                try:
                    # Serving: the broker dies with this command even if it is killed; without
                    # serving it is left running for more `churn` commands.
                    state = embedded_broker(settings).start(tie_to_parent=serve)
                except BrokerError as exc:
                    raise fail(exc) from None
                _step(1, f"broker ready on {state.bootstrap_servers}")
            else:
                _step(1, f"external broker {settings.kafka.bootstrap_servers}")
            _run_platform(ctx, settings, simulate=simulate, train=train, serve=serve)
            keep_broker = not serve
    except StopRequested:
        stopped_by_request = True
    else:
        stopped_by_request = False
    finally:
        _ignore_stop_signals()
        if started_broker and not keep_broker:
            if ctx.obj.get("services_started"):
                _land_the_rest(settings)
            embedded_broker(settings).stop(timeout_s=3.0)
            click.echo("broker stopped")
    if stopped_by_request:
        click.echo("stopped")
        if not ctx.obj.get("ready"):
            ctx.exit(130)  # interrupted before the platform was ready


def _land_the_rest(settings: Settings) -> None:
    """Before the in-memory broker goes: land what arrived after the landing sensor's last run
    (the last seconds of predictions and feedback), within :data:`FINAL_LANDING_S`. Dagster is
    stopped by now, so this process is the warehouse's only writer."""
    from churn_assets.landing import Lander

    try:
        topics = _unlanded_topics(settings)
        if not topics:
            return
        budget = settings.landing.model_copy(
            update={"drain_max_seconds": FINAL_LANDING_S / len(topics)}
        )
        quick = settings.model_copy(update={"landing": budget})
        for topic in topics:
            report = Lander(quick, topic).run()
            behind = "" if report.reached_eof else " (more was left: lost with the broker)"
            click.echo(
                f"landed {report.rows_landed} {topic} messages that arrived after the last "
                f"landing run{behind}"
            )
    except Exception as exc:  # the stop goes on; what was not landed is named
        click.echo(f"WARNING: landing the last messages before the broker stops failed: {exc}")


def _run_platform(
    ctx: click.Context, settings: Settings, *, simulate: bool, train: bool, serve: bool
) -> None:
    root = ctx.find_root().command
    assert isinstance(root, click.Group)
    ctx.invoke(root.commands["topics"].commands["create"])  # type: ignore[attr-defined]
    _step(2, "topics ready")
    produced = None
    config = simulation_config(settings)
    if not simulate:
        _step(3, "simulation skipped (--no-simulate)")
    elif (other := simulator_refusal(settings)) is not None:
        _step(3, f"simulation skipped: {other}")
    elif (held := simulation_landed(settings, config)) is not None:
        _step(3, f"simulation skipped: the warehouse already holds it ({held})")
    else:
        _step(3, f"simulating {config.customers:,} customers over {config.days} days")
        produced = produce_demo(settings, config)
    env = dagster_env(settings, ctx.obj["config_path"])
    if not env.get("CHURN_ADMIN_TOKEN"):
        # The closed loop (rollout_decision -> serving admin API) needs a shared admin token;
        # without one from the environment, the children share a random one for this session.
        env["CHURN_ADMIN_TOKEN"] = secrets.token_urlsafe(32)
        click.echo(
            "CHURN_ADMIN_TOKEN is not set: serving, Dagster and the dashboard share a random "
            "admin token for this session (set it yourself to call the admin API directly)"
        )
    dagster_bin = str(Path(sys.executable).with_name("dagster"))
    for run in reap_interrupted_runs(settings):
        click.echo(f"marked {run}, interrupted by the last stop, as canceled")
    if produced is None and not _unlanded_topics(settings) and _landing_published(settings):
        _step(
            4,
            "landing skipped: the data topics hold nothing past what is landed (the landing "
            "sensor lands what arrives from now on)",
        )
    else:
        _step(4, "landing the data topics through Dagster")
        code = _run_dagster(
            [dagster_bin, "asset", "materialize", "-m", "churn_assets.definitions"]
            + ["--select", "group:landing"],
            env,
        )
        if code != 0:
            raise click.ClickException(
                f"the Dagster landing run failed (exit code {code}); its error is in the log "
                "above. Batches commit all or nothing, so nothing is landed twice: after fixing "
                "the cause, `churn up` again produces the demo data again if it was not all "
                "landed, and messages already landed count as replays"
            )
    if produced is not None:
        _write_simulation_record(settings, config, produced)
    ctx.invoke(root.commands["status"])
    _train(ctx, settings, env, dagster_bin, train=train)
    if not serve:
        return
    _serve(ctx, settings, env, dagster_bin)


def _train(
    ctx: click.Context, settings: Settings, env: dict[str, str], dagster_bin: str, *, train: bool
) -> None:
    from churn_assets.registry import ModelRegistry

    root = ctx.find_root().command
    models_list = root.commands["models"].commands["list"]  # type: ignore[attr-defined]
    skip = "--no-train" if not train else training_skip_reason(settings)
    if skip is not None:
        _step(5, f"training skipped: {skip}")
        ctx.invoke(models_list)
        return
    _step(5, "training, gating and registering a model (Dagster training_job)")
    code = _run_dagster(
        [dagster_bin, "job", "execute", "-m", "churn_assets.definitions", "-j", "training_job"],
        env,
    )
    registry = ModelRegistry(settings.registry_dir)
    champion = registry.aliases().get("champion")
    if code == 0 and (versions := registry.versions()):
        # The run trained on exactly what is landed now (nothing else writes the warehouse
        # before Dagster starts): the next start need not rebuild the training set to know it.
        fingerprint = versions[-1].metadata.get("data_fingerprint")
        if fingerprint:
            _remember_fingerprint(settings, str(fingerprint))
    if code != 0:
        cause = (
            f"the Dagster training run failed (exit code {code}): the failed step and its error "
            "(a blocked quality gate names the gate and the figure) are in the log above"
        )
        if champion is None:
            raise click.ClickException(
                f"{cause}. No model is registered, so there is nothing to serve; fix the cause "
                "and run `churn up` again (too little data: a larger simulator.customers, e.g. "
                "CHURN_SIMULATOR__CUSTOMERS=20000 churn up)"
            )
        click.echo(f"WARNING: {cause}; serving continues with the registered champion {champion}")
    elif champion is None:
        click.echo(
            "training waited: nothing to train on has landed yet (the training_job's log says "
            "what it waits for); `churn simulate` or your producers, then `churn up` again"
        )
    ctx.invoke(models_list)


def _serve(ctx: click.Context, settings: Settings, env: dict[str, str], dagster_bin: str) -> None:
    from churn_assets.registry import ModelRegistry
    from churn_assets.rollout_control import serving_url
    from dashboards.serve import panel_command

    cli = [sys.executable, "-m", "churn_assets.cli", *_config_args(ctx)]
    champion = ModelRegistry(settings.registry_dir).aliases().get("champion")
    logs = settings.data_dir / "logs"
    # Dagster's processes (code server, run workers) make gRPC socket files in their temporary
    # folder, and a run worker killed at a stop leaves them behind: they get a folder of their
    # own, removed after the stop (and, after a crash, at the next start: this runs under the
    # data directory's lock).
    for stale in settings.run_dir.glob("dagster-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    dagster_tmp = Path(tempfile.mkdtemp(prefix="dagster-tmp-", dir=settings.run_dir))
    services: list[Service] = []

    def start(
        step: int,
        name: str,
        command: list[str],
        probe: Callable[[], bool],
        announce: str,
        **extra_env: str,
    ) -> None:
        log_path = logs / f"{name}.log"
        process = _spawn(command, {**env, **extra_env}, log_path)
        services.append(Service(step, name, process, probe, announce, log_path))

    ctx.obj["services_started"] = True
    try:
        if champion is None:
            _step(6, "serving skipped: the registry has no champion (train one: `churn up`)")
        else:
            base = serving_url(settings)
            start(
                6,
                "serving",
                [*cli, "serve"],
                lambda: _http_ok(f"{base}/v2/health/ready") is not None,
                f"serving ready: {base} (REST, /docs) and "
                f"{settings.serving.host}:{settings.serving.grpc_port} (gRPC)",
            )
        port = settings.dagster.webserver_port
        dagster_url = f"http://127.0.0.1:{port}"
        start(
            7,
            "dagster",
            [dagster_bin, "dev", "-w", str(REPO_ROOT / "workspace.yaml")]
            + ["-h", "127.0.0.1", "-p", str(port)],
            lambda: _dagster_loaded(dagster_url),
            f"Dagster UI ready: {dagster_url} (its daemon runs the sensors that land, "
            "monitor, retrain and roll out)",
            TMPDIR=str(dagster_tmp),
        )
        dashboard_url = f"http://127.0.0.1:{settings.dashboard.port}"
        start(
            8,
            "dashboard",
            panel_command(settings.dashboard.port),
            lambda: _http_ok(f"{dashboard_url}/liveness") is not None,
            f"dashboard ready: {dashboard_url}/app",
        )
        for service in services:
            _await_ready(service, services)
        urls = [
            *([f"serving {serving_url(settings)}"] if champion else []),
            f"Dagster {dagster_url}",
            f"dashboard {dashboard_url}/app",
        ]
        elapsed = time.monotonic() - ctx.obj["started"]
        click.echo(
            f"ready in {elapsed:.0f}s: {', '.join(urls)}; their logs: {logs}/ "
            "(Ctrl-C stops the platform)"
        )
        ctx.obj["ready"] = True
        _wait_until_stopped_or_exit(services)
    finally:
        _ignore_stop_signals()
        if services:
            click.echo("stopping serving, Dagster and the dashboard")
            try:
                for run in cancel_runs_in_flight(settings):
                    click.echo(f"canceling {run}, interrupted by the stop")
            except Exception as exc:  # the stop goes on; the next start reaps such runs
                click.echo(f"WARNING: could not mark the Dagster runs in flight canceled: {exc}")
            stop_children([service.process for service in services])
        shutil.rmtree(dagster_tmp, ignore_errors=True)


def _config_args(ctx: click.Context) -> list[str]:
    path = ctx.obj["config_path"]
    return ["--config", str(Path(path).resolve())] if path is not None else []
