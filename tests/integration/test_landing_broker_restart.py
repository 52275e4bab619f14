"""A new broker log (restarted embedded broker, recreated topic) is landed from its beginning.

Offsets start again from 0 in a new log. Landing keys offsets and rows by the log's epoch (the
broker's cluster id and the topic id), so nothing of the new log is skipped, nothing of the old
one is overwritten, and a partition whose new log is shorter than the old offset never stalls.
Distinct messages of the new log land; a message whose own id landed from the old log is a replay
(counted, not inserted; more in test_landing_replays.py).
"""

import logging
import os
from pathlib import Path

import duckdb
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from churn_assets.broker import read_state
from churn_assets.config import Settings
from churn_assets.kafka import (
    client_config,
    has_new_data,
    make_producer,
    topic_log,
)
from churn_assets.landing import Lander, LandingError
from churn_assets.schemas import Topics
from churn_assets.warehouse import (
    LANDING_TABLES,
    LEGACY_EPOCH,
    WarehouseMigrationError,
    connect,
    ensure_schema,
    load_read_model,
)
from tests.conftest import write_config
from tests.integration.landing_helpers import (
    check_exactly_once,
    landed_event_ids,
    produce_customer_events,
    produce_payloads,
    read_topic_keys,
    restart_broker,
    simulated_customer_events,
)

pytestmark = pytest.mark.integration

POISON = b"\x00 not json"


@pytest.fixture
def settings_path(tmp_path: Path) -> Path:
    # A stalled partition would show as a drain that stops at this budget without reaching EOF.
    return write_config(
        tmp_path,
        landing={"batch_max_messages": 500, "batch_max_seconds": 1.0, "drain_max_seconds": 20},
    )


def produce_poison(settings: Settings) -> None:
    producer = make_producer(settings)
    producer.produce(Topics.CUSTOMERS, partition=0, key=b"bad", value=POISON)
    assert producer.flush(30) == 0


def epochs_of(settings: Settings, table: str) -> dict[str, int]:
    with connect(settings.warehouse_path, read_only=True) as con:
        rows = con.execute(
            f"SELECT kafka_epoch, count(*) FROM {table} GROUP BY kafka_epoch"
        ).fetchall()
    return dict(rows)


@pytest.mark.parametrize(
    ("before", "after"),
    [(193, 412), (600, 30)],
    ids=["longer-new-log", "shorter-new-log"],
)
def test_restarted_broker_is_landed_from_its_beginning(broker_settings, before, after):
    settings = broker_settings
    first_epoch = topic_log(settings, Topics.CUSTOMERS).epoch
    assert first_epoch.startswith(read_state(settings.run_dir).cluster_id + "/")
    produce_poison(settings)  # p0 offset 0 of the first log
    payloads = simulated_customer_events(before, seed=1)
    produced = produce_payloads(settings, payloads)
    first = Lander(settings, Topics.CUSTOMERS).run()
    assert (first.rows_landed, first.dead_lettered, first.reached_eof) == (before, 1, True)
    assert first.kafka_epoch == first_epoch

    restart_broker(settings)
    second_epoch = topic_log(settings, Topics.CUSTOMERS).epoch
    assert second_epoch != first_epoch
    assert has_new_data(settings, Topics.CUSTOMERS) == {}  # the new log is empty
    produce_poison(settings)  # p0 offset 0 again, in the new log
    produced += produce_customer_events(settings, after, seed=2)
    # Some messages of the first log, produced again into the new one: the same ids.
    again = produce_payloads(settings, payloads[:25])
    assert set(has_new_data(settings, Topics.CUSTOMERS)) == {0, 1, 2}

    second = Lander(settings, Topics.CUSTOMERS).run()
    # Reaching EOF is what a stalled partition (stored offset past the new log's end) never does.
    assert second.reached_eof
    assert (second.rows_landed, second.dead_lettered) == (after, 1)
    assert (second.replayed, second.replayed_total) == (len(again), len(again))
    assert second.kafka_epoch == second_epoch
    assert min(lo for lo, _ in second.offset_ranges.values()) == 0

    result = check_exactly_once(produced, landed_event_ids(settings))
    assert result.exactly_once, result
    assert epochs_of(settings, "landed_customer_events") == {
        first_epoch: before,
        second_epoch: after,
    }
    assert epochs_of(settings, "dead_letters") == {first_epoch: 1, second_epoch: 1}

    offsets = load_read_model(settings.read_models_dir, "landing_offsets")
    customers = offsets[offsets["topic"] == Topics.CUSTOMERS]
    assert set(customers["kafka_epoch"]) == {second_epoch}
    assert sorted(customers["kafka_partition"]) == [0, 1, 2]
    assert customers["next_offset"].sum() == after + 1 + len(again)
    published = load_read_model(settings.read_models_dir, "landed_customer_events")
    assert len(published) == before + after and published["event_id"].is_unique
    assert not has_new_data(settings, Topics.CUSTOMERS)  # the group commit reached the new log
    # The dead-letter mirror's key names the epoch, so a consumer deduping by key keeps both. (A
    # dead letter has no message id: the same bad bytes in a new log are a new dead letter.)
    assert read_topic_keys(settings, Topics.DEAD_LETTER) == [
        f"{Topics.CUSTOMERS}/0/0@{second_epoch}"
    ]

    third = Lander(settings, Topics.CUSTOMERS).run()
    assert (third.rows_landed, third.dead_lettered, third.replayed) == (0, 0, 0)
    assert third.reached_eof
    assert check_exactly_once(produced, landed_event_ids(settings)).exactly_once
    assert epochs_of(settings, "dead_letters") == {first_epoch: 1, second_epoch: 1}


def test_recreated_topic_is_a_new_epoch(broker_settings):
    settings = broker_settings
    produced = produce_customer_events(settings, 300, seed=1)
    first = Lander(settings, Topics.CUSTOMERS).run()
    assert first.rows_landed == 300

    admin = AdminClient(client_config(settings))
    admin.delete_topics([Topics.CUSTOMERS])[Topics.CUSTOMERS].result(timeout=15)
    new_topic = NewTopic(Topics.CUSTOMERS, settings.kafka.partitions, 1)
    admin.create_topics([new_topic])[Topics.CUSTOMERS].result(timeout=15)
    recreated = topic_log(settings, Topics.CUSTOMERS)
    assert recreated.cluster_id == topic_log(settings, Topics.FEEDBACK).cluster_id
    assert recreated.epoch != first.kafka_epoch

    produced += produce_customer_events(settings, 120, seed=2)
    second = Lander(settings, Topics.CUSTOMERS).run()
    assert (second.rows_landed, second.reached_eof) == (120, True)
    assert check_exactly_once(produced, landed_event_ids(settings)).exactly_once


def test_a_log_change_during_a_drain_commits_nothing_of_the_new_log(broker_settings):
    """The broker restarts on the same port mid-drain: the consumer silently reconnects to the
    new log at the old positions; landing refuses that batch and the next run lands it all."""
    settings = broker_settings
    port = read_state(settings.run_dir).port
    produced = produce_customer_events(settings, 3_000, seed=1)
    restarted: list[str] = []
    later = simulated_customer_events(6_000, seed=2)

    def restart_once(report) -> None:
        if not restarted:
            restart_broker(settings, port=port)
            restarted.append(topic_log(settings, Topics.CUSTOMERS).epoch)
            produce_payloads(settings, later)

    with pytest.raises(LandingError, match="log of churn.customers changed during the landing"):
        Lander(settings, Topics.CUSTOMERS, on_batch=restart_once).run()
    landed_before = landed_event_ids(settings)
    assert 0 < len(landed_before) < 3_000
    assert set(landed_before) <= set(produced)  # nothing of the new log under the old epoch

    report = Lander(settings, Topics.CUSTOMERS).run()
    assert report.kafka_epoch == restarted[0]
    assert (report.rows_landed, report.reached_eof) == (6_000, True)
    # The rest of the first log is gone with its broker; everything of the new log landed once.
    landed = landed_event_ids(settings)
    assert check_exactly_once(landed_before + [p["event_id"] for p in later], landed).exactly_once


# The warehouse layout before log epochs (churn_assets/warehouse.py at commit 2f46f93), verbatim.
OLD_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS landing_offsets (
    topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, kafka_partition)
);

CREATE TABLE IF NOT EXISTS landed_customer_events (
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    event_id VARCHAR NOT NULL,
    customer_id VARCHAR NOT NULL,
    event_time TIMESTAMPTZ NOT NULL,
    customer_tenure INTEGER NOT NULL,
    monthly_charges DOUBLE NOT NULL,
    total_charges DOUBLE NOT NULL,
    contract_type VARCHAR NOT NULL,
    payment_method VARCHAR NOT NULL,
    internet_service VARCHAR NOT NULL,
    support_tickets INTEGER NOT NULL,
    login_frequency DOUBLE NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);

CREATE TABLE IF NOT EXISTS landed_predictions (
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    request_id VARCHAR NOT NULL,
    customer_id VARCHAR,
    model_name VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    arm VARCHAR NOT NULL,
    score DOUBLE,
    latency_ms DOUBLE NOT NULL,
    status VARCHAR NOT NULL,
    error VARCHAR,
    features JSON,
    predicted_at TIMESTAMPTZ NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);

CREATE TABLE IF NOT EXISTS landed_feedback (
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    event_id VARCHAR NOT NULL,
    customer_id VARCHAR NOT NULL,
    request_id VARCHAR,
    churned BOOLEAN NOT NULL,
    outcome_time TIMESTAMPTZ NOT NULL,
    observed_at TIMESTAMPTZ NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);

CREATE TABLE IF NOT EXISTS dead_letters (
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    message_key VARCHAR,
    raw_value VARCHAR,
    reason VARCHAR NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);
"""

OLD_ROWS_SQL = """
INSERT INTO landing_offsets VALUES
    ('churn.customers', 0, 2, '2026-01-02 00:00:00+00'),
    ('ml.feedback', 1, 1, '2026-01-02 00:00:00+00');
INSERT INTO landed_customer_events VALUES
    ('churn.customers', 0, 0, 'ev-a', 'c-1', '2026-01-01 10:00:00+00', 3, 50.0, 150.0,
     'month-to-month', 'credit_card', 'dsl', 1, 4.5, '2026-01-02 00:00:00+00'),
    ('churn.customers', 0, 1, 'ev-b', 'c-2', '2026-01-01 11:00:00+00', 12, 70.0, 840.0,
     'one_year', 'bank_transfer', 'fiber_optic', 0, 9.0, '2026-01-02 00:00:00+00');
INSERT INTO landed_predictions VALUES
    ('ml.predictions', 2, 7, 'req-1', 'c-1', 'churn', 'v1', 'primary', 0.25, 1.5, 'ok', NULL,
     '{"customer_tenure": 3}', '2026-01-01 10:00:01+00', '2026-01-02 00:00:00+00');
INSERT INTO landed_feedback VALUES
    ('ml.feedback', 1, 0, 'fb-1', 'c-1', 'req-1', true, '2026-01-10 00:00:00+00',
     '2026-01-11 00:00:00+00', '2026-01-12 00:00:00+00');
INSERT INTO dead_letters VALUES
    ('churn.customers', 0, 2, 'bad', 'not json', 'not valid JSON', '2026-01-02 00:00:00+00');
"""


def table_rows(con: duckdb.DuckDBPyConnection, table: str, columns: str = "*") -> list[tuple]:
    return con.execute(f"SELECT {columns} FROM {table} ORDER BY ALL").fetchall()


def test_an_old_warehouse_is_migrated_in_place_keeping_every_row(tmp_path, caplog):
    path = tmp_path / "warehouse.duckdb"
    tables = ["landing_offsets", *LANDING_TABLES.values(), "dead_letters"]
    with connect(path) as con:
        con.execute(OLD_SCHEMA_SQL)
        con.execute(OLD_ROWS_SQL)
        before = {t: table_rows(con, t) for t in tables}

    with caplog.at_level(logging.WARNING, logger="churn_assets.warehouse"), connect(path) as con:
        ensure_schema(con)
        # Dead letters also got the outbox column: unpublished (NULL), so republished once.
        after = {
            t: table_rows(con, t, "* EXCLUDE (published_at)" if t == "dead_letters" else "*")
            for t in tables
        }
        assert table_rows(con, "dead_letters", "published_at") == [(None,)]
        epochs = {t: table_rows(con, t, "DISTINCT kafka_epoch") for t in tables}
        # The epoch is part of every key now: the same coordinates in another log are new rows.
        con.execute(
            "INSERT INTO dead_letters VALUES "
            "('e2', 'churn.customers', 0, 2, 'bad', 'x', 'r', '2026-02-01 00:00:00+00', NULL)"
        )
        with pytest.raises(duckdb.ConstraintException):
            con.execute(
                "INSERT INTO dead_letters VALUES "
                "(?, 'churn.customers', 0, 2, 'bad', 'x', 'r', '2026-02-01 00:00:00+00', NULL)",
                [LEGACY_EPOCH],
            )
        con.execute(
            "INSERT INTO landing_offsets VALUES ('e2', 'churn.customers', 0, 5, current_timestamp)"
        )
    assert "migrated the warehouse to per-log-epoch Kafka keys" in caplog.text
    assert "landed_customer_events: 2 rows" in caplog.text
    assert epochs == {t: [(LEGACY_EPOCH,)] for t in tables}
    # Every row kept, value for value, with the legacy epoch in front.
    assert after == {t: sorted((LEGACY_EPOCH, *row) for row in rows) for t, rows in before.items()}

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="churn_assets.warehouse"), connect(path) as con:
        ensure_schema(con)  # already migrated: nothing to do
        assert len(table_rows(con, "landing_offsets")) == 3
    assert "migrated" not in caplog.text


def test_a_migration_that_cannot_finish_changes_nothing(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    with connect(path) as con:
        con.execute(OLD_SCHEMA_SQL)
        con.execute(OLD_ROWS_SQL)
        # A column the current layout does not know, on a table migrated after others.
        con.execute("ALTER TABLE dead_letters ADD COLUMN operator_note VARCHAR")
        before = {t: table_rows(con, t) for t in ("landing_offsets", "dead_letters")}

    with connect(path) as con:
        with pytest.raises(WarehouseMigrationError, match=r"dead_letters has columns.*operator_n"):
            ensure_schema(con)
        assert {t: table_rows(con, t) for t in before} == before
        offset_columns = [r[0] for r in con.execute("DESCRIBE landing_offsets").fetchall()]
        assert "kafka_epoch" not in offset_columns


def make_legacy(settings: Settings) -> None:
    """Rewrite the warehouse that landing wrote in the layout of before log epochs."""
    live = settings.warehouse_path
    legacy = live.with_name("legacy.duckdb")
    con = duckdb.connect(str(legacy))
    try:
        con.execute(OLD_SCHEMA_SQL)
        con.execute(f"ATTACH '{live.as_posix()}' AS live (READ_ONLY)")
        for table in ("landing_offsets", *LANDING_TABLES.values()):
            con.execute(
                f"INSERT INTO {table} BY NAME SELECT * EXCLUDE (kafka_epoch) FROM live.{table}"
            )
        con.execute(
            "INSERT INTO dead_letters BY NAME "
            "SELECT * EXCLUDE (kafka_epoch, published_at) FROM live.dead_letters"
        )
    finally:
        con.close()
    os.replace(legacy, live)


def test_legacy_offsets_that_continue_on_the_running_broker_are_kept(broker_settings):
    """Upgrading while the broker that fed the old warehouse still runs: nothing twice."""
    settings = broker_settings
    produced = produce_customer_events(settings, 400, seed=1)
    produce_poison(settings)  # p0's last landed message is a dead letter
    assert Lander(settings, Topics.CUSTOMERS).run().rows_landed == 400
    make_legacy(settings)

    produced += produce_customer_events(settings, 150, seed=2)
    report = Lander(settings, Topics.CUSTOMERS).run()
    assert (report.rows_landed, report.dead_lettered, report.reached_eof) == (150, 0, True)
    # The old layout had no outbox column: its dead letter counts as unpublished, sent once more.
    assert (report.dead_letters_republished, report.dead_letters_pending) == (1, 0)
    assert check_exactly_once(produced, landed_event_ids(settings)).exactly_once
    assert epochs_of(settings, "landed_customer_events") == {
        LEGACY_EPOCH: 400,
        report.kafka_epoch: 150,
    }
    assert epochs_of(settings, "dead_letters") == {LEGACY_EPOCH: 1}


@pytest.mark.parametrize(
    ("before", "after"), [(600, 40), (100, 400)], ids=["shorter-new-log", "longer-new-log"]
)
def test_legacy_offsets_of_a_lost_broker_are_not_reused(broker_settings, before, after):
    settings = broker_settings
    produced = produce_customer_events(settings, before, seed=1)
    produce_poison(settings)
    Lander(settings, Topics.CUSTOMERS).run()
    make_legacy(settings)

    restart_broker(settings)
    produce_poison(settings)
    produced += produce_customer_events(settings, after, seed=2)
    report = Lander(settings, Topics.CUSTOMERS).run()
    assert (report.rows_landed, report.dead_lettered, report.reached_eof) == (after, 1, True)
    assert report.replayed == 0
    assert check_exactly_once(produced, landed_event_ids(settings)).exactly_once
    assert epochs_of(settings, "dead_letters") == {LEGACY_EPOCH: 1, report.kafka_epoch: 1}
