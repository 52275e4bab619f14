"""The Dagster wiring on the real definitions: materialise landing assets, evaluate the sensor."""

import dagster as dg
import pytest

from churn_assets.assets.landing import WAREHOUSE_POOL, landing_asset_key, landing_assets
from churn_assets.broker import EmbeddedBroker
from churn_assets.definitions import defs
from churn_assets.kafka import ensure_topics
from churn_assets.resources import PlatformResource
from churn_assets.schemas import DATA_TOPICS, Topics
from churn_assets.warehouse import load_read_model
from sensors.landing import kafka_landing_sensor
from tests.integration.landing_helpers import (
    produce_customer_events,
    produce_payloads,
    simulated_customer_events,
)

pytestmark = pytest.mark.integration


def test_definitions_load_with_landing_assets_sensor_and_pool():
    repository = defs.get_repository_def()
    keys = {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()}
    assert {"landed_customer_events", "landed_predictions", "landed_feedback"} <= keys
    assert repository.has_sensor_def("kafka_landing_sensor")
    assert repository.has_job("landing_job")
    for asset in landing_assets:
        spec = next(iter(asset.specs))
        assert asset.op.pool == WAREHOUSE_POOL
        assert spec.group_name == "landing"
        assert spec.description


def test_materialize_lands_and_reports_metadata(broker_settings, settings_path):
    produced = produce_customer_events(broker_settings, 1_500)
    # 100 of them produced a second time: replays, counted and not landed.
    produce_payloads(broker_settings, simulated_customer_events(1_500)[:100])
    result = dg.materialize(
        landing_assets, resources={"platform": PlatformResource(config_path=str(settings_path))}
    )
    assert result.success
    events = {
        m.asset_key.to_user_string(): m.metadata
        for m in (e.materialization for e in result.get_asset_materialization_events())
    }
    customers = events["landed_customer_events"]
    assert customers["rows_landed"].value == 1_500
    assert (customers["replayed"].value, customers["replayed_total"].value) == (100, 100)
    assert customers["dead_lettered"].value == 0
    assert customers["dead_letters_pending"].value == 0
    assert customers["dagster/row_count"].value == 1_500
    assert customers["reached_end_of_topic"].value is True
    assert "p0: 0.." in customers["offset_ranges"].value
    assert events["landed_feedback"]["rows_landed"].value == 0

    frame = load_read_model(broker_settings.read_models_dir, "landed_customer_events")
    assert sorted(frame["event_id"]) == sorted(produced)


def test_sensor_requests_runs_only_for_new_data_with_stable_run_keys(
    broker_settings, settings_path
):
    platform = PlatformResource(config_path=str(settings_path))
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor=None):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"platform": platform}, definitions=defs
        )
        return kafka_landing_sensor(context)

    empty = tick()
    assert not empty.run_requests
    assert "no new messages" in empty.skip_reason.skip_message

    produce_customer_events(broker_settings, 800)
    first = tick()
    assert [r.asset_selection for r in first.run_requests] == [
        [landing_asset_key(Topics.CUSTOMERS)]
    ]
    again = tick(first.cursor)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]

    dg.materialize(landing_assets[:1], resources={"platform": platform})
    assert not tick(first.cursor).run_requests  # landed and committed: nothing new

    produce_customer_events(broker_settings, 50, seed=9)
    later = tick(first.cursor)
    assert len(later.run_requests) == 1
    assert later.run_requests[0].run_key != first.run_requests[0].run_key


def test_every_data_topic_has_a_landing_asset():
    assert {landing_asset_key(t) for t in DATA_TOPICS} == {
        next(iter(a.keys)) for a in landing_assets
    }


def test_a_restarted_broker_s_log_gets_new_run_keys(broker_settings, settings_path):
    """The same messages produced again after a broker restart give the same watermarks; the
    log's epoch in the run key keeps Dagster from skipping them as already requested."""
    platform = PlatformResource(config_path=str(settings_path))
    instance = dg.DagsterInstance.ephemeral()

    def tick():
        context = dg.build_sensor_context(
            instance=instance, resources={"platform": platform}, definitions=defs
        )
        return kafka_landing_sensor(context)

    produce_customer_events(broker_settings, 300)
    [before] = tick().run_requests
    broker = EmbeddedBroker(broker_settings.run_dir)
    broker.stop()
    broker.start()
    ensure_topics(broker_settings)
    produce_customer_events(broker_settings, 300)
    [after] = tick().run_requests
    assert before.run_key.split("@")[-1] == after.run_key.split("@")[-1]  # same watermarks
    assert before.run_key != after.run_key
