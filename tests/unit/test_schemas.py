import math

import orjson
import pytest

from churn_assets.schemas import (
    CustomerEvent,
    MessageError,
    Topics,
    decode_message,
    encode_message,
)

pytestmark = pytest.mark.unit


def customer_payload(**changes):
    payload = {
        "schema_version": 1,
        "event_id": "ev-1",
        "customer_id": "C0000001",
        "event_time": "2026-01-01T10:00:00+00:00",
        "customer_tenure": 12,
        "monthly_charges": 70.5,
        "total_charges": 846.0,
        "contract_type": "month-to-month",
        "payment_method": "electronic_check",
        "internet_service": "fiber_optic",
        "support_tickets": 2,
        "login_frequency": 14.0,
    }
    payload.update(changes)
    return payload


def test_round_trip():
    raw = encode_message(Topics.CUSTOMERS, customer_payload())
    event = decode_message(Topics.CUSTOMERS, raw)
    assert isinstance(event, CustomerEvent)
    assert event.monthly_charges == 70.5
    assert event.event_time.utcoffset().total_seconds() == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (None, "empty message"),
        (orjson.dumps(customer_payload(schema_version=2)), "unsupported schema_version 2"),
        (orjson.dumps(customer_payload(colour="red")), "colour: Extra inputs are not permitted"),
        (orjson.dumps(customer_payload(monthly_charges="cheap")), "monthly_charges"),
        (orjson.dumps(customer_payload(customer_tenure=-1)), "customer_tenure"),
        (orjson.dumps(customer_payload(contract_type="forever")), "contract_type"),
        (orjson.dumps(customer_payload(event_time="2026-01-01T10:00:00")), "timezone"),
        (b'{"schema_version": 1, "monthly_charges": NaN}', "not valid JSON"),
    ],
)
def test_decode_rejects_with_reason(raw, reason):
    with pytest.raises(MessageError, match=reason):
        decode_message(Topics.CUSTOMERS, raw)


def test_missing_field_is_named():
    payload = customer_payload()
    del payload["support_tickets"]
    with pytest.raises(MessageError, match="support_tickets: Field required"):
        decode_message(Topics.CUSTOMERS, orjson.dumps(payload))


def test_encode_rejects_nan_and_infinity():
    for bad in (math.nan, math.inf):
        with pytest.raises(MessageError, match="login_frequency"):
            encode_message(Topics.CUSTOMERS, customer_payload(login_frequency=bad))


def test_model_for_the_wrong_topic_is_refused():
    event = CustomerEvent.model_validate(customer_payload())
    with pytest.raises(MessageError, match="cannot be sent to ml.feedback"):
        encode_message(Topics.FEEDBACK, event)


def test_unknown_topic():
    with pytest.raises(MessageError, match="no schema registered"):
        decode_message("nope", b"{}")
