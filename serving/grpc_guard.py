"""MLServer's gRPC services as this product offers them.

* Every model repository call (index, load, unload), on ``inference.GRPCInferenceService`` and
  on the older ``inference.model_repository.ModelRepositoryService`` alike, needs
  ``authorization: Bearer <admin token>`` metadata; anything else is UNAUTHENTICATED.
* Loading a model loads it again from the ModelSettings the server was built with
  (:class:`ServedModels`), never from a folder.
* A malformed request is the client's error: tensors whose datatype, shape or raw contents do
  not agree are INVALID_ARGUMENT before MLServer decodes them, an unknown model NOT_FOUND; only
  a fault of the server is INTERNAL. Each rejected call is one WARNING line, without traceback.
* Streaming (``ModelStreamInfer``) is not offered: UNIMPLEMENTED.
"""

import logging
import struct
from collections.abc import Awaitable, Callable, Iterable
from math import prod
from typing import Any

import grpc
from grpc import aio
from mlserver import MLModel
from mlserver.errors import MLServerError, ModelNotFound, ModelNotReady
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import model_repository_pb2 as repo_pb
from mlserver.grpc.converters import (
    ModelInferResponseConverter,
    ModelMetadataResponseConverter,
    RepositoryIndexRequestConverter,
)
from mlserver.grpc.dataplane_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from mlserver.grpc.model_repository_pb2_grpc import (
    ModelRepositoryServiceServicer,
    add_ModelRepositoryServiceServicer_to_server,
)
from mlserver.grpc.server import GRPCServer
from mlserver.grpc.servicers import InferenceServicer
from mlserver.grpc.utils import to_metadata
from mlserver.handlers import DataPlane, ModelRepositoryHandlers
from mlserver.raw import _DatatypeToCtype as RAW_FORMATS  # the formats MLServer unpacks with
from mlserver.repository import ModelRepository
from mlserver.settings import ModelSettings, Settings
from mlserver.types import Datatype, RepositoryIndexResponse

from serving.cloudevents import ResponseHeaders
from serving.errors import bearer_matches, log_rejected
from serving.runtime import RouterRuntime, VersionRuntime, invalid_input

__all__ = [
    "GuardedGRPCServer",
    "ServedModels",
    "check_infer_request",
    "grpc_status",
    "is_admin",
]

log = logging.getLogger(__name__)

ADMIN_REQUIRED = (
    "model repository calls need the admin token (authorization: Bearer $CHURN_ADMIN_TOKEN)"
)
NO_STREAMING = (
    "streaming inference is not offered by this server: send each request with ModelInfer"
)
_DATATYPES = {datatype.value for datatype in Datatype}
_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(http_status: int) -> grpc.StatusCode:
    """The gRPC code for an error's HTTP status: the one mapping of this transport."""
    if http_status in _STATUS_CODES:
        return _STATUS_CODES[http_status]
    return (
        grpc.StatusCode.INVALID_ARGUMENT if 400 <= http_status < 500 else grpc.StatusCode.INTERNAL
    )


def is_admin(metadata: Iterable[tuple[str, Any]] | None, token: str | None) -> bool:
    """Whether the call's metadata carries ``authorization: Bearer <token>``."""
    if not token:
        return False
    given = next((value for key, value in metadata or () if key == "authorization"), None)
    return isinstance(given, str | bytes) and bearer_matches(given, token)


def _raw_elements(raw: bytes, name: str) -> int:
    """The number of length-prefixed elements in a BYTES tensor's raw contents."""
    offset, count = 0, 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise invalid_input(
                f"input {name!r}: raw_input_contents ends inside the length of element {count}"
            )
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4 + size
        if offset > len(raw):
            raise invalid_input(
                f"input {name!r}: raw_input_contents ends inside element {count} "
                f"({size} bytes announced)"
            )
        count += 1
    return count


def check_infer_request(request: pb.ModelInferRequest) -> None:
    """Reject, as INVALID_ARGUMENT with the input's name, what MLServer's decoding would fail
    on with INTERNAL: an unknown datatype, a negative dimension, raw contents that do not hold
    exactly the elements the shape and datatype announce. (Shapes against ``contents`` are
    checked by the runtimes, for REST and gRPC alike.)"""
    for tensor in request.inputs:
        if tensor.datatype not in _DATATYPES:
            raise invalid_input(
                f"input {tensor.name!r}: datatype {tensor.datatype!r} is not one of "
                f"{', '.join(sorted(_DATATYPES))}"
            )
        if any(size < 0 for size in tensor.shape):
            raise invalid_input(f"input {tensor.name!r}: shape {list(tensor.shape)} is negative")
    if not request.raw_input_contents:
        return
    # MLServer takes raw contents, in order, for the inputs that have no contents.
    without_contents = [t for t in request.inputs if not t.contents.ListFields()]
    if len(without_contents) != len(request.raw_input_contents):
        raise invalid_input(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for "
            f"{len(without_contents)} inputs without contents "
            f"({', '.join(repr(t.name) for t in without_contents) or 'none'})"
        )
    for tensor, raw in zip(without_contents, request.raw_input_contents, strict=True):
        elements = prod(tensor.shape)
        shape = f"shape {list(tensor.shape)} ({elements} elements)"
        if tensor.datatype == "BYTES":
            found = _raw_elements(raw, tensor.name)
            if found != elements:
                raise invalid_input(
                    f"input {tensor.name!r}: raw_input_contents holds {found} elements, "
                    f"{shape} says {elements}"
                )
            continue
        needed = struct.calcsize(f"{elements}{RAW_FORMATS[Datatype(tensor.datatype)]}")
        if len(raw) != needed:
            raise invalid_input(
                f"input {tensor.name!r}: raw_input_contents has {len(raw)} bytes, "
                f"{shape} of {tensor.datatype} needs {needed}"
            )


async def _answer(method: str, context: aio.ServicerContext, call: Callable[[], Awaitable[Any]]):
    """Run one call; an error becomes its own status code, logged once: a client's error as
    one WARNING line, a server's with its traceback."""
    try:
        return await call()
    except aio.AbortError:
        raise
    except ModelNotReady as exc:
        code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        log_rejected(f"gRPC {method}", code.name, message)
    except MLServerError as exc:
        code, message = grpc_status(exc.status_code), str(exc)
        log_rejected(f"gRPC {method}", code.name, message, failed=code == grpc.StatusCode.INTERNAL)
    except Exception as exc:
        log.exception("gRPC %s failed", method)
        code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
    await context.abort(code, message)


async def _require_admin(method: str, context: aio.ServicerContext, token: str | None) -> None:
    if not is_admin(context.invocation_metadata(), token):
        log_rejected(f"gRPC {method}", "UNAUTHENTICATED", "no or wrong admin token")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, ADMIN_REQUIRED)


def _index_response(index: RepositoryIndexResponse, response_type: Any) -> Any:
    """The index as the protocol spells it: state ``READY``, not MLServer 1.7's converter's
    ``State.READY``."""
    return response_type(
        models=[
            response_type.ModelIndex(
                name=item.name,
                version=item.version or "",
                state=item.state.value,
                reason=item.reason,
            )
            for item in index.root
        ]
    )


class ServedModels(ModelRepository):
    """The models this server was built with, as MLServer's model repository: an admin's
    repository load of ``churn-router``, ``churn`` or ``churn-explainer`` loads it again from
    its ModelSettings; any other name is NOT_FOUND. ``root`` is unused (MLServer passes it)."""

    def __init__(self, root: str, models: list[ModelSettings]) -> None:
        self._models = list(models)

    async def find(self, name: str) -> list[ModelSettings]:
        found = [model for model in self._models if model.name == name]
        if not found:
            raise ModelNotFound(name)
        return found

    # After find: in the class body, ``list`` names this method once it is defined.
    async def list(self) -> list[ModelSettings]:
        return [*self._models]


class _GuardedRepository:
    """The repository calls both gRPC services offer, behind the admin token. A servicer sets
    ``_handlers``, ``_token``, ``_messages`` (its protobuf module) and ``_service`` (prefixes
    its calls in the log)."""

    _handlers: ModelRepositoryHandlers
    _token: str | None
    _messages: Any
    _service: str

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        method = f"{self._service}RepositoryIndex"
        await _require_admin(method, context, self._token)

        async def index() -> Any:
            found = await self._handlers.index(RepositoryIndexRequestConverter.to_types(request))
            return _index_response(found, self._messages.RepositoryIndexResponse)

        return await _answer(method, context, index)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._change(
            "RepositoryModelLoad", self._handlers.load, "loaded again", request, context
        )

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._change(
            "RepositoryModelUnload", self._handlers.unload, "unloaded", request, context
        )

    async def _change(
        self,
        call: str,
        change: Callable[[str], Awaitable[Any]],
        done: str,
        request: Any,
        context: Any,
    ) -> Any:
        method = f"{self._service}{call} {request.model_name!r}"
        await _require_admin(method, context, self._token)

        async def run() -> Any:
            await change(request.model_name)
            log.warning("model %r %s by an admin over gRPC", request.model_name, done)
            return getattr(self._messages, f"{call}Response")()

        return await _answer(method, context, run)


class GuardedInferenceServicer(_GuardedRepository, InferenceServicer):
    """``inference.GRPCInferenceService`` with the admin token on repository calls, client
    errors as client status codes and no streaming."""

    def __init__(
        self,
        data_plane: DataPlane,
        handlers: ModelRepositoryHandlers,
        *,
        token: str | None,
        served: set[str],
    ) -> None:
        super().__init__(data_plane, handlers)
        self._served = served
        self._handlers, self._token, self._messages, self._service = handlers, token, pb, ""
        self._response_headers = ResponseHeaders(data_plane)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def infer() -> pb.ModelInferResponse:
            check_infer_request(request)
            if not request.raw_input_contents:
                # Our runtimes answer protobuf directly (``infer_message``); MLServer's data
                # plane would convert the request and the response through its models.
                model = await self._data_plane._model_registry.get_model(  # MLServer 1.7
                    request.model_name, request.model_version
                )
                if not model.ready:
                    raise ModelNotReady(request.model_name, request.model_version)
                if isinstance(model, RouterRuntime | VersionRuntime):
                    response = await model.infer_message(request)
                    context.set_trailing_metadata(self._trailing(model, response.id))
                    return response
            try:
                payload = self._InsertHeaders(request, context)
            except (struct.error, ValueError, IndexError) as exc:  # after the checks: unforeseen
                raise invalid_input(f"the request's tensors cannot be decoded: {exc}") from exc
            result = await self._data_plane.infer(
                payload=payload, name=request.model_name, version=request.model_version
            )
            self._SetTrailingMetadata(result, context)
            return ModelInferResponseConverter.from_types(
                result, use_raw=bool(request.raw_input_contents)
            )

        return await _answer(f"ModelInfer {request.model_name!r}", context, infer)

    def _trailing(self, model: MLModel, response_id: str) -> tuple[tuple[str, str], ...]:
        """The trailing metadata MLServer's data plane gives a response of ``model``: its
        CloudEvents headers."""
        return to_metadata(dict(self._response_headers.headers(model, response_id)))

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> None:  # noqa: N802
        log_rejected("gRPC ModelStreamInfer", "UNIMPLEMENTED", "streaming is not offered")
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_STREAMING)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def metadata() -> pb.ModelMetadataResponse:
            found = await self._data_plane.model_metadata(
                name=request.name, version=request.version
            )
            return ModelMetadataResponseConverter.from_types(found)

        return await _answer(f"ModelMetadata {request.name!r}", context, metadata)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        """Not ready when one of our models is not loaded; NOT_FOUND for a name never served."""

        async def ready() -> pb.ModelReadyResponse:
            try:
                is_ready = await self._data_plane.model_ready(
                    name=request.name, version=request.version
                )
            except ModelNotFound:
                if request.name not in self._served:
                    raise
                is_ready = False
            return pb.ModelReadyResponse(ready=is_ready)

        return await _answer(f"ModelReady {request.name!r}", context, ready)


class GuardedRepositoryServicer(_GuardedRepository, ModelRepositoryServiceServicer):
    """``inference.model_repository.ModelRepositoryService`` (MLServer's older API) under the
    same rules as the repository calls of :class:`GuardedInferenceServicer`."""

    def __init__(self, handlers: ModelRepositoryHandlers, *, token: str | None) -> None:
        self._handlers, self._token, self._messages = handlers, token, repo_pb
        self._service = "ModelRepositoryService."


class GuardedGRPCServer(GRPCServer):
    """MLServer's gRPC server with the two guarded servicers. MLServer's optional interceptors
    (debug access log, metrics, tracing) are not installed: this process turns all three off,
    and :meth:`_create_server` refuses settings that turn one on."""

    def __init__(
        self,
        settings: Settings,
        data_plane: DataPlane,
        handlers: ModelRepositoryHandlers,
        *,
        token: str | None,
        served: set[str],
    ) -> None:
        super().__init__(settings, data_plane, handlers)
        self._token = token
        self._served = served

    def _create_server(self) -> aio.Server:
        settings = self._settings
        if settings.debug or settings.metrics_endpoint or settings.tracing_server:
            raise ValueError("the guarded gRPC server has no debug, metrics or tracing hooks")
        self._inference_servicer = GuardedInferenceServicer(
            self._data_plane,
            self._model_repository_handlers,
            token=self._token,
            served=self._served,
        )
        self._model_repository_servicer = GuardedRepositoryServicer(
            self._model_repository_handlers, token=self._token
        )
        self._server = aio.server(options=self._get_options())
        add_GRPCInferenceServiceServicer_to_server(self._inference_servicer, self._server)
        add_ModelRepositoryServiceServicer_to_server(self._model_repository_servicer, self._server)
        self._server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        return self._server
