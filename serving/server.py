"""The serving process: MLServer (V2 over REST and gRPC) with our runtimes, plus the product's
convenience endpoints, Prometheus metrics and OpenAPI docs on the same REST port.

``create_server(settings)`` builds everything without starting it; ``run(settings)`` serves until
SIGINT/SIGTERM. Model repository load/unload is off on REST and needs the admin token on gRPC.
"""

import asyncio
import hmac
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import grpc
import mlserver.grpc.server as mlserver_grpc_server
import mlserver.grpc.utils as mlserver_grpc_utils
from fastapi.exceptions import RequestValidationError
from mlserver import MLServer
from mlserver.grpc.model_repository import ModelRepositoryServicer
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.settings import Settings as MLServerSettings

from churn_assets.config import Settings
from serving.api import create_router, serving_error_handler, validation_error_handler
from serving.errors import ServingError
from serving.metrics import ServingMetrics
from serving.mirror import PredictionMirror
from serving.plane import ServingPlane
from serving.runtime import ExplainerRuntime, RouterRuntime, VersionRuntime, install_plane

__all__ = ["ADMIN_TOKEN_ENV", "ServingProcess", "create_server", "run"]

log = logging.getLogger(__name__)
ADMIN_TOKEN_ENV = "CHURN_ADMIN_TOKEN"

# Field-level validation errors are HTTP 422; MLServer maps 422 to gRPC FAILED_PRECONDITION,
# but for bad input the right gRPC code is INVALID_ARGUMENT.
mlserver_grpc_utils.STATUS_CODE_MAPPING[422] = grpc.StatusCode.INVALID_ARGUMENT


def _guarded_repository_servicer(token: str | None) -> type[ModelRepositoryServicer]:
    class GuardedRepositoryServicer(ModelRepositoryServicer):
        """gRPC model repository calls need ``authorization: Bearer <admin token>``."""

        async def _check(self, context: Any) -> None:
            metadata = dict(context.invocation_metadata() or ())
            given = metadata.get("authorization", "")
            if not token or not hmac.compare_digest(given, f"Bearer {token}"):
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "model repository calls need the admin token"
                )

        async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
            await self._check(context)
            return await super().RepositoryIndex(request, context)

        async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
            await self._check(context)
            return await super().RepositoryModelLoad(request, context)

        async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
            await self._check(context)
            return await super().RepositoryModelUnload(request, context)

    return GuardedRepositoryServicer


@dataclass
class ServingProcess:
    server: MLServer
    plane: ServingPlane
    models: list[ModelSettings]

    async def serve(self) -> None:
        await self.server.start(self.models)

    def close(self) -> None:
        self.plane.close()
        install_plane(None)


def _model_settings(plane: ServingPlane) -> list[ModelSettings]:
    versions = [v.version for v in plane.registry.versions()]
    models = [
        ModelSettings(name="churn-router", implementation=RouterRuntime),
        ModelSettings(name="churn-explainer", implementation=ExplainerRuntime),
    ]
    models += [
        ModelSettings(
            name="churn",
            implementation=VersionRuntime,
            parameters=ModelParameters(version=version),
        )
        for version in versions
    ]
    return models


def create_server(settings: Settings, *, with_mirror: bool = True) -> ServingProcess:
    """MLServer with our runtimes and endpoints, wired to one plane; nothing started yet."""
    metrics = ServingMetrics()
    mirror = PredictionMirror(settings, metrics) if with_mirror else None
    plane = ServingPlane(settings, metrics=metrics, mirror=mirror)
    install_plane(plane)
    token = os.environ.get(ADMIN_TOKEN_ENV) or None
    if token is None:
        log.warning("%s is not set: admin endpoints will refuse every call", ADMIN_TOKEN_ENV)

    repository_root = tempfile.mkdtemp(prefix="churn-serving-")
    mlserver_settings = MLServerSettings(
        host=settings.serving.host,
        http_port=settings.serving.http_port,
        grpc_port=settings.serving.grpc_port,
        parallel_workers=0,
        metrics_endpoint=None,
        debug=False,
        load_models_at_startup=False,
        model_repository_root=repository_root,
    )
    mlserver_grpc_server.ModelRepositoryServicer = _guarded_repository_servicer(token)
    server = MLServer(mlserver_settings)
    app = server._rest_server._app  # MLServer 1.7 keeps its FastAPI app here (pinned version)
    app.router.routes = [
        route
        for route in app.router.routes
        if not getattr(route, "path", "").startswith("/v2/repository")
    ]
    feedback_producer = _feedback_producer(settings)
    app.include_router(create_router(plane, token, feedback_producer))
    app.add_exception_handler(ServingError, serving_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.title = "churn-platform serving"
    app.description = (
        "Open Inference (V2) protocol for `churn-router`, `churn` (per version) and "
        "`churn-explainer`, plus the product's endpoints. Admin endpoints need "
        "`Authorization: Bearer $CHURN_ADMIN_TOKEN`."
    )
    return ServingProcess(server=server, plane=plane, models=_model_settings(plane))


def _feedback_producer(settings: Settings) -> Any:
    from churn_assets.broker import BrokerError
    from churn_assets.kafka import make_producer

    try:
        return make_producer(settings, **{"message.timeout.ms": 5000})
    except BrokerError as exc:
        log.warning("feedback endpoint disabled until restart: %s", exc)
        return None


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM."""

    async def main() -> None:
        # MLServer installs its signal handlers on the loop that is current when it is built,
        # so it must be built inside the running loop.
        process = create_server(settings)
        log.info(
            "serving on http://%s:%d (REST) and %s:%d (gRPC)",
            settings.serving.host,
            settings.serving.http_port,
            settings.serving.host,
            settings.serving.grpc_port,
        )
        try:
            await process.serve()
        finally:
            process.close()

    asyncio.run(main())
