"""Batch decoding of customer events (features by column) agrees with the message model row by
row: the same verdict, the same canonical row, the same dead-letter reason."""

import random

import orjson
import pytest

from churn_assets.batch_decode import decode_batch, decode_customer_events
from churn_assets.contract import contract_from_dict
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


# --- whole batches of every data topic (decode_batch): Arrow's parser, then the row decoders ---

PREDICTION = {
    "schema_version": 1,
    "request_id": "r-1",
    "customer_id": "c-1",
    "model_name": "churn",
    "model_version": "v1",
    "arm": "primary",
    "score": 0.25,
    "latency_ms": 1.5,
    "status": "ok",
    "error": None,
    "features": {**DOCUMENTED_REQUEST, "monthly_charges": 80},
    "predicted_at": "2026-06-30T12:00:00.123456Z",
}
FEEDBACK = {
    "schema_version": 1,
    "event_id": "f-1",
    "customer_id": "c-1",
    "request_id": "r-1",
    "churned": True,
    "outcome_time": "2026-06-30T12:00:00+02:00",
    "observed_at": "2026-07-01T00:00:00Z",
}
COMMON_VARIANTS = [
    {},
    {"schema_version": None},
    {"schema_version": 1.0},
    {"unknown": None},
    {"customer_id": None},
    {"customer_id": "ü-1"},
    {"customer_id": "a\tb"},
    {"customer_id": "x" * 129},
]
TIME_VARIANTS = [
    "2026-02-30T00:00:00Z",
    "2026-01-01T23:59:60Z",
    "2026-01-01 00:00:00Z",
    "2026-01-01T00:00:00.1234567Z",
    "2026-01-01T00:00:00-05:30",
    "2026-01-01T00:00:00",
    "1 Jan 2026",
    None,
    5,
]
TOPIC_CASES = {
    Topics.PREDICTIONS: (
        PREDICTION,
        "predicted_at",
        [
            {"request_id": ""},
            {"arm": "Primary"},
            {"score": None},
            {"score": 1.5},
            {"score": True},
            {"score": "0.5"},
            {"score": 1},
            {"latency_ms": -1},
            {"latency_ms": 1e300},
            {"status": "error", "error": ""},
            {"error": "e" * 2_001},
            {"model_name": ""},
            {"model_version": "v" * 65},
            {"features": None},
            {"features": {**DOCUMENTED_REQUEST, "contract_type": "three year"}},
            {"features": {**DOCUMENTED_REQUEST, "customer_tenure": 12.0}},
            {"features": {**DOCUMENTED_REQUEST, "extra": 1}},
            {"features": {"customer_tenure": 1}},
            {"features": 5},
        ],
    ),
    Topics.FEEDBACK: (
        FEEDBACK,
        "observed_at",
        [
            {"churned": 1},
            {"churned": None},
            {"churned": "true"},
            {"request_id": None},
            {"request_id": "r\u200b"},
        ],
    ),
    Topics.CUSTOMERS: (GOOD, "event_time", VARIANTS),
}


def landed_row(topic, raw, contract):
    """The row decoder's verdict, in the columns a landed row has."""
    try:
        message = decode_message(topic, raw, contract)
    except MessageError as exc:
        return exc
    row = message.model_dump()
    row.pop("schema_version")
    if row.get("features") is not None:
        row["features"] = orjson.dumps(row["features"]).decode()
    return row


def topic_payloads(topic, contract_extra=None):
    good, time_field, variants = TOPIC_CASES[topic]
    good = {**good, **(contract_extra or {})}
    changes = [*COMMON_VARIANTS, *variants, *({time_field: t} for t in TIME_VARIANTS)]
    raws = [orjson.dumps({**good, **change}) for change in changes]
    raws += [
        orjson.dumps(good, option=orjson.OPT_INDENT_2),  # valid JSON over several lines
        orjson.dumps(good) + b" " + orjson.dumps(good),  # two objects in one value
        orjson.dumps(good).replace(b'"schema_version"', b'"schema_version":1,"schema_version"'),
        orjson.dumps(good).replace(b"}", b',"k":"\\ud800"}', 1),
        b" " + orjson.dumps(good),
        b"",
        None,
        b"not json",
        b"{\xff}",
        b"[1, 2]",
    ]
    return raws


def assert_batch_agrees(topic, raws, contract):
    """``raws`` as one batch, and each raw as a batch of its own (where the fast path judges
    every message Arrow parses), agree with the row decoder."""
    for raw in raws:
        assert_one_batch_agrees(topic, [raw], contract)
    return assert_one_batch_agrees(topic, raws, contract)


def assert_one_batch_agrees(topic, raws, contract):
    batch = decode_batch(topic, raws, contract)
    landed = dict(zip(batch.positions.tolist(), batch.rows.to_pylist(), strict=True))
    assert set(landed).isdisjoint(batch.errors)
    assert set(landed) | set(batch.errors) == set(range(len(raws)))
    for position, raw in enumerate(raws):
        expected = landed_row(topic, raw, contract)
        if isinstance(expected, MessageError):
            assert str(batch.errors.get(position)) == str(expected), raw
        else:
            assert landed.get(position) == expected, raw
    return batch


@pytest.mark.parametrize("topic", [Topics.CUSTOMERS, Topics.PREDICTIONS, Topics.FEEDBACK])
def test_a_batch_gets_the_row_decoders_verdicts_rows_and_reasons(topic):
    raws = topic_payloads(topic)
    # Enough good messages around the bad ones that the fast path splits its slices.
    good = orjson.dumps(TOPIC_CASES[topic][0])
    mixed = [good] * 150 + raws + [good] * 150
    batch = assert_batch_agrees(topic, mixed, DEFAULT_CONTRACT)
    assert len(batch.rows) > 300
    # Most of the good messages took the fast path: the bad ones cost a small slice each.
    assert batch.slow < len(raws) * 64


def test_a_clean_batch_takes_the_fast_path_only():
    raws = [
        orjson.dumps({**PREDICTION, "request_id": f"r-{i}", "score": i / 1000}) for i in range(500)
    ]
    batch = assert_batch_agrees(Topics.PREDICTIONS, raws, DEFAULT_CONTRACT)
    assert batch.slow == 0 and len(batch.rows) == 500


@pytest.mark.parametrize("separator", [b"\n", b"\r", b"\r\n"])
def test_values_over_several_lines_cost_no_split(separator):
    """Values spread over lines: where one breaks the batch's parse (two objects, one a line),
    the values holding line breaks are judged row by row and the rest of the batch is parsed
    again at once, without halving it."""
    raws = [
        orjson.dumps({**PREDICTION, "request_id": f"r-{i}", "score": i / 1000}) for i in range(500)
    ]
    for position in (0, 499):
        raws[position] = orjson.dumps(
            {**PREDICTION, "request_id": f"r-{position}"}, option=orjson.OPT_INDENT_2
        ).replace(b"\n", separator)
    raws[250] = raws[250] + separator + raws[251]
    batch = assert_one_batch_agrees(Topics.PREDICTIONS, raws, DEFAULT_CONTRACT)
    assert batch.slow == 3 and len(batch.rows) == 499 and list(batch.errors) == [250]


def test_contract_features_with_fills_and_booleans_agree_row_by_row():
    contract = extended_contract()
    raw = contract.as_dict()
    for feature in raw["features"]:
        if feature["name"] in ("monthly_charges", "payment_method", "senior_citizen"):
            feature["missing"] = "median" if feature["kind"] == "number" else "most_frequent"
    contract = contract_from_dict(raw)
    extra = {"senior_citizen": False, "tech_support": "No internet service"}
    raws = topic_payloads(Topics.CUSTOMERS, extra)
    raws += [
        orjson.dumps({**GOOD, **extra, "monthly_charges": None, "senior_citizen": None}),
        orjson.dumps({k: v for k, v in {**GOOD, **extra}.items() if k != "payment_method"}),
        orjson.dumps({**GOOD, **extra, "senior_citizen": 0}),
    ]
    assert_batch_agrees(Topics.CUSTOMERS, raws, contract)
    prediction = {**PREDICTION, "features": {**PREDICTION["features"], **extra}}
    raws = [
        orjson.dumps(prediction),
        orjson.dumps(
            {**prediction, "features": {**prediction["features"], "senior_citizen": None}}
        ),
        orjson.dumps({**prediction, "features": {**prediction["features"], "tech_support": 1}}),
    ]
    assert_batch_agrees(Topics.PREDICTIONS, raws, contract)


def test_random_corruptions_agree_row_by_row():
    """Seeded byte-level corruptions of good messages of every topic: the batch decoder and the
    row decoder never disagree, whatever the corruption makes of a message."""
    rng = random.Random(15)
    for topic in (Topics.CUSTOMERS, Topics.PREDICTIONS, Topics.FEEDBACK):
        good = orjson.dumps(TOPIC_CASES[topic][0])
        raws = []
        for _ in range(400):
            raw = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(len(raw))] = rng.choice(b'0123456789{}[]",:.-+eE tfnulZT\\ab')
            raws.append(bytes(raw))
        assert_batch_agrees(topic, raws, DEFAULT_CONTRACT)
