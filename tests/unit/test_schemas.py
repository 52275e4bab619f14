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


def feedback_payload(**changes):
    payload = {
        "schema_version": 1,
        "event_id": "fb-1",
        "customer_id": "C0000001",
        "request_id": None,
        "churned": True,
        "outcome_time": "2026-01-02T10:00:00Z",
        "observed_at": "2026-01-02T11:00:00Z",
    }
    payload.update(changes)
    return payload


@pytest.mark.parametrize(
    ("topic", "payload", "field"),
    [
        # A coerced value used to land silently: each is now a dead letter with its reason.
        (Topics.CUSTOMERS, customer_payload(customer_tenure=True), "customer_tenure"),
        (Topics.CUSTOMERS, customer_payload(customer_tenure="12"), "customer_tenure"),
        (Topics.CUSTOMERS, customer_payload(customer_tenure=12.5), "customer_tenure"),
        (Topics.CUSTOMERS, customer_payload(support_tickets=False), "support_tickets"),
        (Topics.CUSTOMERS, customer_payload(login_frequency=False), "login_frequency"),
        (Topics.CUSTOMERS, customer_payload(monthly_charges="50"), "monthly_charges"),
        (Topics.CUSTOMERS, customer_payload(event_time=0), "event_time"),
        (Topics.CUSTOMERS, customer_payload(event_time=1767261600.0), "event_time"),
        (Topics.CUSTOMERS, customer_payload(customer_id="C1\x00"), "customer_id"),
        (Topics.CUSTOMERS, customer_payload(customer_id="C1\nC2"), "customer_id"),
        (Topics.CUSTOMERS, customer_payload(customer_id="C1\u202egnp.exe"), "customer_id"),
        (Topics.CUSTOMERS, customer_payload(event_id="ev\u200b1"), "event_id"),
        (Topics.CUSTOMERS, customer_payload(customer_id="C" * 129), "customer_id"),
        (Topics.FEEDBACK, feedback_payload(churned=1), "churned"),
        (Topics.FEEDBACK, feedback_payload(churned="true"), "churned"),
        (Topics.FEEDBACK, feedback_payload(outcome_time=0), "outcome_time"),
        (Topics.FEEDBACK, feedback_payload(customer_id="C1\r"), "customer_id"),
    ],
)
def test_no_coercion_on_landing(topic, payload, field):
    with pytest.raises(MessageError, match=field):
        decode_message(topic, orjson.dumps(payload))


def test_printable_ids_in_any_script_are_kept():
    for customer_id in ("C 0001", "клиент-7", "顧客42", "a+b@example.com", "Ω≈ç√"):
        event = decode_message(
            Topics.CUSTOMERS, orjson.dumps(customer_payload(customer_id=customer_id))
        )
        assert event.customer_id == customer_id
    # JSON has one number type: 12.0 is the count 12 (12.5 is refused above), and a float
    # feature takes an integer as the number it is.
    event = decode_message(
        Topics.CUSTOMERS, orjson.dumps(customer_payload(customer_tenure=12.0, monthly_charges=70))
    )
    assert event.customer_tenure == 12 and isinstance(event.customer_tenure, int)
    assert event.monthly_charges == 70.0


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
