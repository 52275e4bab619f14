"""The gRPC message path (protobuf straight to columns and back) answers exactly what the path
through MLServer's request and response models answers: the same batch reaches the plane, the
same response message comes back, and a bad request fails with the same status and words."""

import asyncio
import math

import numpy as np
import pytest
from mlserver.errors import MLServerError
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.converters import ModelInferRequestConverter, ModelInferResponseConverter
from mlserver.settings import ModelParameters, ModelSettings

from churn_assets.schemas import DEFAULT_CONTRACT
from serving.plane import Prediction
from serving.runtime import runtimes_for
from tests.serving_fixtures import DOCUMENTED_REQUEST, infer_request

pytestmark = [
    pytest.mark.unit,
    # MLServer 1.7's converter (the model path compared against) uses pydantic's `construct`.
    pytest.mark.filterwarnings("ignore:The `construct` method is deprecated"),
]


class Plane:
    """Stands in for a ServingPlane: records each batch it is given and answers from it."""

    contract = DEFAULT_CONTRACT

    def __init__(self, outliers: bool = True) -> None:
        self.batches: list = []
        self.outliers = outliers

    async def scored(self, work):
        return work()

    def contract_of(self, version: str):
        return self.contract

    def predict(self, batch) -> list[Prediction]:
        self.batches.append(batch)
        return [
            Prediction(
                request_id=request_id or f"req-{index}",
                customer_id=customer_id,
                probability=0.125 * (index + 1),
                model_version="v1" if index % 2 else "v2",
                arm="champion" if index % 2 else "shadow-ü",
                outlier_score=0.5 + index if self.outliers else None,
                is_outlier=False if self.outliers else None,
                latency_ms=1.0,
            )
            for index, (customer_id, request_id) in enumerate(
                zip(batch.customer_ids, batch.request_ids, strict=True)
            )
        ]

    def predict_version(self, version: str, batch) -> np.ndarray:
        self.batches.append(batch)
        return np.linspace(0.1, 0.9, len(batch), dtype=np.float32)


def rows(n: int) -> list[dict]:
    return [
        {**DOCUMENTED_REQUEST, "customer_id": f"c-{i}", "monthly_charges": 50.0 + i}
        for i in range(n)
    ]


def runtime(plane: Plane, kind: str):
    classes = runtimes_for(plane)  # type: ignore[arg-type]
    cls = classes.router if kind == "router" else classes.version
    name = "churn-router" if kind == "router" else "churn"
    return cls(
        ModelSettings(name=name, implementation=cls, parameters=ModelParameters(version="v3"))
    )


def both_paths(kind: str, request: pb.ModelInferRequest, plane: Plane):
    """(message path's response, model path's response as MLServer's converter makes it)."""
    served = runtime(plane, kind)
    fast = asyncio.run(served.infer_message(request))
    payload = ModelInferRequestConverter.to_types(request)
    slow = ModelInferResponseConverter.from_types(asyncio.run(served.predict(payload)))
    return fast, slow


@pytest.mark.parametrize("kind", ["router", "version"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("request_id", ["", "abc-1"])
def test_the_message_path_answers_what_the_model_path_answers(kind, n, request_id):
    plane = Plane()
    request = infer_request(rows(n), model="churn-router" if kind == "router" else "churn")
    request.id = request_id
    fast, slow = both_paths(kind, request, plane)
    assert fast == slow, f"message path:\n{fast}\nmodel path:\n{slow}"
    assert len(fast.outputs[0].contents.fp64_contents) == n
    first, second = plane.batches
    assert (first.columns, first.customer_ids, first.request_ids) == (
        second.columns,
        second.customer_ids,
        second.request_ids,
    )
    assert first.customer_ids == [f"c-{i}" for i in range(n)]


def test_without_outlier_scores_neither_path_sends_the_output():
    fast, slow = both_paths("router", infer_request(rows(2)), Plane(outliers=False))
    assert fast == slow
    assert [o.name for o in fast.outputs] == ["probability", "model_version", "arm", "request_id"]


def bad_requests():
    wrong_type = infer_request(rows(1))
    wrong_type.inputs[1].contents.Clear()
    wrong_type.inputs[1].contents.fp64_contents.append(1.5)  # customer_tenure is INT64
    shape = infer_request(rows(2))
    shape.inputs[2].shape[:] = [3]
    lengths = infer_request(rows(2))
    del lengths.inputs[3].contents.fp64_contents[1]
    lengths.inputs[3].shape[:] = [1]
    unknown = infer_request(rows(1))
    extra = unknown.inputs.add(name="shoe_size", datatype="INT64", shape=[1])
    extra.contents.int64_contents.append(42)
    repeated = infer_request(rows(1))
    repeated.inputs.add().CopyFrom(repeated.inputs[1])
    empty = pb.ModelInferRequest(model_name="churn-router")
    no_values = infer_request(rows(1))
    for tensor in no_values.inputs:
        tensor.contents.Clear()
        tensor.shape[:] = [0]
    not_utf8 = infer_request(rows(1))
    not_utf8.inputs[0].contents.bytes_contents[0] = b"\xff\xfe"
    out_of_range = infer_request([{**rows(1)[0], "monthly_charges": -5.0}])
    not_finite = infer_request([{**rows(1)[0], "monthly_charges": math.inf}])
    records = pb.ModelInferRequest(model_name="churn-router")
    tensor = records.inputs.add(name="records", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"[1, 2]")
    return {
        "wrong-type": wrong_type,
        "shape": shape,
        "lengths": lengths,
        "unknown": unknown,
        "repeated": repeated,
        "empty": empty,
        "no-values": no_values,
        "not-utf8": not_utf8,
        "out-of-range": out_of_range,
        "not-finite": not_finite,
        "records-not-objects": records,
    }


@pytest.mark.parametrize("case", list(bad_requests()))
def test_a_bad_request_fails_alike_on_both_paths(case):
    request = bad_requests()[case]
    served = runtime(Plane(), "router")
    with pytest.raises(MLServerError) as fast:
        asyncio.run(served.infer_message(request))
    with pytest.raises(MLServerError) as slow:
        asyncio.run(served.predict(ModelInferRequestConverter.to_types(request)))
    assert (fast.value.status_code, str(fast.value)) == (slow.value.status_code, str(slow.value))
    assert fast.value.status_code == 422
