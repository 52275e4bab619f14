"""The serving process: MLServer (V2 over REST and gRPC) with our runtimes, plus the product's
convenience endpoints, Prometheus metrics and OpenAPI docs on the same REST port.

``create_server(settings)`` builds everything without starting it; ``run(settings)`` serves until
SIGINT/SIGTERM/SIGQUIT, then stops gracefully and releases everything it made (Kafka producers,
threads, the anchors worker, MLServer's temporary model repository folder) on every exit path.
Model repository index/load/unload is off on REST and needs the admin token on both gRPC
services; streaming is not offered; readiness needs ``churn-router`` and the champion's version
loaded (see :mod:`serving.grpc_guard`).
"""

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlserver import MLServer
from mlserver.errors import ModelNotFound
from mlserver.server import HANDLED_SIGNALS as MLSERVER_SIGNALS
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.settings import Settings as MLServerSettings

from churn_assets.config import Settings
from serving.app import ServingRESTServer, create_app
from serving.errors import NotFound, ServingError
from serving.feedback import FeedbackPublisher
from serving.grpc_guard import GuardedGRPCServer, ServedModels
from serving.metrics import ServingMetrics
from serving.mirror import PredictionMirror
from serving.plane import ServingPlane
from serving.runtime import ROUTER_MODEL, BoundModelSettings, input_metadata, runtimes_for

__all__ = ["ADMIN_TOKEN_ENV", "ServingProcess", "create_server", "run"]

log = logging.getLogger(__name__)
ADMIN_TOKEN_ENV = "CHURN_ADMIN_TOKEN"


@dataclass
class ServingProcess:
    """One serving process, built and not started: :meth:`serve` runs it until it stops,
    :meth:`close` releases everything :func:`create_server` made (call it on every exit path)."""

    server: MLServer
    plane: ServingPlane
    models: list[ModelSettings]
    repository_root: Path
    listening: asyncio.Event
    shutting_down: asyncio.Event
    resources: contextlib.ExitStack = field(repr=False)

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Serve until MLServer stops, or until ``stop`` is set: then stop it once, gracefully
        (in-flight requests finish; gRPC gets MLServer's 5 s grace)."""
        serving = asyncio.ensure_future(self.server.start(self.models))
        if stop is None:
            await serving
            return
        stopper = asyncio.ensure_future(self._stop_when(stop))
        try:
            await serving
        finally:
            stopper.cancel()
            await asyncio.wait({stopper})  # never raises, so a cancellation of ours stays ours

    async def _stop_when(self, stop: asyncio.Event) -> None:
        await stop.wait()
        # MLServer.stop needs the REST and gRPC servers to exist: they are built when serving
        # starts, before the REST app's start-up event, so a stop asked for during start-up
        # waits for it.
        await self.listening.wait()
        # SIGTERM whatever the signal was: uvicorn has already seen the signal itself, and a
        # second SIGINT would make it force its exit instead of letting requests finish.
        await self.server.stop(sig=signal.SIGTERM)

    def close(self) -> None:
        """Close the feedback producer (bounded flush), remove MLServer's model repository
        folder and close the plane (shadow thread, anchors worker, Kafka mirror).
        Idempotent."""
        self.resources.close()


def _model_settings(plane: ServingPlane) -> list[ModelSettings]:
    """The V2 models. The versions the router sends traffic to (champion, and a challenger in
    a rollout) are loaded here first, so one that cannot be loaded (a damaged artefact) fails
    the start with one line instead of MLServer stopping itself after it began serving. Any
    other registered version that cannot be loaded (an old one, a champion a rollback would
    return to) is quarantined: left out of the V2 models, logged, and reported in
    ``/router/metrics`` and ``model_quarantined``; an old damaged version never keeps the
    current ones from serving. Each model's metadata names its inputs: the served contract's
    for the router and the explainer, a version's own for that version."""
    state = plane.state
    routed = {state.champion, state.challenger} - {None}
    versions = []
    for version in plane.registry.version_names():
        try:
            plane.load(version)
        except NotFound as exc:
            if version in routed:
                raise
            plane.quarantine(version, str(exc))
            continue
        versions.append(version)
    served = input_metadata(plane.contract)
    runtimes = runtimes_for(plane)
    models = [
        BoundModelSettings.of(runtimes.router, name=ROUTER_MODEL, inputs=served),
        BoundModelSettings.of(runtimes.explainer, name="churn-explainer", inputs=served),
    ]
    models += [
        BoundModelSettings.of(
            runtimes.version,
            name="churn",
            parameters=ModelParameters(version=version),
            inputs=input_metadata(plane.contract_of(version)),
        )
        for version in versions
    ]
    return models


def create_server(settings: Settings, *, with_mirror: bool = True) -> ServingProcess:
    """MLServer with our runtimes and endpoints, wired to one plane; nothing started yet.

    Call it inside the running event loop that will serve: MLServer installs its signal
    handlers on that loop (:func:`run` replaces them). Whatever fails here releases what was
    already made; afterwards :meth:`ServingProcess.close` does.
    """
    resources = contextlib.ExitStack()
    try:
        metrics = ServingMetrics()
        mirror = PredictionMirror(settings, metrics) if with_mirror else None
        if mirror is not None:
            resources.callback(mirror.close)
        plane = ServingPlane(settings, metrics=metrics, mirror=mirror)
        resources.callback(plane.close)
        token = os.environ.get(ADMIN_TOKEN_ENV) or None
        if token is None:
            log.warning("%s is not set: admin endpoints will refuse every call", ADMIN_TOKEN_ENV)

        # Our models are loaded from ModelSettings at start, and MLServer's repository is those
        # same ModelSettings (an admin's gRPC repository load loads one again); MLServer still
        # wants a repository root: an empty private folder, removed on close.
        repository = tempfile.TemporaryDirectory(prefix="churn-serving-")
        resources.callback(repository.cleanup)
        models = _model_settings(plane)
        versions = [m.parameters.version for m in models if m.name == "churn" and m.parameters]
        mlserver_settings = MLServerSettings(
            host=settings.serving.host,
            http_port=settings.serving.http_port,
            grpc_port=settings.serving.grpc_port,
            grpc_max_message_length=settings.serving.max_request_bytes,
            parallel_workers=0,
            metrics_endpoint=None,
            debug=False,
            load_models_at_startup=False,
            model_repository_root=repository.name,
            model_repository_implementation=ServedModels,
            model_repository_implementation_args={"models": models},
        )
        server = MLServer(mlserver_settings)
        _log_each_line_once()
        server._grpc_server = GuardedGRPCServer(  # MLServer 1.7's attribute (pinned version)
            mlserver_settings,
            server._data_plane,
            server._model_repository_handlers,
            token=token,
            served={model.name for model in models},
        )
        _ready_only_with_the_routed_models(server, plane, set(versions))
        feedback = FeedbackPublisher.create(settings)
        if feedback is not None:
            resources.callback(feedback.close)
        app = create_app(
            settings,
            plane,
            server._data_plane,
            token=token,
            feedback=feedback,
            models=sorted({m.name for m in models}),
            versions=versions,
        )
        server._rest_server = ServingRESTServer(  # MLServer 1.7's attribute (pinned version)
            mlserver_settings, server._data_plane, server._model_repository_handlers, app
        )
        # Everything built so far (imported modules, loaded versions, the app) lives as long as
        # the process: out of the collector's sight, so a full collection scans only what
        # requests allocate instead of pausing serving for the whole heap.
        gc.collect()
        gc.freeze()
        listening, shutting_down = asyncio.Event(), asyncio.Event()
        app.add_event_handler("startup", listening.set)
        app.add_event_handler("shutdown", shutting_down.set)
        return ServingProcess(
            server=server,
            plane=plane,
            models=models,
            repository_root=Path(repository.name),
            listening=listening,
            shutting_down=shutting_down,
            resources=resources.pop_all(),
        )
    except BaseException:
        resources.close()
        raise


def _ready_only_with_the_routed_models(
    server: MLServer, plane: ServingPlane, versions: set[str]
) -> None:
    """Readiness (REST ``/v2/health/ready``, gRPC ``ServerReady``) also needs ``churn-router``
    and the champion's ``churn`` version loaded and ready: MLServer alone only asks whether the
    models that happen to be loaded are ready, so an unloaded router left the server "ready"."""
    data_plane = server._data_plane  # MLServer 1.7's attributes (pinned version)
    registry = server._model_registry
    loaded_models_ready = data_plane.ready

    async def ready() -> bool:
        required: list[tuple[str, str | None]] = [(ROUTER_MODEL, None)]
        champion = plane.state.champion
        if champion in versions:  # a version registered after the start is not served by V2
            required.append(("churn", champion))
        for name, version in required:
            try:
                model = await registry.get_model(name, version)
            except ModelNotFound:
                return False
            if not model.ready:
                return False
        return await loaded_models_ready()

    data_plane.ready = ready


def _log_each_line_once() -> None:
    """MLServer gives its ``mlserver`` logger a stdout handler of its own, and that logger also
    propagates to the root logger the process configures (``churn serve``): every MLServer line
    was written twice. Its lines now go through the root logger only."""
    mlserver_logger = logging.getLogger("mlserver")
    for handler in list(mlserver_logger.handlers):
        if handler.get_name() == "stdout_stream_handler":  # mlserver.logging's handler
            mlserver_logger.removeHandler(handler)


def _check_ports_free(settings: Settings) -> None:
    """Fail with a one-line message when a port is taken: uvicorn would exit the whole process
    from inside the event loop (no clean-up), and gRPC would share a port with SO_REUSEPORT."""
    host = settings.serving.host
    for key, port in (
        ("serving.http_port", settings.serving.http_port),
        ("serving.grpc_port", settings.serving.grpc_port),
    ):
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                probe.bind(address)
            except OSError as exc:
                raise ServingError(
                    f"{key} {port} on {host} is not free ({exc.strerror}): stop what listens "
                    "there or choose another port (--http-port / --grpc-port)",
                    503,
                ) from None


class _StopSignals:
    """SIGINT, SIGTERM and SIGQUIT ask the serving process to stop, once.

    MLServer's own handlers start a new ``MLServer.stop`` for every signal they see, a signal
    that arrives while the servers are still being built makes that stop fail, and uvicorn
    raises every signal it captured again once it has stopped, including the SIGINT that
    MLServer's stop hands it when MLServer stops by itself. These handlers only set
    ``requested`` (:meth:`ServingProcess.serve` stops the server once it is listening), and
    ignore signals raised after the server began shutting down by itself.
    """

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self._process: ServingProcess | None = None

    def install(self, process: ServingProcess | None = None) -> None:
        self._process = process
        loop = asyncio.get_running_loop()
        for sig in MLSERVER_SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.requested.is_set():
            return
        if self._process is not None and self._process.shutting_down.is_set():
            log.debug("%s while serving was already stopping by itself: ignored", name)
            return
        log.info("%s received: stopping", name)
        self.requested.set()


async def _serve(settings: Settings) -> None:
    stop = _StopSignals()
    stop.install()
    _check_ports_free(settings)
    process = create_server(settings)
    try:
        stop.install(process)  # MLServer(...) put its own handlers on the loop: take them back
        log.info(
            "serving on http://%s:%d (REST) and %s:%d (gRPC)",
            settings.serving.host,
            settings.serving.http_port,
            settings.serving.host,
            settings.serving.grpc_port,
        )
        await process.serve(stop.requested)
    finally:
        process.close()
    if not stop.requested.is_set():
        raise ServingError("serving stopped by itself; the log above says why", 500)
    log.info("serving stopped")


def run(settings: Settings) -> None:
    """Serve until SIGINT, SIGTERM or SIGQUIT, then stop gracefully and release everything."""
    asyncio.run(_serve(settings))
