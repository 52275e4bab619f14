"""MLServer runtimes (Open Inference / V2 protocol over REST and gRPC) backed by the plane.

* ``churn-router``: applies the router policy (shadow / canary / blue-green) and mirrors.
* ``churn`` with versions ``v1``, ``v2``, ...: one registered version, no routing.
* ``churn-explainer``: SHAP contributions for the routed version.

Requests carry either one named input per feature of the served contract (the champion's;
a ``churn`` version's own contract for that version; optional ``customer_id`` and ``request_id``
inputs) or a single ``records`` input of JSON strings, one record each. Every input's shape must
match its data and its values its datatype; the columns are then checked against the contract
(:func:`~serving.requests.validate_columns`). The models' metadata lists the inputs: an integer
feature is INT64, a number FP64, a boolean BOOL, a category BYTES. Validation errors become
MLServer errors with status 422 (gRPC INVALID_ARGUMENT), naming the input.

Scoring runs on the plane's scoring thread and SHAP on its explanation thread
(:meth:`ServingPlane.scored`, :meth:`ServingPlane.explained`), never on the event loop that serves
every other request.
"""

import asyncio
from collections.abc import Callable, Iterable, Sequence
from math import prod
from typing import Any, ClassVar, NamedTuple

import numpy as np
import orjson
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.settings import ModelSettings
from mlserver.types import (
    Datatype,
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    RequestInput,
    TensorData,
)
from pydantic import PrivateAttr

from churn_assets.contract import Contract
from serving.errors import ServingError
from serving.plane import Prediction, ServingPlane
from serving.requests import ID_FIELDS, Batch, validate_columns, validate_records

__all__ = [
    "OUTPUT_CONTENT_TYPES",
    "ROUTER_MODEL",
    "ExplainerRuntime",
    "RouterRuntime",
    "VersionRuntime",
    "BoundModelSettings",
    "batch_from_json",
    "batch_from_message",
    "batch_from_request",
    "input_metadata",
    "runtimes_for",
    "invalid_input",
]


class _PlaneRuntime(MLModel):
    """A runtime of one serving plane. MLServer instantiates runtimes from their class alone,
    so :func:`runtimes_for` makes subclasses that carry their plane; the classes here carry
    none and refuse to load."""

    plane: ClassVar[ServingPlane | None] = None

    @property
    def served(self) -> ServingPlane:
        if self.plane is None:
            raise MLServerError(
                f"{type(self).__name__} is not bound to a serving plane; start with `churn serve`",
                503,
            )
        return self.plane


class BoundModelSettings(ModelSettings):
    """``ModelSettings`` of a runtime bound to a plane (:func:`runtimes_for`). MLServer keeps
    only a model's import path and imports it again to instantiate it, which would give the
    unbound class; these settings hand MLServer the bound class itself."""

    _bound: Any = PrivateAttr(default=None)

    @classmethod
    def of(cls, runtime: type[MLModel], **settings: Any) -> "BoundModelSettings":
        made = cls(implementation=runtime, **settings)
        made._bound = runtime
        return made

    @property
    def implementation(self) -> type[MLModel]:
        return self._bound if self._bound is not None else super().implementation


def runtimes_for(plane: ServingPlane) -> "Runtimes":
    """The runtime classes bound to ``plane`` (no process-wide plane: two planes in one process,
    as tests build, never share one)."""

    def bound(cls: type[_PlaneRuntime]) -> Any:
        return type(cls.__name__, (cls,), {"plane": plane, "__module__": cls.__module__})

    return Runtimes(bound(RouterRuntime), bound(VersionRuntime), bound(ExplainerRuntime))


ROUTER_MODEL = "churn-router"  # the V2 model name of the router runtime

DATATYPES = {"integer": "INT64", "number": "FP64", "boolean": "BOOL", "category": "BYTES"}


def input_metadata(contract: Contract) -> list[MetadataTensor]:
    """The V2 inputs of ``contract``: one per feature, named and typed, one value per record."""
    return [
        MetadataTensor(name=feature.name, datatype=DATATYPES[feature.kind], shape=[-1])
        for feature in contract.features
    ]


_INTEGERS = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
_FLOATS = {"FP16", "FP32", "FP64"}


def invalid_input(message: str) -> MLServerError:
    """Bad input, as MLServer raises it: HTTP 422, gRPC INVALID_ARGUMENT."""
    return MLServerError(message, 422)


def _fits(datatype: str, value: Any) -> bool:
    if datatype == "BYTES":
        return isinstance(value, str | bytes)
    if datatype == "BOOL":
        return isinstance(value, bool)
    if isinstance(value, bool):  # a bool is an int to Python, never a number here
        return False
    if datatype in _INTEGERS:
        return isinstance(value, int)
    return datatype in _FLOATS and isinstance(value, int | float)


def _kind(datatype: str) -> str:
    if datatype in _INTEGERS:
        return "integers"
    if datatype in _FLOATS:
        return "numbers"
    return "strings" if datatype == "BYTES" else "booleans"


def _check_input(item: RequestInput) -> list[Any]:
    """The elements of one input, flat, once its shape matches its data and every value
    its datatype (MLServer's codecs fail with a 500 on a string in an INT64 input)."""
    datatype = item.datatype.value if isinstance(item.datatype, Datatype) else str(item.datatype)
    data = item.data.root if isinstance(item.data, TensorData) else item.data
    if not isinstance(data, list):
        raise invalid_input(
            f"input {item.name!r}: data must be an array, not {type(data).__name__}"
        )
    return _checked(item.name, datatype, list(item.shape), _flat(data))


def _json_input(item: dict[str, Any]) -> list[Any]:
    """:func:`_check_input` for one input of a REST request's JSON in the plain form
    :func:`serving.rest_message.plain_inputs` takes (MLServer's request model would hold the
    same name, shape, datatype and data)."""
    return _checked(item["name"], item["datatype"], list(item["shape"]), _flat(item["data"]))


def _flat(data: list[Any]) -> list[Any]:
    """Flat or nested arrays, flattened in row-major order without recursion."""
    values: list[Any] = []
    nested = [iter(data)]
    while nested:
        for value in nested[-1]:
            if isinstance(value, list):
                nested.append(iter(value))
                break
            values.append(value)
        else:
            nested.pop()
    return values


def _checked(name: str, datatype: str, shape: list[int], values: list[Any]) -> list[Any]:
    """``values`` (one input's elements, flat) once ``shape`` holds exactly them and each
    fits ``datatype``; BYTES elements as text."""
    if any(size < 0 for size in shape):
        raise invalid_input(f"input {name!r}: shape {shape} is negative")
    if prod(shape) != len(values):
        raise invalid_input(
            f"input {name!r}: shape {shape} says {prod(shape)} elements, the data has {len(values)}"
        )
    for index, value in enumerate(values):
        if not _fits(datatype, value):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else f"{shown[:59]}…"
            raise invalid_input(
                f"input {name!r} ({datatype}): element {index} is {shown} "
                f"({type(value).__name__}); {datatype} takes {_kind(datatype)}"
            )
    if datatype == "BYTES":
        for index, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    values[index] = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise invalid_input(
                        f"input {name!r} (BYTES): element {index} is not UTF-8 text: {exc}"
                    ) from None
    return values


def _message_input(tensor: pb.ModelInferRequest.InferInputTensor) -> list[Any]:
    """One protobuf input's elements, checked as :func:`_check_input` checks a decoded one:
    the values of its first set ``contents`` field, as MLServer's converter takes them."""
    fields = tensor.contents.ListFields()
    values = list(fields[0][1]) if fields else []
    return _checked(tensor.name, tensor.datatype, list(tensor.shape), values)


def batch_from_request(payload: InferenceRequest, contract: Contract) -> Batch:
    """The request's records checked against ``contract``: per-feature inputs as columns, or a
    ``records`` input of JSON objects row by row."""
    if not payload.inputs:
        raise invalid_input("the request has no inputs: send one per feature, or 'records'")
    return _batch([item.name for item in payload.inputs], payload.inputs, _check_input, contract)


def batch_from_json(inputs: list[dict[str, Any]], contract: Contract) -> Batch:
    """:func:`batch_from_request` straight from a REST request's ``inputs`` as parsed JSON, in
    the plain form :func:`serving.rest_message.plain_inputs` takes: the same checks and errors,
    without building MLServer's request model first."""
    if not inputs:
        raise invalid_input("the request has no inputs: send one per feature, or 'records'")
    return _batch([item["name"] for item in inputs], inputs, _json_input, contract)


def batch_from_message(request: pb.ModelInferRequest, contract: Contract) -> Batch:
    """:func:`batch_from_request` straight from a gRPC request whose tensors carry their values
    in ``contents`` (no ``raw_input_contents``): the same checks and errors, without building
    MLServer's request model first."""
    if not request.inputs:
        raise invalid_input("the request has no inputs: send one per feature, or 'records'")
    return _batch([t.name for t in request.inputs], request.inputs, _message_input, contract)


def _batch[T](
    names: list[str], inputs: Iterable[T], values_of: Callable[[T], list[Any]], contract: Contract
) -> Batch:
    if len(set(names)) < len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise invalid_input(f"inputs named more than once: {', '.join(repeated)}")
    columns = {name: values_of(item) for name, item in zip(names, inputs, strict=True)}
    lengths = {name: len(values) for name, values in columns.items()}
    if not any(lengths.values()):
        raise invalid_input(f"the request holds no records: every input is empty {lengths}")
    if names == ["records"]:
        return validate_records(_records(columns["records"]), contract)
    if "records" in names:
        raise invalid_input("send either a single 'records' input or one input per feature")
    if len(set(lengths.values())) > 1:
        raise invalid_input(f"inputs have different lengths: {lengths}")
    unknown = [name for name in names if name not in contract.names and name not in ID_FIELDS]
    if unknown:
        raise invalid_input(
            f"unknown inputs {', '.join(unknown)}; the model's inputs: "
            f"{', '.join((*contract.names, *ID_FIELDS))}"
        )
    return validate_columns(columns, contract)


def _router_outputs(predictions: list[Prediction]) -> list[tuple[str, str, list[Any]]]:
    """The router's outputs ``(name, datatype, values)``: probability, version, arm, request id,
    and the outlier score when every record has one."""
    outputs: list[tuple[str, str, list[Any]]] = [
        ("probability", "FP64", [p.probability for p in predictions]),
        ("model_version", "BYTES", [p.model_version for p in predictions]),
        ("arm", "BYTES", [p.arm for p in predictions]),
        ("request_id", "BYTES", [p.request_id for p in predictions]),
    ]
    if all(p.outlier_score is not None for p in predictions):
        outputs.append(("outlier_score", "FP64", [p.outlier_score for p in predictions]))
    return outputs


_CONTENTS = {"FP64": "fp64_contents", "BYTES": "bytes_contents"}
# The content type MLServer's codecs give an output: NumpyCodec (FP64), StringCodec (BYTES).
OUTPUT_CONTENT_TYPES = {"FP64": "np", "BYTES": "str"}


def response_message(
    request_id: str, model: str, version: str, outputs: Sequence[tuple[str, str, Sequence[Any]]]
) -> pb.ModelInferResponse:
    """The gRPC response MLServer's converter makes of a response whose outputs were encoded by
    ``NumpyCodec`` (FP64) and ``StringCodec`` (BYTES, text encoded as UTF-8): each output
    ``(name, datatype, values)`` of shape ``[n, 1]`` with its codec's content type."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, datatype, values in outputs:
        tensor = response.outputs.add(name=name, datatype=datatype, shape=(len(values), 1))
        tensor.parameters["content_type"].string_param = OUTPUT_CONTENT_TYPES[datatype]
        if datatype == "BYTES":
            values = [v.encode() for v in values]
        getattr(tensor.contents, _CONTENTS[datatype]).extend(values)
    return response


def _records(raws: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for raw in raws:
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise invalid_input(f"records: not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise invalid_input("records: each element must be a JSON object")
        rows.append(row)
    return rows


def _fail(exc: ServingError) -> MLServerError:
    return MLServerError(str(exc), exc.status_code)


class RouterRuntime(_PlaneRuntime):
    """Routes each record by the router policy; returns probability, version and arm."""

    async def load(self) -> bool:
        self.served  # noqa: B018 (a runtime without a plane fails to load, with the reason)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        plane = self.served
        predictions = await self._routed(lambda: batch_from_request(payload, plane.contract))
        outputs = [
            NumpyCodec.encode_output(name, np.array(values, dtype=np.float64))
            if datatype == "FP64"
            else StringCodec.encode_output(name, values)
            for name, datatype, values in _router_outputs(predictions)
        ]
        return InferenceResponse(id=payload.id, model_name=self.name, outputs=outputs)

    async def infer_message(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """:meth:`predict` for a gRPC request without raw contents, protobuf in and out: the
        same checks, routing and response (:func:`response_message`), without MLServer's
        request and response models in between."""
        plane = self.served
        predictions = await self._routed(lambda: batch_from_message(request, plane.contract))
        return response_message(request.id, self.name, "", _router_outputs(predictions))

    async def infer_json(self, inputs: list[dict[str, Any]]) -> list[tuple[str, str, list[Any]]]:
        """:meth:`predict` for a REST request's ``inputs`` as parsed JSON (the plain form
        :func:`serving.rest_message.plain_inputs` takes): the same checks and routing, and the
        outputs ``(name, datatype, values)`` :meth:`predict` encodes (its FP64 values are
        already Python floats)."""
        plane = self.served
        return _router_outputs(await self._routed(lambda: batch_from_json(inputs, plane.contract)))

    async def _routed(self, batch: Callable[[], Batch]) -> list[Prediction]:
        plane = self.served
        try:
            return await plane.scored(lambda: plane.predict(batch()))
        except ServingError as exc:
            raise _fail(exc) from None


class VersionRuntime(_PlaneRuntime):
    """One registered version (``parameters.version``), scored directly."""

    async def load(self) -> bool:
        # Verifying and loading artefacts reads files: off the loop, as an admin's reload
        # happens while serving.
        await asyncio.to_thread(self.served.load, self.version or "")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        probabilities = await self._scored(lambda contract: batch_from_request(payload, contract))
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output("probability", probabilities.astype(np.float64))],
        )

    async def infer_message(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """:meth:`predict` for a gRPC request without raw contents, protobuf in and out."""
        probabilities = await self._scored(lambda contract: batch_from_message(request, contract))
        outputs = [("probability", "FP64", probabilities.astype(np.float64).tolist())]
        return response_message(request.id, self.name, self.version or "", outputs)

    async def _scored(self, batch: Callable[[Contract], Batch]) -> np.ndarray:
        plane, version = self.served, self.version or ""
        try:
            return await plane.scored(
                lambda: plane.predict_version(version, batch(plane.contract_of(version)))
            )
        except ServingError as exc:
            raise _fail(exc) from None


class ExplainerRuntime(_PlaneRuntime):
    """SHAP (default) or, with request ``parameters.method = "anchors"``, Alibi anchor
    explanations, one JSON string output per record."""

    async def load(self) -> bool:
        self.served  # noqa: B018 (a runtime without a plane fails to load, with the reason)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        plane = self.served
        method = getattr(payload.parameters, "method", None) if payload.parameters else None
        if method not in (None, "shap", "anchors"):
            raise invalid_input(f"parameters.method must be 'shap' or 'anchors', not {method!r}")
        try:
            batch = await plane.scored(lambda: batch_from_request(payload, plane.contract))
            rows = batch.rows()
            if method == "anchors":
                explanations = [await plane.explain_anchors(row) for row in rows]
            else:
                explanations = await plane.explained(lambda: [plane.explain(row) for row in rows])
        except ServingError as exc:
            raise _fail(exc) from None
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            outputs=[
                StringCodec.encode_output(
                    "explanation", [orjson.dumps(e).decode() for e in explanations]
                )
            ],
        )


class Runtimes(NamedTuple):
    """The runtime classes of one plane (:func:`runtimes_for`)."""

    router: type[RouterRuntime]
    version: type[VersionRuntime]
    explainer: type[ExplainerRuntime]
