"""A message's own id makes landing exactly-once across logs.

The same message produced again, into a restarted broker's new log or into the same log, is a
replay: counted (LandingReport, ``landing_replays`` table and read model, ``churn status``),
never a second row. Distinct messages of a new log still land.
"""

import random
import re
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from churn_assets.kafka import make_producer, topic_log
from churn_assets.landing import Lander, LandingError
from churn_assets.schemas import Topics, encode_message
from churn_assets.warehouse import connect, load_read_model
from tests.integration.landing_helpers import (
    check_exactly_once,
    landed_event_ids,
    produce_payloads,
    restart_broker,
    simulated_customer_events,
)

pytestmark = pytest.mark.integration

STATUS_LINE = re.compile(r"^\s+(\w+)\s+(\d+) rows, replayed \(not inserted\): (\d+)$", re.M)


def status_counts(churn_cli) -> dict[str, tuple[int, int]]:
    """``churn status`` (a real subprocess): landed table -> (rows, replayed)."""
    result = subprocess.run(
        [*churn_cli, "status"], capture_output=True, text=True, timeout=120, check=True
    )
    return {m[1]: (int(m[2]), int(m[3])) for m in STATUS_LINE.finditer(result.stdout)}


def stored_replays(settings) -> dict[tuple[str, str], int]:
    with connect(settings.warehouse_path, read_only=True) as con:
        rows = con.execute("SELECT topic, kafka_epoch, replayed FROM landing_replays").fetchall()
    return {(topic, epoch): n for topic, epoch, n in rows}


def published_replays(settings) -> dict[tuple[str, str], int]:
    frame = load_read_model(settings.read_models_dir, "landing_replays")
    return {(r.topic, r.kafka_epoch): int(r.replayed) for r in frame.itertuples()}


def landed_rows(settings) -> set[tuple]:
    with connect(settings.warehouse_path, read_only=True) as con:
        return set(
            con.execute(
                "SELECT event_id, kafka_partition, kafka_offset, landed_at "
                "FROM landed_customer_events"
            ).fetchall()
        )


def produce_to(settings, payload: dict, partition: int) -> int:
    """Produce one customer event to ``partition``; returns its offset."""
    offsets: list[int] = []
    producer = make_producer(settings)
    producer.produce(
        Topics.CUSTOMERS,
        partition=partition,
        key=payload["customer_id"].encode(),
        value=encode_message(Topics.CUSTOMERS, payload),
        on_delivery=lambda error, message: offsets.append(message.offset()),
    )
    assert producer.flush(30) == 0
    return offsets[0]


def test_the_same_messages_in_a_new_broker_log_are_replays(broker_settings, churn_cli):
    settings = broker_settings
    payloads = simulated_customer_events(700, seed=31)
    produced = produce_payloads(settings, payloads)
    first = Lander(settings, Topics.CUSTOMERS).run()
    assert (first.rows_landed, first.replayed, first.reached_eof) == (700, 0, True)
    assert status_counts(churn_cli)["landed_customer_events"] == (700, 0)

    restart_broker(settings)  # a new embedded broker: a new, empty log
    second_epoch = topic_log(settings, Topics.CUSTOMERS).epoch
    assert second_epoch != first.kafka_epoch
    again = payloads.copy()
    random.Random(7).shuffle(again)  # the exact same messages, in another order
    produce_payloads(settings, again)
    fresh = simulated_customer_events(50, seed=32)
    produced += produce_payloads(settings, fresh)

    second = Lander(settings, Topics.CUSTOMERS).run()
    assert second.kafka_epoch == second_epoch
    assert (second.rows_landed, second.replayed, second.dead_lettered) == (50, 700, 0)
    assert (second.replayed_total, second.reached_eof) == (700, True)
    result = check_exactly_once(produced, landed_event_ids(settings))
    assert result.exactly_once, result
    with connect(settings.warehouse_path, read_only=True) as con:
        by_epoch = dict(
            con.execute(
                "SELECT kafka_epoch, count(*) FROM landed_customer_events GROUP BY ALL"
            ).fetchall()
        )
    assert by_epoch == {first.kafka_epoch: 700, second_epoch: 50}  # the first landing stays
    assert stored_replays(settings) == {(Topics.CUSTOMERS, second_epoch): 700}
    assert published_replays(settings) == {(Topics.CUSTOMERS, second_epoch): 700}
    assert status_counts(churn_cli)["landed_customer_events"] == (750, 700)

    # Draining the same log again finds nothing: the offsets skip it, nothing is counted twice.
    third = Lander(settings, Topics.CUSTOMERS).run()
    assert (third.rows_landed, third.replayed, third.replayed_total) == (0, 0, 700)


def test_a_message_produced_again_into_the_same_log_is_a_replay(broker_settings, churn_cli):
    settings = broker_settings
    payloads = simulated_customer_events(300, seed=41)
    produced = produce_payloads(settings, payloads)
    first = Lander(settings, Topics.CUSTOMERS).run()
    assert (first.rows_landed, first.replayed) == (300, 0)
    before = landed_rows(settings)

    # Produced again at later offsets of the same log (a producer retrying after a timeout).
    repeated = random.Random(11).sample(payloads, 40)
    produce_payloads(settings, repeated)
    # A new message sent three times in one batch: partition 2 first, then twice to partition 0.
    twin = simulated_customer_events(1, seed=42)[0]
    produce_to(settings, twin, 2)
    kept = produce_to(settings, twin, 0)
    produce_to(settings, twin, 0)

    second = Lander(settings, Topics.CUSTOMERS).run()
    assert second.batches == 1  # the three copies met in one batch
    assert (second.rows_landed, second.replayed) == (1, 40 + 2)
    result = check_exactly_once([*produced, twin["event_id"]], landed_event_ids(settings))
    assert result.exactly_once, result
    with connect(settings.warehouse_path, read_only=True) as con:
        where = con.execute(
            "SELECT kafka_partition, kafka_offset FROM landed_customer_events WHERE event_id = ?",
            [twin["event_id"]],
        ).fetchall()
    assert where == [(0, kept)]  # within a batch the lowest partition, then offset, wins
    # A repeated message keeps its first landed row, not the later copy's coordinates.
    assert before < landed_rows(settings)
    assert len(landed_rows(settings) - before) == 1
    assert stored_replays(settings) == {(Topics.CUSTOMERS, first.kafka_epoch): 42}
    assert published_replays(settings) == {(Topics.CUSTOMERS, first.kafka_epoch): 42}
    assert status_counts(churn_cli)["landed_customer_events"] == (301, 42)


def prediction(request_id: str, arm: str, version: str, score: float) -> dict:
    return {
        "request_id": request_id,
        "customer_id": "C0000001",
        "model_name": "churn",
        "model_version": version,
        "arm": arm,
        "score": score,
        "latency_ms": 1.5,
        "status": "ok",
        "predicted_at": (datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=score)).isoformat(),
    }


def test_a_prediction_is_one_arm_s_answer_of_one_model_version(broker_settings):
    """Predictions are unique by (request_id, arm, model_version): the primary and the shadow
    answer to one request both land; the same answer mirrored twice is a replay."""
    settings = broker_settings
    answers = [
        prediction("req-1", "primary", "v1", 0.2),
        prediction("req-1", "shadow", "v2", 0.3),
        prediction("req-1", "canary", "v2", 0.3),
        prediction("req-2", "primary", "v1", 0.7),
    ]
    producer = make_producer(settings)
    for payload in [*answers, answers[1], answers[3]]:
        producer.produce(
            Topics.PREDICTIONS,
            key=payload["request_id"].encode(),
            value=encode_message(Topics.PREDICTIONS, payload),
        )
    assert producer.flush(30) == 0

    report = Lander(settings, Topics.PREDICTIONS).run()
    assert (report.rows_landed, report.replayed, report.dead_lettered) == (4, 2, 0)
    with connect(settings.warehouse_path, read_only=True) as con:
        landed = con.execute(
            "SELECT request_id, arm, model_version FROM landed_predictions ORDER BY ALL"
        ).fetchall()
    assert landed == sorted((a["request_id"], a["arm"], a["model_version"]) for a in answers)
    assert stored_replays(settings) == {(Topics.PREDICTIONS, report.kafka_epoch): 2}


def test_rows_past_the_stored_offsets_stop_landing_instead_of_passing_quietly(broker_settings):
    """The same coordinates re-read are replays; other rows at them mean offsets and rows
    disagree, which is refused (nothing committed) rather than skipped."""
    settings = broker_settings
    produce_payloads(settings, simulated_customer_events(30, seed=71))
    first = Lander(settings, Topics.CUSTOMERS).run()
    assert first.rows_landed == 30
    with connect(settings.warehouse_path) as con:
        # Offsets moved back: re-reading the same messages only counts replays.
        con.execute("UPDATE landing_offsets SET next_offset = 0")
    again = Lander(settings, Topics.CUSTOMERS).run()
    assert (again.rows_landed, again.replayed) == (0, 30)

    with connect(settings.warehouse_path) as con:
        con.execute("UPDATE landing_offsets SET next_offset = 0")
        # A different message at a landed message's coordinates.
        con.execute(
            "UPDATE landed_customer_events SET event_id = 'ev-tampered' WHERE kafka_offset = 0 "
            "AND kafka_partition = (SELECT min(kafka_partition) FROM landed_customer_events)"
        )
        before = con.execute("SELECT * FROM landed_customer_events ORDER BY ALL").fetchall()
    with pytest.raises(LandingError, match="primary-key conflict"):
        Lander(settings, Topics.CUSTOMERS).run()
    with connect(settings.warehouse_path, read_only=True) as con:
        assert con.execute("SELECT * FROM landed_customer_events ORDER BY ALL").fetchall() == before
        assert stored_replays(settings) == {(Topics.CUSTOMERS, first.kafka_epoch): 30}
