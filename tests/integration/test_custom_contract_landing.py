"""A ten-feature contract end to end through a real broker: an export with ``senior_citizen``
(boolean) and ``tech_support`` (category) is imported, landed into a warehouse that already
holds default-contract tables, and trained on by the ML assets (a single snapshot: split by
customer), registering a version that carries the contract."""

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from churn_assets.assets.ml import ml_asset_checks, ml_assets
from churn_assets.config import load_settings
from churn_assets.importer import ImportMapping, plan_import, produce_plan, read_export
from churn_assets.kafka import make_producer
from churn_assets.landing import Lander
from churn_assets.model import load_model
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.schemas import DEFAULT_CONTRACT, Topics
from churn_assets.training import GROUPED_SPLIT
from churn_assets.warehouse import connect, ensure_schema, load_read_model
from tests.conftest import write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = 5000


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A seeded telco-layout export (and its ten-feature contract and mapping beside it)."""
    path = tmp_path / "export" / "telco.csv"
    path.parent.mkdir()
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "make_telco_export.py"),
            str(path),
            "--rows",
            str(ROWS),
            "--bad",
            "20",
            "--seed",
            "7",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return path


@pytest.fixture
def settings_path(tmp_path: Path, export: Path) -> Path:
    """The test config with ``features.contract`` at the export's ten-feature contract (the
    ``broker_settings`` fixture reads it)."""
    return write_config(
        tmp_path,
        landing={"batch_max_messages": 2000, "batch_max_seconds": 1.0},
        features={"contract": str(export.with_suffix(".features.yaml"))},
    )


def materialization(result, key):
    for event in result.get_asset_materialization_events():
        if event.materialization.asset_key.to_user_string() == key:
            return event.materialization.metadata
    return None


def test_an_extended_contract_is_imported_landed_and_trained(
    broker_settings, settings_path, export
):
    contract = broker_settings.contract
    assert contract.names == (*DEFAULT_CONTRACT.names, "senior_citizen", "tech_support")
    # A warehouse from before the contract: default-contract tables already there.
    with connect(broker_settings.warehouse_path) as con:
        ensure_schema(con)

    mapping = ImportMapping.from_yaml(export.with_suffix(".extended.mapping.yaml"))
    plan = plan_import(
        read_export(export), mapping, contract, broker_settings.training.horizon_days
    )
    assert len(plan.events) == ROWS - 20 and len(plan.rejects) == 20
    produce_plan(make_producer(broker_settings), plan, contract)
    for topic in (Topics.CUSTOMERS, Topics.FEEDBACK):
        report = Lander(broker_settings, topic).run()
        assert report.reached_eof and report.dead_lettered == 0
        assert report.rows_landed == ROWS - 20

    with connect(broker_settings.warehouse_path, read_only=True) as con:
        kinds = dict(
            con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'landed_customer_events'"
            ).fetchall()
        )
        tech_support = {
            r[0]: r[1]
            for r in con.execute(
                "SELECT tech_support, count(*) FROM landed_customer_events GROUP BY 1"
            ).fetchall()
        }
        seniors = con.execute(
            "SELECT count(*) FILTER (WHERE senior_citizen), count(senior_citizen) "
            "FROM landed_customer_events"
        ).fetchall()[0]
    assert (kinds["senior_citizen"], kinds["tech_support"]) == ("BOOLEAN", "VARCHAR")
    assert set(tech_support) == {"yes", "no", "no_internet"}  # canonical, not "No internet ..."
    assert seniors[1] == ROWS - 20 and 0 < seniors[0] < seniors[1]
    landed = load_read_model(broker_settings.read_models_dir, "landed_customer_events")
    assert {"senior_citizen", "tech_support"} <= set(landed.columns)

    result = dg.materialize(
        [*ml_assets, *ml_asset_checks],
        resources={"platform": PlatformResource(config_path=str(settings_path))},
        raise_on_error=False,
    )
    assert result.success

    training = materialization(result, "training_set")
    assert training["split_method"].value == GROUPED_SPLIT
    assert training["split_reason"].value.startswith("single snapshot: all 4980 customers")
    assert training["contract_digest"].value == contract.digest

    candidate = materialization(result, "candidate_model")
    assert candidate["split_method"].value == GROUPED_SPLIT
    assert candidate["test_roc_auc"].value >= broker_settings.retraining.performance_threshold
    assert candidate["test_roc_auc"].value > candidate["baseline_roc_auc"].value
    # The simulator's formula reads the default contract only: no "known best" here.
    assert "simulator_best_auc" not in candidate

    registered = materialization(result, "registered_model")
    assert (registered["version"].value, registered["alias"].value) == ("v1", "champion")
    registry = ModelRegistry(broker_settings.registry_dir)
    metadata = registry.get("v1").metadata
    assert metadata["contract_digest"] == contract.digest
    assert metadata["split"]["method"] == GROUPED_SPLIT
    model = load_model(registry, "v1")
    assert model.contract.digest == contract.digest
    assert {"senior_citizen", "tech_support"} <= set(model.transformer.inputs)
    record = landed.iloc[0][list(contract.names)].to_dict()
    assert 0.0 < float(model.predict_records([record])[0]) < 1.0

    importance = load_read_model(broker_settings.read_models_dir, "feature_importance")
    assert {"senior_citizen", "tech_support"} <= set(importance["feature"])

    again = load_settings(settings_path)
    assert again.contract.digest == contract.digest
