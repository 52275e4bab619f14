"""Half of 1,000 records are malformed or invalid: good ones land, bad ones go to the DLQ.

Dead letters are an outbox: the table row is the record, ``published_at`` is set once Kafka
confirmed the dead-letter topic has it, and a run republishes what was never confirmed.
"""

import logging
import os
import signal

import dagster as dg
import pytest

from churn_assets.broker import read_state
from churn_assets.definitions import defs
from churn_assets.kafka import make_producer, scan_topic
from churn_assets.landing import Lander, dead_letter_key
from churn_assets.resources import PlatformResource
from churn_assets.schemas import Topics, encode_message
from churn_assets.warehouse import connect, load_read_model
from sensors.landing import kafka_landing_sensor
from tests.integration.landing_helpers import (
    check_at_least_once,
    corruptions,
    produce_customer_events,
    read_topic_keys,
    simulated_customer_events,
)

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
    assert (report.dead_letters_published, report.dead_letters_pending) == (500, 0)

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
        unpublished = con.execute(
            "SELECT count(*) FROM dead_letters WHERE published_at IS NULL"
        ).fetchall()[0]

    assert [event_id for event_id, _ in landed] == good_ids
    assert [offset for _, offset in landed] == list(range(1, 1000, 2))
    assert [offset for offset, _, _ in dead] == list(range(0, 1000, 2))
    for (_, reason, _), expected in zip(dead, expected_reasons, strict=True):
        assert expected in reason, (expected, reason)
    assert dead[0][2].startswith("\x00\ufffdnot json")  # raw bytes kept (undecodable ones replaced)
    assert dead[3][2] is None  # the null-valued message
    assert stored == (1000,)
    assert unpublished == (0,)

    dlq = scan_topic(broker_settings, Topics.DEAD_LETTER)
    assert sum(e.messages for e in dlq) == 500

    # Replaying the landing finds nothing new and changes nothing.
    again = Lander(broker_settings, Topics.CUSTOMERS).run()
    assert (again.rows_landed, again.dead_lettered) == (0, 0)
    assert (again.dead_letters_republished, again.replayed) == (0, 0)


def test_an_unreachable_dead_letter_topic_leaves_them_pending_for_the_next_run(
    broker_settings, settings_path, caplog
):
    """The broker stops answering right after the batch's commit: the dead letters in flight
    are never confirmed, so they stay unpublished, the run says how many, the sensor asks for a
    run, and the next run (broker back) republishes every one."""
    settings = broker_settings
    produce_customer_events(settings, 100, seed=12)
    producer = make_producer(settings)
    for i, payload in enumerate(simulated_customer_events(60, seed=13)):
        raw, _ = corruptions(payload)[i % 12]
        producer.produce(Topics.CUSTOMERS, key=f"bad-{i}".encode(), value=raw)
    assert producer.flush(30) == 0
    broker_pid = read_state(settings.run_dir).pid

    def pause_broker(report) -> None:  # after the only batch's commit and its DLQ produce
        os.kill(broker_pid, signal.SIGSTOP)

    try:
        with caplog.at_level(logging.WARNING, logger="churn_assets.landing"):
            report = Lander(settings, Topics.CUSTOMERS, on_batch=pause_broker).run()
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    assert (report.batches, report.rows_landed, report.dead_lettered) == (1, 100, 60)
    assert (report.dead_letters_published, report.dead_letters_pending) == (0, 60)
    assert "60 dead letters are not confirmed on churn.dead-letter yet" in caplog.text
    with connect(settings.warehouse_path, read_only=True) as con:
        rows = con.execute(
            "SELECT kafka_epoch, kafka_topic, kafka_partition, kafka_offset FROM dead_letters "
            "WHERE published_at IS NULL"
        ).fetchall()
    expected = {dead_letter_key(*row) for row in rows}
    assert len(expected) == 60
    assert load_read_model(settings.read_models_dir, "dead_letters")["published_at"].isna().all()

    platform = PlatformResource(config_path=str(settings_path))
    instance = dg.DagsterInstance.ephemeral()

    def tick():
        context = dg.build_sensor_context(
            instance=instance, resources={"platform": platform}, definitions=defs
        )
        return kafka_landing_sensor(context)

    # No new messages, but unconfirmed dead letters: one landing run for their topic.
    [request] = tick().run_requests
    assert request.run_key.startswith(f"{Topics.CUSTOMERS}@dead-letters-unconfirmed@60:")

    again = Lander(settings, Topics.CUSTOMERS).run()
    assert (again.rows_landed, again.dead_lettered, again.replayed) == (0, 0, 0)
    assert again.dead_letters_republished == 60
    assert (again.dead_letters_published, again.dead_letters_pending) == (60, 0)
    check = check_at_least_once(expected, read_topic_keys(settings, Topics.DEAD_LETTER))
    assert check.complete, check
    assert not tick().run_requests  # all confirmed: nothing to ask for
