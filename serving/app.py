"""The REST app serving owns: the V2 routes it offers, the product's endpoints, offline docs,
its OpenAPI document, the request body limit and its error handlers.

The V2 routes are MLServer's own endpoints (``mlserver.rest.endpoints.Endpoints`` on MLServer's
data plane, with MLServer's route class and response class), listed here route by route:
models' readiness, inference, metadata, the server's health and metadata. ``churn-router``'s
inference comes first, from its JSON (:mod:`serving.rest_message`), with MLServer's route behind
it for the requests it does not take. The model repository
(admin work: gRPC only, behind the admin token), streaming and ``generate`` (the LLM extension)
are not offered, and MLServer's docs pages (they load Swagger from a CDN) are replaced by
``/docs`` and ``/redoc`` served offline. :class:`ServingRESTServer` is MLServer's REST server
with this app in place of the one it would build.
"""

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import Response as FastAPIResponse
from mlserver.errors import MLServerError
from mlserver.handlers import DataPlane, ModelRepositoryHandlers
from mlserver.rest.app import APIRoute
from mlserver.rest.endpoints import Endpoints
from mlserver.rest.errors import handle_mlserver_error
from mlserver.rest.responses import Response
from mlserver.rest.server import RESTServer
from mlserver.settings import Settings as MLServerSettings
from starlette.routing import Route

from churn_assets.config import Settings
from serving.api import (
    BodySizeLimit,
    create_router,
    serving_error_handler,
    validation_error_handler,
)
from serving.docs import mount_docs
from serving.errors import ServingError, field_errors, log_rejected
from serving.feedback import FeedbackPublisher
from serving.openapi import publish_openapi
from serving.plane import ServingPlane
from serving.rest_message import RouterInferRoute
from serving.runtime import ROUTER_MODEL

__all__ = ["V2_ROUTES", "ServingRESTServer", "create_app"]

log = logging.getLogger(__name__)

TITLE = "churn-platform serving"
DESCRIPTION = (
    "Open Inference (V2) protocol for `churn-router`, `churn` (per version) and "
    "`churn-explainer`, plus the product's endpoints. Admin endpoints need "
    "`Authorization: Bearer $CHURN_ADMIN_TOKEN`."
)

# (path, MLServer endpoint, methods): the V2 protocol as serving offers it.
V2_ROUTES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("/v2/models/{model_name}/ready", "model_ready", ("GET",)),
    ("/v2/models/{model_name}/versions/{model_version}/ready", "model_ready", ("GET",)),
    ("/v2/models/{model_name}/infer", "infer", ("POST",)),
    ("/v2/models/{model_name}/versions/{model_version}/infer", "infer", ("POST",)),
    ("/v2/models/{model_name}", "model_metadata", ("GET",)),
    ("/v2/models/{model_name}/versions/{model_version}", "model_metadata", ("GET",)),
    ("/v2/health/live", "live", ("GET",)),
    ("/v2/health/ready", "ready", ("GET",)),
    ("/v2", "metadata", ("GET",)),
)


def create_app(
    settings: Settings,
    plane: ServingPlane,
    data_plane: DataPlane,
    *,
    token: str | None,
    feedback: FeedbackPublisher | None,
    models: Sequence[str],
    versions: Sequence[str],
) -> FastAPI:
    """The serving REST app for ``plane``: V2 on MLServer's ``data_plane`` and the product's
    endpoints; ``models`` and ``versions`` are the V2 models the OpenAPI document names."""
    endpoints = Endpoints(data_plane)
    v2 = {
        path: APIRoute(path, getattr(endpoints, endpoint), methods=list(methods))
        for path, endpoint, methods in V2_ROUTES
    }
    # The router's inference first: answered from its JSON, MLServer's route for the rest.
    router_infer = Route(
        f"/v2/models/{ROUTER_MODEL}/infer",
        RouterInferRoute(data_plane, v2["/v2/models/{model_name}/infer"]),
        methods=["POST"],
        include_in_schema=False,
    )
    app = FastAPI(
        title=TITLE,
        description=DESCRIPTION,
        debug=False,
        routes=[router_infer, *v2.values()],
        default_response_class=Response,
        docs_url=None,
        redoc_url=None,
    )
    app.router.route_class = APIRoute
    app.add_middleware(GZipMiddleware)  # as MLServer's own app (gzip_enabled, its default)
    app.include_router(create_router(plane, token, feedback))
    mount_docs(app)
    publish_openapi(app, models=sorted(models), versions=list(versions))
    app.add_middleware(BodySizeLimit, max_bytes=settings.serving.max_request_bytes)
    app.add_exception_handler(ServingError, _logged(serving_error_handler))
    app.add_exception_handler(RequestValidationError, _logged(validation_error_handler))
    app.add_exception_handler(MLServerError, _logged(handle_mlserver_error))
    return app


class ServingRESTServer(RESTServer):
    """MLServer's REST server (uvicorn, its start and stop) serving ``app``."""

    def __init__(
        self,
        settings: MLServerSettings,
        data_plane: DataPlane,
        model_repository_handlers: ModelRepositoryHandlers,
        app: FastAPI,
    ) -> None:
        self._settings = settings
        self._data_plane = data_plane
        self._model_repository_handlers = model_repository_handlers
        self._app = app


def _logged(
    handler: Callable[[Request, Any], Awaitable[FastAPIResponse]],
) -> Callable[[Request, Exception], Awaitable[FastAPIResponse]]:
    """``handler``, and one log line per rejected request, without traceback: WARNING with the
    status and the reason, ERROR for a 500. A readiness check's "not ready" (a 404 while a model
    is not loaded) is an answer, not a rejection: not logged."""

    async def logged(request: Request, exc: Exception) -> FastAPIResponse:
        response = await handler(request, exc)
        if request.url.path.endswith("/ready"):
            return response
        reason = (
            field_errors(exc.errors(), 5) if isinstance(exc, RequestValidationError) else str(exc)
        )
        log_rejected(
            f"{request.method} {request.url.path}",
            response.status_code,
            reason,
            failed=response.status_code == 500,
        )
        return response

    return logged
