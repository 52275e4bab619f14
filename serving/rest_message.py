"""``POST /v2/models/churn-router/infer`` answered from the request's JSON, as gRPC's
``infer_message`` answers from protobuf.

MLServer's route for it validates the body into MLServer's ``InferenceRequest`` (FastAPI's
dependency solving and pydantic), passes it through the data plane, encodes the outputs with
MLServer's codecs into an ``InferenceResponse`` and serializes that through the response model:
on the event loop, which is also where every other request is read and answered, that costs
more than scoring the record. This route takes a request in its plain form (:func:`plain_inputs`:
a JSON body whose fields MLServer's request model would hold exactly as sent) straight to the
router's columns (:meth:`~serving.runtime.RouterRuntime.infer_json`: the same checks, routing
and outputs), and writes the JSON MLServer would write, with the same status, headers
(CloudEvents included) and MLServer's inference metrics. Anything else (a query string, a
gzip-encoded body, another content type, a field MLServer's model would coerce or refuse, a model
not ready) goes to MLServer's route untouched, which answers as it always did; errors raised
here are MLServer errors, handled by the app's handlers as that route's are.
``tests/integration/test_serving_rest_message.py`` compares the two routes request by request.
"""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from mlserver.errors import MLServerError
from mlserver.handlers import DataPlane
from mlserver.types import Datatype
from mlserver.utils import generate_uuid
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from serving.cloudevents import ResponseHeaders
from serving.runtime import OUTPUT_CONTENT_TYPES, ROUTER_MODEL, RouterRuntime

__all__ = ["RouterInferRoute", "plain_inputs"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REQUEST_KEYS = frozenset({"id", "parameters", "inputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})
_INPUT_REQUIRED = frozenset({"name", "shape", "datatype", "data"})
_DATATYPES = frozenset(datatype.value for datatype in Datatype)


def plain_inputs(
    headers: Headers, body: bytes, query: bytes = b""
) -> tuple[str | None, list[dict[str, Any]]] | None:
    """``(id, inputs)`` of a request in the plain form this route answers, None for any other.

    Plain: no query string (MLServer's route reads ``model_version`` from it), no
    ``Content-Encoding``, no ``Content-Type`` or ``application/json``, a body that is
    one JSON object with at most ``id`` (text, not empty, or null), ``parameters`` and a
    non-empty ``inputs`` array; each input an object with ``name`` (text), ``shape`` (an array
    of integers), ``datatype`` (one of V2's), ``data`` (an array) and at most ``parameters``;
    every ``parameters`` null or at most a text ``content_type``. MLServer's request model holds
    such a request's values as they are, so both routes check the same values.
    """
    if query or "content-encoding" in headers:
        return None
    content_type = headers.get("content-type")
    if content_type is not None and content_type.strip().lower() != "application/json":
        return None
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(request) is not dict or not request.keys() <= _REQUEST_KEYS:
        return None
    request_id = request.get("id")
    if request_id is not None and (type(request_id) is not str or not request_id):
        return None
    inputs = request.get("inputs")
    if type(inputs) is not list or not inputs or not _plain_parameters(request.get("parameters")):
        return None
    for item in inputs:
        if not (
            type(item) is dict
            and _INPUT_REQUIRED <= item.keys() <= _INPUT_KEYS
            and type(item["name"]) is str
            and type(item["datatype"]) is str
            and item["datatype"] in _DATATYPES
            and type(item["data"]) is list
            and type(item["shape"]) is list
            and all(type(size) is int for size in item["shape"])
            and _plain_parameters(item.get("parameters"))
        ):
            return None
    return request_id, inputs


def _plain_parameters(parameters: Any) -> bool:
    return parameters is None or (
        type(parameters) is dict
        and parameters.keys() <= {"content_type"}
        and all(type(value) is str for value in parameters.values())
    )


class RouterInferRoute:
    """The ASGI app of ``POST /v2/models/churn-router/infer`` (module docstring); ``fallback``
    is MLServer's route ``/v2/models/{model_name}/infer``."""

    def __init__(self, data_plane: DataPlane, fallback: BaseRoute) -> None:
        self._data_plane = data_plane
        self._fallback = fallback
        self._headers = ResponseHeaders(data_plane)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await Request(scope, receive).body()
        except ClientDisconnect:
            return  # the caller hung up before its body was in: nobody to answer
        plain = plain_inputs(Headers(scope=scope), body, scope.get("query_string", b""))
        model = await self._router() if plain is not None else None
        if plain is None or model is None:
            await self._fall_back(scope, body, receive, send)
            return
        request_id, inputs = plain
        # MLServer 1.7's data plane (pinned version): its inference metrics, model lookup,
        # readiness check and model context, as its route has them.
        async with self._data_plane._infer_contextmanager(ROUTER_MODEL, None) as model:
            response_id = request_id if request_id is not None else generate_uuid()
            outputs = await model.infer_json(inputs)
        answer: dict[str, Any] = {"model_name": ROUTER_MODEL, "id": response_id}
        parameters = self._headers.parameters(model)
        if parameters is not None:
            answer["parameters"] = parameters
        answer["outputs"] = [
            {
                "name": name,
                "shape": [len(values), 1],
                "datatype": datatype,
                "parameters": {"content_type": OUTPUT_CONTENT_TYPES[datatype]},
                "data": values,
            }
            for name, datatype, values in outputs
        ]
        response = Response(orjson.dumps(answer), media_type="application/json")
        response.headers.update(dict(self._headers.headers(model, response_id)))  # as MLServer
        await response(scope, receive, send)

    async def _router(self) -> RouterRuntime | None:
        """The router runtime when it is loaded and ready (else MLServer's route answers)."""
        try:
            model = await self._data_plane._model_registry.get_model(ROUTER_MODEL, None)
        except MLServerError:
            return None
        return model if isinstance(model, RouterRuntime) and model.ready else None

    async def _fall_back(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """MLServer's route with the body already read handed to it again."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        _, child = self._fallback.matches(scope)
        await self._fallback.handle({**scope, **child}, replay, send)
