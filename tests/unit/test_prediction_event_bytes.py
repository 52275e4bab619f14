"""The mirror's directly encoded prediction events are the events the schema would give."""

from datetime import UTC, datetime

import orjson
import pytest

from churn_assets.contract import contract_from_dict
from churn_assets.schemas import DEFAULT_CONTRACT, Topics, decode_message, topic_schemas
from serving.mirror import prediction_event_bytes
from serving.plane import Prediction
from serving.requests import validate_records
from tests.serving_fixtures import DOCUMENTED_REQUEST, EXTENDED_REQUEST, extended_contract

pytestmark = pytest.mark.unit

EXTENDED = extended_contract()
AT = [datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC), datetime(2026, 11, 30, 12, 0, 1, 5, UTC)]


def prediction(**changes) -> Prediction:
    values = dict(
        request_id="req-1",
        customer_id="cust-9",
        probability=0.123456789,
        model_version="v3",
        arm="primary",
        outlier_score=None,
        is_outlier=None,
        latency_ms=0.4321,
    )
    return Prediction(**(values | changes))


CASES = [
    (DEFAULT_CONTRACT, DOCUMENTED_REQUEST, {}),
    (DEFAULT_CONTRACT, DOCUMENTED_REQUEST, {"customer_id": None, "arm": "shadow"}),
    (DEFAULT_CONTRACT, DOCUMENTED_REQUEST, {"probability": 1.0, "latency_ms": 0.0}),
    (DEFAULT_CONTRACT, DOCUMENTED_REQUEST, {"probability": 3.0e-7, "arm": "canary"}),
    (EXTENDED, EXTENDED_REQUEST, {}),
    (EXTENDED, {**EXTENDED_REQUEST, "tech_support": "YES", "senior_citizen": False}, {}),
]


@pytest.mark.parametrize("at", AT, ids=["whole-second", "microseconds"])
@pytest.mark.parametrize(("contract", "request_row", "changes"), CASES)
def test_the_bytes_are_the_schemas_event(contract, request_row, changes, at):
    features = validate_records([request_row], contract).features[0]
    answered = prediction(**changes)
    fast = prediction_event_bytes(answered, features, at, "churn")

    schema = topic_schemas(contract)[Topics.PREDICTIONS]
    expected = schema(
        request_id=answered.request_id,
        customer_id=answered.customer_id,
        model_name="churn",
        model_version=answered.model_version,
        arm=answered.arm,
        score=answered.probability,
        latency_ms=answered.latency_ms,
        status="ok",
        features=features,
        predicted_at=at,
    )
    # The consumers' decoder accepts the bytes and reads the very event the schema builds ...
    assert decode_message(Topics.PREDICTIONS, fast, contract) == expected
    # ... and the JSON is the schema's own, field for field.
    assert orjson.loads(fast) == orjson.loads(expected.model_dump_json())
    assert list(orjson.loads(fast)) == list(schema.model_fields)


def test_a_feature_the_contract_fills_travels_as_null():
    raw = DEFAULT_CONTRACT.as_dict()
    for entry in raw["features"]:
        if entry["name"] == "login_frequency":
            entry["missing"] = "median"
    contract = contract_from_dict(raw)
    missing = {k: v for k, v in DOCUMENTED_REQUEST.items() if k != "login_frequency"}
    features = validate_records([missing], contract).features[0]
    assert features["login_frequency"] is None
    fast = prediction_event_bytes(prediction(), features, AT[0], "churn")
    event = decode_message(Topics.PREDICTIONS, fast, contract)
    assert event.features.login_frequency is None
    assert orjson.loads(fast)["features"]["login_frequency"] is None
