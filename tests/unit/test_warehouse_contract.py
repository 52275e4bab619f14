"""``landed_customer_events`` follows the feature contract: a new warehouse gets the contract's
columns, an existing one gains the features it lacks as nullable columns and keeps every row."""

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
import yaml

from churn_assets.contract import contract_from_dict
from churn_assets.schemas import DEFAULT_CONTRACT
from churn_assets.warehouse import (
    WarehouseMigrationError,
    business_key_index,
    connect,
    customer_events_ddl,
    ensure_schema,
)

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTRA_FEATURES = [
    {"name": "senior_citizen", "kind": "boolean", "description": "65 or older"},
    {
        "name": "tech_support",
        "kind": "category",
        "categories": {"yes": [], "no": [], "no_internet": ["No internet service"]},
    },
]
EVENT = {
    "kafka_topic": "churn.customers",
    "kafka_partition": 0,
    "customer_id": "C1",
    "event_time": datetime(2026, 6, 1, tzinfo=UTC),
    "customer_tenure": 12,
    "monthly_charges": 70.0,
    "total_charges": 840.0,
    "contract_type": "one_year",
    "payment_method": "credit_card",
    "internet_service": "dsl",
    "support_tickets": 1,
    "login_frequency": 20.0,
    "landed_at": datetime(2026, 6, 1, tzinfo=UTC),
}


def contract_with(extra: list[dict], drop: tuple[str, ...] = ()):
    data = yaml.safe_load((REPO_ROOT / "config" / "features.yaml").read_text())
    data["features"] = [f for f in data["features"] if f["name"] not in drop] + extra
    data["derived"] = [] if drop else data.get("derived", [])
    return contract_from_dict(data)


def insert(con: duckdb.DuckDBPyConnection, offset: int, **values) -> None:
    row = {**EVENT, "kafka_offset": offset, "event_id": f"e{offset}", **values}
    columns = ", ".join(row)
    con.execute(
        f"INSERT INTO landed_customer_events ({columns}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )


def columns(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[str, str]]:
    rows = con.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = 'landed_customer_events'"
    ).fetchall()
    return {name: (kind, nullable) for name, kind, nullable in rows}


def test_the_default_contract_gives_the_columns_warehouses_always_had(tmp_path):
    with connect(tmp_path / "warehouse.duckdb") as con:
        ensure_schema(con)
        found = columns(con)
    assert {name: found[name] for name in DEFAULT_CONTRACT.names} == {
        "customer_tenure": ("INTEGER", "NO"),
        "monthly_charges": ("DOUBLE", "NO"),
        "total_charges": ("DOUBLE", "NO"),
        "contract_type": ("VARCHAR", "NO"),
        "payment_method": ("VARCHAR", "NO"),
        "internet_service": ("VARCHAR", "NO"),
        "support_tickets": ("INTEGER", "NO"),
        "login_frequency": ("DOUBLE", "NO"),
    }


def test_an_extended_contract_adds_nullable_columns_and_keeps_the_old_rows(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    with connect(path) as con:
        ensure_schema(con)
        insert(con, 0)
        insert(con, 1, customer_id="C2")
    extended = contract_with(EXTRA_FEATURES)
    with connect(path) as con:
        ensure_schema(con, extended)
        found = columns(con)
        assert found["senior_citizen"] == ("BOOLEAN", "YES")
        assert found["tech_support"] == ("VARCHAR", "YES")
        assert found["customer_tenure"] == ("INTEGER", "NO")
        insert(con, 2, customer_id="C3", senior_citizen=True, tech_support="no_internet")
        ensure_schema(con, extended)  # a second open changes nothing
        rows = con.execute(
            "SELECT event_id, customer_tenure, senior_citizen, tech_support "
            "FROM landed_customer_events ORDER BY kafka_offset"
        ).fetchall()
    assert rows == [
        ("e0", 12, None, None),
        ("e1", 12, None, None),
        ("e2", 12, True, "no_internet"),
    ]


def test_a_new_warehouse_takes_the_contract_columns_not_null(tmp_path):
    with connect(tmp_path / "warehouse.duckdb") as con:
        ensure_schema(con, contract_with(EXTRA_FEATURES))
        found = columns(con)
        assert found["senior_citizen"] == ("BOOLEAN", "NO")
        assert found["tech_support"] == ("VARCHAR", "NO")
        with pytest.raises(duckdb.ConstraintException, match="senior_citizen"):
            insert(con, 0, tech_support="yes")


def test_a_feature_left_out_of_the_contract_keeps_its_data_and_takes_null(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    with connect(path) as con:
        ensure_schema(con)
        insert(con, 0)
    narrower = contract_with([], drop=("login_frequency",))
    with connect(path) as con:
        ensure_schema(con, narrower)
        assert columns(con)["login_frequency"] == ("DOUBLE", "YES")
        event = {k: v for k, v in EVENT.items() if k != "login_frequency"}
        con.execute(
            f"INSERT INTO landed_customer_events ({', '.join(event)}, kafka_offset, event_id) "
            f"VALUES ({', '.join('?' * len(event))}, 1, 'e1')",
            list(event.values()),
        )
        assert con.execute(
            "SELECT event_id, login_frequency FROM landed_customer_events ORDER BY 1"
        ).fetchall() == [("e0", 20.0), ("e1", None)]
        # The business key's unique index was rebuilt around the change.
        indexes = {r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall()}
        assert business_key_index("landed_customer_events") in indexes
        with pytest.raises(duckdb.ConstraintException):
            insert(con, 2, event_id="e0")


def test_a_feature_whose_column_has_another_type_stops_with_its_name(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    with connect(path) as con:
        ensure_schema(con)
        insert(con, 0)
    data = yaml.safe_load((REPO_ROOT / "config" / "features.yaml").read_text())
    for feature in data["features"]:
        if feature["name"] == "support_tickets":
            feature.update(kind="category", categories=["few", "many"])
            for key in ("min", "max", "trend", "example"):
                feature.pop(key, None)
    data["derived"] = [d for d in data["derived"] if "support_tickets" not in d["expression"]]
    changed = contract_from_dict(data)
    with connect(path) as con:
        with pytest.raises(WarehouseMigrationError, match="support_tickets is INTEGER"):
            ensure_schema(con, changed)
        assert con.execute("SELECT count(*) FROM landed_customer_events").fetchall() == [(1,)]


def test_a_feature_named_like_an_event_column_is_refused():
    clash = contract_with([{"name": "event_time", "kind": "number"}])
    with pytest.raises(WarehouseMigrationError, match=r"feature names \['event_time'\]"):
        customer_events_ddl(clash)
