"""The request a new user copies from a CRM, verbatim: categories spelled the export's way are
scored, explained, and mirrored to ml.predictions under their canonical names."""

import json
import time
import urllib.request

import orjson
import pytest
from confluent_kafka import TopicPartition

from churn_assets.config import load_settings
from churn_assets.kafka import make_consumer, topic_partitions
from churn_assets.schemas import Topics
from tests.serving_fixtures import served_with_broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOCUMENTED = b"""{
  "customer_tenure": 24, "monthly_charges": 79.99, "total_charges": 1919.76,
  "contract_type": "Two year", "payment_method": "Credit card", "internet_service": "Fiber optic",
  "support_tickets": 2, "login_frequency": 5.2}"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-spellings")
    with served_with_broker(root) as running:
        yield running, load_settings(root / "config" / "config.yaml")


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def mirrored(settings, request_id: str, timeout_s: float = 20.0) -> dict:
    """The primary prediction event of ``request_id`` on ml.predictions (assigned partitions
    from offset 0: no group rebalance to wait for)."""
    partitions = topic_partitions(settings, Topics.PREDICTIONS)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer = make_consumer(settings, group_id=f"test-{time.time_ns()}")
        try:
            consumer.assign([TopicPartition(Topics.PREDICTIONS, p, 0) for p in partitions])
            at_eof: set[int] = set()
            while len(at_eof) < len(partitions):
                for message in consumer.consume(1_000, 0.5):
                    if message.error() is not None:
                        at_eof.add(message.partition())
                        continue
                    event = orjson.loads(message.value())
                    if event["request_id"] == request_id and event["arm"] == "primary":
                        return event
        finally:
            consumer.close()
        time.sleep(0.5)
    raise AssertionError(f"no mirrored prediction {request_id} within {timeout_s} s")


def test_the_documented_request_is_scored_explained_and_mirrored_canonically(served):
    server, settings = served
    status, prediction = post(f"{server.http}/predict", DOCUMENTED)
    assert status == 200 and 0 <= prediction["probability"] <= 1, prediction
    status, explanation = post(f"{server.http}/explain", DOCUMENTED)
    assert status == 200 and explanation["top_contributions"], explanation
    event = mirrored(settings, prediction["request_id"])
    assert {
        k: event["features"][k] for k in ("contract_type", "payment_method", "internet_service")
    } == {
        "contract_type": "two_year",
        "payment_method": "credit_card",
        "internet_service": "fiber_optic",
    }
    for spelling in ("two year", "Two_Year", "TWO-YEAR"):
        body = DOCUMENTED.replace(b'"Two year"', json.dumps(spelling).encode())
        assert post(f"{server.http}/predict", body)[1]["probability"] == prediction["probability"]
