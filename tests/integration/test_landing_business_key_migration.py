"""A warehouse from before business keys and the dead-letter outbox, migrated by ``ensure_schema``.

Duplicates of a message (same event id in two log epochs, or produced twice) are removed keeping
the first landed row (earliest ``landed_at``, then epoch, partition, offset), in one transaction,
with a log line; dead letters get ``published_at`` (NULL: unpublished), so the next landing run
of their topic republishes them. A second ``ensure_schema`` changes nothing.
"""

import logging
from pathlib import Path

import duckdb
import pytest

from churn_assets.landing import Lander, dead_letter_key
from churn_assets.schemas import Topics
from churn_assets.warehouse import (
    WarehouseMigrationError,
    business_key_index,
    connect,
    ensure_schema,
)
from tests.integration.landing_helpers import (
    check_at_least_once,
    produce_payloads,
    read_topic_keys,
    simulated_customer_events,
)

pytestmark = pytest.mark.integration

# The warehouse layout before business keys and the outbox (churn_assets/warehouse.py at commit
# 4138400), verbatim.
OLD_TABLE_DDL = {
    "landing_offsets": """
CREATE TABLE IF NOT EXISTS landing_offsets (
    kafka_epoch VARCHAR NOT NULL,
    topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_epoch, topic, kafka_partition)
);""",
    "landed_customer_events": """
CREATE TABLE IF NOT EXISTS landed_customer_events (
    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',
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
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
    "landed_predictions": """
CREATE TABLE IF NOT EXISTS landed_predictions (
    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',
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
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
    "landed_feedback": """
CREATE TABLE IF NOT EXISTS landed_feedback (
    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',
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
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
    "dead_letters": """
CREATE TABLE IF NOT EXISTS dead_letters (
    kafka_epoch VARCHAR NOT NULL DEFAULT 'legacy',
    kafka_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    message_key VARCHAR,
    raw_value VARCHAR,
    reason VARCHAR NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kafka_epoch, kafka_topic, kafka_partition, kafka_offset)
);""",
}

OLD_ROWS_SQL = """
INSERT INTO landing_offsets VALUES
    ('e1', 'churn.customers', 0, 2, '2026-01-02 00:00:00+00'),
    ('e2', 'churn.customers', 0, 7, '2026-01-04 00:00:00+00');
-- customer_tenure tells the copies apart
INSERT INTO landed_customer_events VALUES
    ('e1', 'churn.customers', 0, 0, 'ev-a', 'c-1', '2026-01-01 10:00:00+00', 1, 50.0, 150.0,
     'month-to-month', 'credit_card', 'dsl', 1, 4.5, '2026-01-02 00:00:00+00'),
    ('e2', 'churn.customers', 1, 0, 'ev-a', 'c-1', '2026-01-01 10:00:00+00', 2, 50.0, 150.0,
     'month-to-month', 'credit_card', 'dsl', 1, 4.5, '2026-01-03 00:00:00+00'),
    ('e2', 'churn.customers', 0, 6, 'ev-a', 'c-1', '2026-01-01 10:00:00+00', 3, 50.0, 150.0,
     'month-to-month', 'credit_card', 'dsl', 1, 4.5, '2026-01-04 00:00:00+00'),
    ('e1', 'churn.customers', 0, 1, 'ev-b', 'c-2', '2026-01-01 11:00:00+00', 4, 70.0, 840.0,
     'one_year', 'bank_transfer', 'fiber_optic', 0, 9.0, '2026-01-02 00:00:00+00'),
    ('e2', 'churn.customers', 0, 5, 'ev-b', 'c-2', '2026-01-01 11:00:00+00', 5, 70.0, 840.0,
     'one_year', 'bank_transfer', 'fiber_optic', 0, 9.0, '2026-01-01 12:00:00+00'),
    ('e1', 'churn.customers', 2, 7, 'ev-c', 'c-3', '2026-01-01 12:00:00+00', 6, 20.0, 20.0,
     'two_year', 'mailed_check', 'none', 2, 1.0, '2026-01-02 00:00:00+00'),
    ('e1', 'churn.customers', 1, 9, 'ev-c', 'c-3', '2026-01-01 12:00:00+00', 7, 20.0, 20.0,
     'two_year', 'mailed_check', 'none', 2, 1.0, '2026-01-02 00:00:00+00'),
    ('e2', 'churn.customers', 2, 0, 'ev-d', 'c-4', '2026-01-01 13:00:00+00', 8, 30.0, 60.0,
     'one_year', 'credit_card', 'dsl', 0, 3.0, '2026-01-03 00:00:00+00');
INSERT INTO landed_predictions VALUES
    ('e1', 'ml.predictions', 0, 0, 'req-1', 'c-1', 'churn', 'v1', 'primary', 0.25, 1.5, 'ok', NULL,
     NULL, '2026-01-01 10:00:01+00', '2026-01-02 00:00:00+00'),
    ('e2', 'ml.predictions', 0, 0, 'req-1', 'c-1', 'churn', 'v1', 'primary', 0.25, 1.5, 'ok', NULL,
     NULL, '2026-01-01 10:00:01+00', '2026-01-03 00:00:00+00'),
    ('e1', 'ml.predictions', 1, 0, 'req-1', 'c-1', 'churn', 'v2', 'shadow', 0.35, 2.5, 'ok', NULL,
     NULL, '2026-01-01 10:00:01+00', '2026-01-02 00:00:00+00');
INSERT INTO landed_feedback VALUES
    ('e1', 'ml.feedback', 0, 0, 'fb-1', 'c-1', 'req-1', true, '2026-01-10 00:00:00+00',
     '2026-01-11 00:00:00+00', '2026-01-12 00:00:00+00'),
    ('e2', 'ml.feedback', 0, 0, 'fb-1', 'c-1', 'req-1', true, '2026-01-10 00:00:00+00',
     '2026-01-11 00:00:00+00', '2026-01-13 00:00:00+00'),
    ('e2', 'ml.feedback', 0, 1, 'fb-2', 'c-2', NULL, false, '2026-01-10 00:00:00+00',
     '2026-01-11 00:00:00+00', '2026-01-13 00:00:00+00');
INSERT INTO dead_letters VALUES
    ('e1', 'churn.customers', 0, 3, 'bad', 'not json', 'not valid JSON', '2026-01-02 00:00:00+00'),
    ('e2', 'churn.customers', 0, 4, 'bad', 'not json', 'not valid JSON', '2026-01-03 00:00:00+00'),
    ('e2', 'churn.customers', 1, 1, NULL, NULL, 'empty message', '2026-01-03 00:00:00+00'),
    ('e1', 'ml.feedback', 1, 0, 'bad', '{}', 'event_id: Field required', '2026-01-02 00:00:00+00');
"""

TABLES = [
    "landing_offsets",
    "landed_customer_events",
    "landed_predictions",
    "landed_feedback",
    "dead_letters",
]
# What each landed table keeps: the first landed copy of every message.
KEPT = {
    "landed_customer_events": [
        # ev-a: the earliest landed_at; ev-b: landed earliest though its epoch sorts later;
        # ev-c: the same landed_at and epoch, so the lower partition.
        ("ev-a", "e1", 0, 0, 1),
        ("ev-b", "e2", 0, 5, 5),
        ("ev-c", "e1", 1, 9, 7),
        ("ev-d", "e2", 2, 0, 8),
    ],
    "landed_predictions": [
        ("req-1", "primary", "v1", "e1", 0, 0),
        ("req-1", "shadow", "v2", "e1", 1, 0),
    ],
    "landed_feedback": [("fb-1", "e1", 0, 0), ("fb-2", "e2", 0, 1)],
}
KEPT_QUERY = {
    "landed_customer_events": "SELECT event_id, kafka_epoch, kafka_partition, kafka_offset, "
    "customer_tenure FROM landed_customer_events ORDER BY ALL",
    "landed_predictions": "SELECT request_id, arm, model_version, kafka_epoch, kafka_partition, "
    "kafka_offset FROM landed_predictions ORDER BY ALL",
    "landed_feedback": "SELECT event_id, kafka_epoch, kafka_partition, kafka_offset "
    "FROM landed_feedback ORDER BY ALL",
}


def old_warehouse(path: Path) -> None:
    with connect(path) as con:
        con.execute("\n".join(OLD_TABLE_DDL.values()))
        con.execute(OLD_ROWS_SQL)


def counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}


def test_duplicates_are_removed_keeping_the_first_landed_and_dead_letters_get_the_outbox(
    tmp_path, caplog
):
    path = tmp_path / "warehouse.duckdb"
    old_warehouse(path)
    with connect(path) as con:
        assert counts(con) == {
            "landing_offsets": 2,
            "landed_customer_events": 8,
            "landed_predictions": 3,
            "landed_feedback": 3,
            "dead_letters": 4,
        }

    with caplog.at_level(logging.WARNING, logger="churn_assets.warehouse"), connect(path) as con:
        ensure_schema(con)
        after = counts(con)
        kept = {t: con.execute(q).fetchall() for t, q in KEPT_QUERY.items()}
        published = con.execute("SELECT published_at FROM dead_letters").fetchall()
        snapshot = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}
    assert after == {
        "landing_offsets": 2,
        "landed_customer_events": 4,
        "landed_predictions": 2,
        "landed_feedback": 2,
        "dead_letters": 4,
    }
    assert kept == KEPT
    assert published == [(None,)] * 4  # unpublished: the next landing run republishes them
    assert "removed 6 duplicate rows" in caplog.text
    assert "landed_customer_events: 4 removed, 4 kept" in caplog.text
    assert "landed_predictions: 1 removed, 2 kept" in caplog.text
    assert "landed_feedback: 1 removed, 2 kept" in caplog.text
    assert "its 4 existing dead letters count as unpublished" in caplog.text

    # Idempotent: a second call finds both migrations done and changes nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="churn_assets.warehouse"), connect(path) as con:
        ensure_schema(con)
        assert {
            t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES
        } == snapshot
        indexes = {
            r[0]
            for r in con.execute(
                "SELECT index_name FROM duckdb_indexes() WHERE is_unique"
            ).fetchall()
        }
        assert {business_key_index(t) for t in KEPT} <= indexes
        # The index holds the key from now on, whatever writes the table.
        with pytest.raises(duckdb.ConstraintException, match="ev-a"):
            con.execute(
                "INSERT INTO landed_customer_events SELECT * REPLACE ('e3' AS kafka_epoch) "
                "FROM landed_customer_events WHERE event_id = 'ev-a'"
            )
    assert caplog.text == ""


def test_a_migration_that_cannot_finish_changes_nothing(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    old_warehouse(path)
    with connect(path) as con:
        # A column the current layout does not know, on the last table the migration rebuilds.
        con.execute("ALTER TABLE landed_feedback ADD COLUMN operator_note VARCHAR")
        before = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}

    with connect(path) as con:
        with pytest.raises(WarehouseMigrationError, match=r"landed_feedback has columns.*operat"):
            ensure_schema(con)
        assert {
            t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES
        } == before
        columns = {r[0] for r in con.execute("DESCRIBE dead_letters").fetchall()}
        assert "published_at" not in columns
        assert not con.execute("SELECT * FROM duckdb_indexes() WHERE is_unique").fetchall()


def test_the_next_landing_run_republishes_the_migrated_dead_letters(broker_settings):
    settings = broker_settings
    old_warehouse(settings.warehouse_path)
    # A message whose id landed before the migration (from another log) is a replay now.
    replay = simulated_customer_events(1, seed=51)[0] | {"event_id": "ev-b"}
    fresh = simulated_customer_events(5, seed=52)
    produce_payloads(settings, [replay, *fresh])

    customers = Lander(settings, Topics.CUSTOMERS).run()
    assert (customers.rows_landed, customers.replayed, customers.dead_lettered) == (5, 1, 0)
    assert customers.dead_letters_republished == 3  # this topic's, from both epochs
    assert (customers.dead_letters_published, customers.dead_letters_pending) == (3, 0)
    expected = {
        dead_letter_key("e1", Topics.CUSTOMERS, 0, 3),
        dead_letter_key("e2", Topics.CUSTOMERS, 0, 4),
        dead_letter_key("e2", Topics.CUSTOMERS, 1, 1),
    }
    check = check_at_least_once(expected, read_topic_keys(settings, Topics.DEAD_LETTER))
    assert check.complete, check

    # The feedback topic's dead letter waits for a feedback landing run; then it is sent too.
    with connect(settings.warehouse_path, read_only=True) as con:
        unpublished = con.execute(
            "SELECT kafka_topic FROM dead_letters WHERE published_at IS NULL"
        ).fetchall()
    assert unpublished == [(Topics.FEEDBACK,)]
    feedback = Lander(settings, Topics.FEEDBACK).run()
    assert (feedback.dead_letters_republished, feedback.dead_letters_pending) == (1, 0)
    expected.add(dead_letter_key("e1", Topics.FEEDBACK, 1, 0))
    check = check_at_least_once(expected, read_topic_keys(settings, Topics.DEAD_LETTER))
    assert check.complete, check
    assert not check.repeated  # sent once each: nothing was republished twice

    again = Lander(settings, Topics.CUSTOMERS).run()
    assert (again.dead_letters_republished, again.rows_landed, again.replayed) == (0, 0, 0)
