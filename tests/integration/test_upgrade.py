"""Upgrade safety: what the previous release wrote is read by this code without manual steps.

``tests/fixtures/release_2026_11`` holds a data directory written by release 0f39fd1 (its
README says how): the warehouse as an ``EXPORT DATABASE`` folder, the model registry, the
serving router state and the read models. Each test rebuilds that directory under ``tmp_path``
in the layout ``write_config`` gives (``data/warehouse.duckdb``, ``data/models``,
``data/serving``, ``data/read_models``) and runs this checkout's code on it as a user would after
upgrading: the warehouse migration and a landing run on a real broker, the registry, the serving
plane, and the real CLI in subprocesses.

The release landed some events twice, once per Kafka log, after a broker restart; this code keeps
each message once (its first landed copy).
"""

import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from churn_assets.config import Settings, load_settings
from churn_assets.kafka import make_producer
from churn_assets.landing import Lander
from churn_assets.model import load_model
from churn_assets.registry import ModelRegistry
from churn_assets.rollout import Phase
from churn_assets.rollout_control import current_state, read_rollout_state
from churn_assets.schemas import DATA_TOPICS, FEATURE_NAMES, Topics, encode_message
from churn_assets.warehouse import connect, ensure_schema, load_read_model
from serving.plane import ServingPlane
from serving.router import route
from tests.conftest import write_config
from tests.integration.landing_helpers import produce_payloads, simulated_customer_events

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "release_2026_11"
RELEASE: dict[str, Any] = json.loads((FIXTURE / "fixture.json").read_text())
# Landed tables whose rows are messages with an ``event_id`` of their own.
BY_EVENT_ID = ("landed_customer_events", "landed_feedback")
KAFKA_COLUMNS = ("kafka_epoch", "kafka_topic", "kafka_partition", "kafka_offset", "landed_at")

# Each message's first landed copy (earliest landed_at), by its Kafka coordinates.
FIRST_LANDED_SQL = """
SELECT event_id, kafka_epoch, kafka_partition, kafka_offset FROM {table}
QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY landed_at) = 1
"""
DEAD_LETTER_SQL = (
    "SELECT kafka_epoch, kafka_topic, kafka_partition, kafka_offset, reason FROM dead_letters"
)
PREDICTION_SQL = (
    "SELECT kafka_epoch, kafka_partition, kafka_offset, request_id, model_version, arm "
    "FROM landed_predictions"
)
DECISION_SQL = "SELECT decision_id, action FROM rollout_decisions ORDER BY rowid"


def install_release_data(root: Path) -> None:
    """The fixture as the release left it, under ``root/data``: the warehouse rebuilt from its
    export, the other folders copied."""
    data = root / "data"
    data.mkdir(parents=True)
    con = duckdb.connect(str(data / "warehouse.duckdb"))
    try:
        # A trusted path (IMPORT DATABASE takes no parameters).
        con.execute(f"IMPORT DATABASE '{(FIXTURE / 'warehouse').as_posix()}'")
    finally:
        con.close()
    for part in ("models", "serving", "read_models"):
        shutil.copytree(FIXTURE / part, data / part)


@pytest.fixture
def settings_path(tmp_path: Path) -> Path:
    """The release's data directory and the configuration it ran with (its overrides of
    config/config.yaml: the canary steps its rollout state counts in, among others)."""
    install_release_data(tmp_path)
    overrides = yaml.safe_load((FIXTURE / "config_overrides.yaml").read_text())
    overrides["landing"] = {**overrides["landing"], "drain_max_seconds": 30}
    return write_config(tmp_path, **overrides)


def release_snapshot(settings: Settings) -> dict[str, Any]:
    """What the release's warehouse holds, read with plain DuckDB before this code opens it."""
    con = duckdb.connect(str(settings.warehouse_path), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in tables}
        first_landed = {
            table: {
                row[0]: tuple(row[1:])
                for row in con.execute(FIRST_LANDED_SQL.format(table=table)).fetchall()
            }
            for table in BY_EVENT_ID
        }
        duplicated = {
            table: sorted(
                r[0]
                for r in con.execute(
                    f"SELECT event_id FROM {table} GROUP BY event_id HAVING count(*) > 1"
                ).fetchall()
            )
            for table in BY_EVENT_ID
        }
        return {
            "counts": counts,
            "first_landed": first_landed,
            "duplicated": duplicated,
            "dead_letters": set(con.execute(DEAD_LETTER_SQL).fetchall()),
            "predictions": set(con.execute(PREDICTION_SQL).fetchall()),
            "decisions": con.execute(DECISION_SQL).fetchall(),
        }
    finally:
        con.close()


def assert_fixture_as_written(before: dict[str, Any]) -> None:
    """The rebuilt warehouse is the one the release wrote, duplicates included."""
    assert before["counts"] == RELEASE["table_rows"]
    assert before["duplicated"] == RELEASE["duplicated_event_ids"]
    assert all(before["duplicated"].values()), "the fixture must hold duplicated event ids"


def event_ids(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"SELECT event_id FROM {table}").fetchall()]


def assert_each_event_once(con: duckdb.DuckDBPyConnection, table: str) -> None:
    ids = event_ids(con, table)
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    assert not repeated, f"{table} holds {len(repeated)} event ids more than once: {repeated}"


def run_cli(argv: list[str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"churn {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done


def land_everything(settings: Settings) -> dict[str, Any]:
    reports = {}
    for topic in DATA_TOPICS:
        report = Lander(settings, topic).run()
        assert report.reached_eof, f"landing {topic} stopped before the end of the log"
        reports[topic] = report
    return reports


def release_payloads(settings: Settings, table: str, ids: list[str]) -> list[dict[str, Any]]:
    """Messages the release landed, rebuilt from their first landed rows (to produce again)."""
    with connect(settings.warehouse_path, read_only=True) as con:
        cursor = con.execute(
            f"SELECT * EXCLUDE ({', '.join(KAFKA_COLUMNS)}) FROM {table} "
            "WHERE list_contains(?, event_id) "
            "QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY landed_at) = 1",
            [ids],
        )
        columns = [d[0] for d in cursor.description]
        payloads = [
            {"schema_version": 1, **dict(zip(columns, row, strict=True))}
            for row in cursor.fetchall()
        ]
    assert sorted(p["event_id"] for p in payloads) == sorted(ids)
    return payloads


def produce(settings: Settings, topic: str, payloads: list[dict[str, Any]]) -> None:
    producer = make_producer(settings)
    for payload in payloads:
        producer.produce(
            topic, key=payload["customer_id"].encode(), value=encode_message(topic, payload)
        )
    assert producer.flush(30) == 0


def new_feedback(count: int) -> list[dict[str, Any]]:
    observed = datetime(2026, 2, 1, tzinfo=UTC)
    return [
        {
            "schema_version": 1,
            "event_id": f"fb-upgrade-{i}",
            "customer_id": f"C{i:07d}",
            "request_id": None,
            "churned": i % 2 == 0,
            "outcome_time": observed - timedelta(days=2),
            "observed_at": observed,
        }
        for i in range(count)
    ]


# -- warehouse ------------------------------------------------------------------------------------


def test_the_release_warehouse_migrates_on_open_keeping_each_message_once(settings_path, churn_cli):
    settings = load_settings(settings_path)
    before = release_snapshot(settings)
    assert_fixture_as_written(before)

    with connect(settings.warehouse_path) as con:
        ensure_schema(con)
        ensure_schema(con)  # a second open changes nothing
        for table in BY_EVENT_ID:
            assert_each_event_once(con, table)
            kept = {
                row[0]: tuple(row[1:])
                for row in con.execute(
                    f"SELECT event_id, kafka_epoch, kafka_partition, kafka_offset FROM {table}"
                ).fetchall()
            }
            # Every message is still there, as the copy landed first.
            assert kept == before["first_landed"][table], table
        assert set(con.execute(DEAD_LETTER_SQL).fetchall()) == before["dead_letters"]
        # Predictions were never landed twice: all of them stay (primary and shadow answers of
        # one request share its request id).
        assert set(con.execute(PREDICTION_SQL).fetchall()) == before["predictions"]
        assert con.execute(DECISION_SQL).fetchall() == before["decisions"]

    status = run_cli(churn_cli, "status").stdout
    assert "broker: embedded, stopped" in status
    for table in (*BY_EVENT_ID, "landed_predictions", "dead_letters"):
        assert table in status


def test_a_landing_run_lands_new_messages_on_top_and_publishes_read_models(
    broker_settings, churn_cli
):
    settings = broker_settings
    before = release_snapshot(settings)
    assert_fixture_as_written(before)
    customers = simulated_customer_events(25, seed=5)
    for i, payload in enumerate(customers):
        payload["event_id"] = f"ev-upgrade-{i}"
    new_events = produce_payloads(settings, customers)
    feedback = new_feedback(6)
    produce(settings, Topics.FEEDBACK, feedback)
    producer = make_producer(settings)
    producer.produce(Topics.CUSTOMERS, key=b"poison", value=b"\xff not json after the upgrade")
    assert producer.flush(30) == 0

    reports = land_everything(settings)

    assert reports[Topics.CUSTOMERS].rows_landed == len(new_events)
    assert reports[Topics.CUSTOMERS].dead_lettered == 1
    assert reports[Topics.FEEDBACK].rows_landed == len(feedback)
    new_ids = {
        "landed_customer_events": set(new_events),
        "landed_feedback": {p["event_id"] for p in feedback},
    }
    with connect(settings.warehouse_path, read_only=True) as con:
        for table in BY_EVENT_ID:
            assert_each_event_once(con, table)
            assert set(event_ids(con, table)) == set(before["first_landed"][table]) | new_ids[table]
        counts = {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in (*BY_EVENT_ID, "landed_predictions", "dead_letters")
        }
        assert before["dead_letters"] <= set(con.execute(DEAD_LETTER_SQL).fetchall())
    assert counts["dead_letters"] == len(before["dead_letters"]) + 1
    assert counts["landed_predictions"] == len(before["predictions"])
    # The release's read models (with its duplicates) are replaced by this run's.
    for name, rows in counts.items():
        assert len(load_read_model(settings.read_models_dir, name)) == rows, name

    status = run_cli(churn_cli, "status").stdout
    assert "broker: embedded, running on" in status
    listed = {line.split()[0]: line.split()[1:] for line in status.splitlines() if line.strip()}
    for table in BY_EVENT_ID:
        assert listed.get(table, [None])[0] == str(counts[table]), status


def test_messages_the_release_landed_are_not_landed_again_from_a_new_log(broker_settings):
    """Producers re-sending after the upgrade (a new broker log) add no copies."""
    settings = broker_settings
    before = release_snapshot(settings)
    assert_fixture_as_written(before)
    twice = before["duplicated"]
    once = {
        table: sorted(set(before["first_landed"][table]) - set(twice[table]))[:1]
        for table in BY_EVENT_ID
    }
    resent = {table: twice[table][:2] + once[table] for table in BY_EVENT_ID}
    produce(
        settings,
        Topics.CUSTOMERS,
        release_payloads(settings, "landed_customer_events", resent["landed_customer_events"]),
    )
    produce(
        settings,
        Topics.FEEDBACK,
        release_payloads(settings, "landed_feedback", resent["landed_feedback"]),
    )

    reports = land_everything(settings)

    assert reports[Topics.CUSTOMERS].rows_landed == 0
    assert reports[Topics.FEEDBACK].rows_landed == 0
    with connect(settings.warehouse_path, read_only=True) as con:
        for table in BY_EVENT_ID:
            assert_each_event_once(con, table)
            rows = con.execute(
                f"SELECT event_id, kafka_epoch, kafka_partition, kafka_offset FROM {table}"
            ).fetchall()
            assert {r[0]: tuple(r[1:]) for r in rows} == before["first_landed"][table], table


# -- registry -------------------------------------------------------------------------------------


def test_the_release_registry_is_read_and_verified(settings_path, churn_cli):
    settings = load_settings(settings_path)
    registry = ModelRegistry(settings.registry_dir)

    versions = registry.versions()
    assert [v.version for v in versions] == ["v1", "v2"]
    assert registry.aliases() == {"champion": "v1", "challenger": "v2"}
    for version in versions:
        assert version.code_version == RELEASE["written_by_commit"]
        assert "model.ubj" in version.files and "transformer.json" in version.files
        for name, digest in version.files.items():
            data = registry.read_file(version.version, name)  # verifies the SHA-256
            assert hashlib.sha256(data).hexdigest() == digest
        assert load_model(registry, version.version) is not None
    assert registry.get("champion").version == "v1"
    assert registry.get("challenger").version == "v2"
    assert [e["action"] for e in registry.history()] == [
        "register",
        "set_alias",
        "register",
        "set_alias",
    ]

    listing = run_cli(churn_cli, "models", "list").stdout
    rows = {line.split()[0]: line.split() for line in listing.splitlines()[1:] if line.strip()}
    assert set(rows) == {"v1", "v2"}, listing
    assert "champion" in rows["v1"][1] and "challenger" in rows["v2"][1], listing


# -- serving --------------------------------------------------------------------------------------


def test_serving_resumes_the_release_router_state_and_scores_with_both_versions(settings_path):
    settings = load_settings(settings_path)
    audit_before = (FIXTURE / "serving" / "router_audit.jsonl").read_text().splitlines()
    with connect(settings.warehouse_path, read_only=True) as con:
        customers = con.execute(
            f"SELECT customer_id, {', '.join(FEATURE_NAMES)} FROM landed_customer_events "
            "QUALIFY row_number() OVER (PARTITION BY customer_id ORDER BY event_time DESC) = 1 "
            "ORDER BY customer_id"
        ).df()
    rows = [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        for row in customers.to_dict("records")
    ]
    registry = ModelRegistry(settings.registry_dir)

    plane = ServingPlane(settings)
    try:
        state = plane.state
        assert (state.strategy, state.champion, state.challenger, state.canary_weight) == (
            "canary",
            "v1",
            "v2",
            0.25,
        )
        # Restored, not re-initialised from config (router.strategy shadow, weight 0.1).
        assert plane.store.audit() == [json.loads(line) for line in audit_before]

        row = rows[0]
        for version in ("v1", "v2"):
            served = plane.predict_version(version, [row])
            direct = load_model(registry, version).predict_records(
                [{k: row[k] for k in FEATURE_NAMES}]
            )
            assert 0.0 < float(served[0]) < 1.0
            assert float(served[0]) == pytest.approx(float(direct[0]), abs=1e-6)

        predictions = plane.predict(rows)
        by_customer = {p.customer_id: p for p in predictions}
        for customer_id, prediction in by_customer.items():
            expected = route(state, customer_id)
            assert (prediction.model_version, prediction.arm) == (expected.primary, expected.arm)
        assert {p.model_version for p in predictions} == {"v1", "v2"}
        assert {p.arm for p in predictions} == {"primary", "canary"}
    finally:
        plane.close()


# -- rollout --------------------------------------------------------------------------------------


def test_rollout_status_reads_the_release_rollout_state_and_decisions(settings_path, churn_cli):
    settings = load_settings(settings_path)
    published = read_rollout_state(settings.read_models_dir)
    assert published is not None
    assert (published["phase"], published["champion"], published["challenger"]) == (
        "canary",
        "v1",
        "v2",
    )

    report = json.loads(run_cli(churn_cli, "rollout", "status", "--json").stdout)
    assert (report["state"]["phase"], report["state"]["champion"]) == ("canary", "v1")
    assert report["state"]["challenger"] == "v2"
    decisions = report["decisions"]
    assert [d["action"] for d in decisions] == ["start_shadow", "advance", "wait"]
    assert decisions[1]["phase"] == "shadow -> canary"
    assert decisions[1]["traffic"] == pytest.approx(0.25)
    assert all(d["reasons"] for d in decisions)
    text = run_cli(churn_cli, "rollout", "status").stdout
    assert "phase canary: champion v1, challenger v2" in text

    # The warehouse's audit table gives the same state to the next rollout step.
    with connect(settings.warehouse_path) as con:
        state = current_state(con, ModelRegistry(settings.registry_dir))
    assert (state.phase, state.champion, state.challenger, state.step_index) == (
        Phase.CANARY,
        "v1",
        "v2",
        0,
    )
