"""MLServer runtimes (Open Inference / V2 protocol over REST and gRPC) backed by the plane.

* ``churn-router``: applies the router policy (shadow / canary / blue-green) and mirrors.
* ``churn`` with versions ``v1``, ``v2``, ...: one registered version, no routing.
* ``churn-explainer``: SHAP contributions for the routed version.

Requests carry either one named input per feature (MLServer's pandas codec; optional
``customer_id`` and ``request_id`` columns) or a single ``records`` input of JSON strings, one
record each. Validation errors become MLServer errors with status 422, which the server maps to
gRPC INVALID_ARGUMENT.
"""

from typing import Any

import numpy as np
import orjson
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, PandasCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse

from serving.errors import ServingError
from serving.plane import ServingPlane

__all__ = ["ExplainerRuntime", "RouterRuntime", "VersionRuntime", "install_plane"]

_PLANE: ServingPlane | None = None


def install_plane(plane: ServingPlane | None) -> None:
    """Make the process's data plane available to the runtimes MLServer instantiates."""
    global _PLANE
    _PLANE = plane


def _plane() -> ServingPlane:
    if _PLANE is None:
        raise MLServerError("serving plane not installed; start with `churn serve`", 503)
    return _PLANE


def _native(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def records_from_request(payload: InferenceRequest) -> list[dict[str, Any]]:
    """Rows from either codec: per-feature inputs (pandas) or a ``records`` JSON input."""
    names = [item.name for item in payload.inputs]
    if names == ["records"]:
        rows = []
        for raw in StringCodec.decode_input(payload.inputs[0]):
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise MLServerError(f"records: not valid JSON: {exc}", 422) from None
            if not isinstance(row, dict):
                raise MLServerError("records: each element must be a JSON object", 422)
            rows.append(row)
        return rows
    if "records" in names:
        raise MLServerError("send either a single 'records' input or one input per feature", 422)
    lengths = {item.name: int(np.prod(item.shape)) for item in payload.inputs}
    if len(set(lengths.values())) > 1:
        raise MLServerError(f"inputs have different lengths: {lengths}", 422)
    frame = PandasCodec.decode_request(payload)
    return [{key: _native(value) for key, value in row.items()} for row in frame.to_dict("records")]


def _fail(exc: ServingError) -> MLServerError:
    return MLServerError(str(exc), exc.status_code)


class RouterRuntime(MLModel):
    """Routes each record by the router policy; returns probability, version and arm."""

    async def load(self) -> bool:
        _plane()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            predictions = _plane().predict(records_from_request(payload))
        except ServingError as exc:
            raise _fail(exc) from None
        outputs = [
            NumpyCodec.encode_output(
                "probability", np.array([p.probability for p in predictions], dtype=np.float64)
            ),
            StringCodec.encode_output("model_version", [p.model_version for p in predictions]),
            StringCodec.encode_output("arm", [p.arm for p in predictions]),
            StringCodec.encode_output("request_id", [p.request_id for p in predictions]),
        ]
        if all(p.outlier_score is not None for p in predictions):
            outputs.append(
                NumpyCodec.encode_output(
                    "outlier_score", np.array([p.outlier_score for p in predictions])
                )
            )
        return InferenceResponse(id=payload.id, model_name=self.name, outputs=outputs)


class VersionRuntime(MLModel):
    """One registered version (``parameters.version``), scored directly."""

    async def load(self) -> bool:
        _plane().load(self.version or "")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            probabilities = _plane().predict_version(
                self.version or "", records_from_request(payload)
            )
        except ServingError as exc:
            raise _fail(exc) from None
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output("probability", probabilities.astype(np.float64))],
        )


class ExplainerRuntime(MLModel):
    """SHAP (default) or, with request ``parameters.method = "anchors"``, Alibi anchor
    explanations, one JSON string output per record."""

    async def load(self) -> bool:
        _plane()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        plane = _plane()
        method = getattr(payload.parameters, "method", None) if payload.parameters else None
        if method not in (None, "shap", "anchors"):
            raise MLServerError(
                f"parameters.method must be 'shap' or 'anchors', not {method!r}", 422
            )
        try:
            rows = records_from_request(payload)
            if method == "anchors":
                explanations = [await plane.explain_anchors(row) for row in rows]
            else:
                explanations = [plane.explain(row) for row in rows]
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
