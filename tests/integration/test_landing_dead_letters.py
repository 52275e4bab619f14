"""Half of 1,000 records are malformed or invalid: good ones land, bad ones go to the DLQ."""

import pytest

from churn_assets.kafka import make_producer, scan_topic
from churn_assets.landing import Lander
from churn_assets.schemas import Topics, encode_message
from churn_assets.warehouse import connect
from tests.integration.landing_helpers import corruptions, simulated_customer_events

pytestmark = pytest.mark.integration


def test_bad_records_go_to_the_dlq_without_blocking_the_partition(broker_settings):
    payloads = simulated_customer_events(500, seed=11)
    producer = make_producer(broker_settings)
    expected_reasons = []
    good_ids = []
    for i, payload in enumerate(payloads):
        # Alternate bad and good records on ONE partition, so a blocked partition would show.
        raw, reason = corruptions(payload)[i % 12]
        producer.produce(Topics.CUSTOMERS, partition=0, key=b"bad", value=raw)
        expected_reasons.append(reason)
        producer.produce(
            Topics.CUSTOMERS,
            partition=0,
            key=payload["customer_id"].encode(),
            value=encode_message(Topics.CUSTOMERS, payload),
        )
        good_ids.append(payload["event_id"])
    assert producer.flush(30) == 0

    report = Lander(broker_settings, Topics.CUSTOMERS).run()
    assert report.reached_eof
    assert (report.rows_landed, report.dead_lettered) == (500, 500)

    with connect(broker_settings.warehouse_path, read_only=True) as con:
        landed = con.execute(
            "SELECT event_id, kafka_offset FROM landed_customer_events ORDER BY kafka_offset"
        ).fetchall()
        dead = con.execute(
            "SELECT kafka_offset, reason, raw_value FROM dead_letters ORDER BY kafka_offset"
        ).fetchall()
        stored = con.execute(
            "SELECT next_offset FROM landing_offsets WHERE topic = ? AND kafka_partition = 0",
            [Topics.CUSTOMERS],
        ).fetchall()[0]

    assert [event_id for event_id, _ in landed] == good_ids
    assert [offset for _, offset in landed] == list(range(1, 1000, 2))
    assert [offset for offset, _, _ in dead] == list(range(0, 1000, 2))
    for (_, reason, _), expected in zip(dead, expected_reasons, strict=True):
        assert expected in reason, (expected, reason)
    assert dead[0][2].startswith("\x00\ufffdnot json")  # raw bytes kept (undecodable ones replaced)
    assert dead[3][2] is None  # the null-valued message
    assert stored == (1000,)

    dlq = scan_topic(broker_settings, Topics.DEAD_LETTER)
    assert sum(e.messages for e in dlq) == 500

    # Replaying the landing finds nothing new and changes nothing.
    again = Lander(broker_settings, Topics.CUSTOMERS).run()
    assert (again.rows_landed, again.dead_lettered) == (0, 0)
