"""A landing run publishes the landed table's read model in parts: a run writes its own new rows,
not the table, and the read model always equals the warehouse table."""

import pytest

from churn_assets.landing import LANDED_ORDER, Lander
from churn_assets.schemas import Topics
from churn_assets.warehouse import connect, parts_dir, read_model_rows, read_model_table
from tests.integration.landing_helpers import produce_customer_events

pytestmark = pytest.mark.integration

TABLE = "landed_customer_events"


def warehouse_rows(settings) -> list[dict]:
    with connect(settings.warehouse_path, read_only=True) as con:
        return (
            con.sql(f"SELECT * FROM {TABLE} ORDER BY {LANDED_ORDER}").to_arrow_table().to_pylist()
        )


def test_each_run_writes_its_new_rows_and_the_read_model_is_the_table(broker_settings):
    settings = broker_settings
    produce_customer_events(settings, 1_200, seed=1)
    first = Lander(settings, Topics.CUSTOMERS).run()
    assert (first.rows_landed, first.read_model_rows_written, first.read_model_parts) == (
        1_200,
        1_200,
        1,
    )
    produce_customer_events(settings, 100, seed=2)
    second = Lander(settings, Topics.CUSTOMERS).run()
    # 100 new rows: a part of their own beside the 1,200 (no merge), nothing else rewritten.
    assert (second.rows_landed, second.read_model_rows_written, second.read_model_parts) == (
        100,
        100,
        2,
    )
    assert second.published[TABLE] == read_model_rows(settings.read_models_dir, TABLE) == 1_300
    assert read_model_table(settings.read_models_dir, TABLE).to_pylist() == warehouse_rows(settings)
    # A run with nothing new writes nothing.
    third = Lander(settings, Topics.CUSTOMERS).run()
    assert (third.rows_landed, third.read_model_rows_written, third.read_model_parts) == (0, 0, 2)
    assert len(list(parts_dir(settings.read_models_dir, TABLE).iterdir())) == 2
