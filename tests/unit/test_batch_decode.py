"""Batch decoding of customer events (features by column) agrees with the message model row by
row: the same verdict, the same canonical row, the same dead-letter reason."""

import orjson
import pytest

from churn_assets.batch_decode import decode_customer_events
from churn_assets.schemas import DEFAULT_CONTRACT, MessageError, Topics, decode_message
from tests.serving_fixtures import DOCUMENTED_REQUEST, extended_contract

pytestmark = pytest.mark.unit

GOOD = {
    "schema_version": 1,
    "event_id": "e-1",
    "customer_id": "c-1",
    "event_time": "2026-06-30T12:00:00+00:00",
    **DOCUMENTED_REQUEST,
}

VARIANTS = [
    {},
    {"customer_tenure": 12.0},
    {"customer_tenure": 12.5},
    {"customer_tenure": True},
    {"customer_tenure": "12"},
    {"customer_tenure": -1},
    {"customer_tenure": None},
    {"monthly_charges": False},
    {"monthly_charges": 20000.0},
    {"contract_type": "three year"},
    {"contract_type": 2},
    {"contract_type": None},
    {"event_id": ""},
    {"event_id": "a\u202eb"},
    {"event_time": 0},
    {"event_time": "2026-06-30T12:00:00"},
    {"schema_version": 2},
    {"unknown": 1},
    {"senior_citizen": True},
]


def payloads(extra=None):
    """The variants of GOOD (with ``extra`` fields), an infinity, and broken messages."""
    raws = [orjson.dumps({**GOOD, **(extra or {}), **change}) for change in VARIANTS]
    raws.append(raws[0].replace(b"79.99", b"1e400"))
    return [*raws, None, b"not json", b"[1, 2]", b'{"event_id": "e"}']


def row_by_row(raw, contract):
    try:
        message = decode_message(Topics.CUSTOMERS, raw, contract)
    except MessageError as exc:
        return exc
    row = message.model_dump()
    row.pop("schema_version")
    return row


@pytest.mark.parametrize("contract", [DEFAULT_CONTRACT, None], ids=["default", "extended"])
def test_every_message_gets_the_verdict_row_and_reason_of_the_message_model(contract):
    extra = None
    if contract is None:
        contract = extended_contract()
        extra = {"senior_citizen": False, "tech_support": "No internet service"}
    raws = payloads(extra)
    batch = decode_customer_events(raws, contract)
    assert len(batch) == len(raws)
    landed = 0
    for raw, got in zip(raws, batch, strict=True):
        expected = row_by_row(raw, contract)
        if isinstance(expected, MessageError):
            assert isinstance(got, MessageError), raw
            assert str(got) == str(expected)
        else:
            landed += 1
            assert got == expected, raw
    # GOOD and its 12.0 tenure; senior_citizen too where the contract has it.
    assert landed == (2 if extra is None else 3)
    good = batch[0]
    assert (good["contract_type"], good["internet_service"]) == ("two_year", "fiber_optic")
    assert isinstance(good["customer_tenure"], int) and good["event_time"].tzinfo is not None
