"""Your own data, end to end, as docs/YOUR_DATA.md tells a user to do it.

A telco-layout CSV (``scripts/make_telco_export.py``: 5,000 rows, 40 damaged, with the two extra
columns ``SeniorCitizen`` and ``TechSupport``) and the ten-feature contract the script writes
beside it (the default eight plus a boolean ``senior_citizen`` and a category ``tech_support``):
``churn import`` → ``churn land`` through a real broker → training in Dagster on that single
snapshot → a registered champion → ``churn serve`` (REST ``/predict`` and ``/explain``, gRPC V2)
→ the drift report → the dashboard's prediction form in headless Chromium. Importing the file a
second time lands nothing.
"""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import dagster as dg
import grpc
import pytest
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from playwright.sync_api import expect

from churn_assets.assets.ml import ml_asset_checks, ml_assets
from churn_assets.assets.monitoring import drift_report
from churn_assets.broker import EmbeddedBroker
from churn_assets.config import REPO_ROOT, load_settings
from churn_assets.kafka import ensure_topics
from churn_assets.model import load_model
from churn_assets.monitoring import read_monitoring
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.warehouse import connect
from tests.browser import Dashboard, chromium
from tests.conftest import write_config
from tests.serving_fixtures import EXTENDED_REQUEST, infer_request, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS, DAMAGED = 5000, 40
EXTRA = ("senior_citizen", "tech_support")
REQUEST = EXTENDED_REQUEST  # as a CRM spells it, with the two extra features


def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def landed(settings, table):
    with connect(settings.warehouse_path, read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def materialization(result, key):
    for event in result.get_asset_materialization_events():
        if event.materialization.asset_key.to_user_string() == key:
            return event.materialization.metadata
    raise AssertionError(f"{key} was not materialized")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The export imported and landed once, and the outputs of both commands."""
    root = tmp_path_factory.mktemp("your-data")
    export = root / "telco.csv"
    made = run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "make_telco_export.py"),
            str(export),
            "--rows",
            str(ROWS),
            "--bad",
            str(DAMAGED),
            "--seed",
            "11",
        ]
    )
    assert made.returncode == 0, made.stderr
    config = write_config(root, features={"contract": str(root / "telco.features.yaml")})
    settings = load_settings(config)
    assert settings.contract.names[-2:] == EXTRA
    cli = [sys.executable, "-m", "churn_assets.cli", "--config", str(config)]
    broker = EmbeddedBroker(settings.run_dir)
    broker.start()
    try:
        ensure_topics(settings)
        mapping = root / "telco.extended.mapping.yaml"
        first = run([*cli, "import", str(export), "--mapping", str(mapping)])
        assert first.returncode == 0, first.stderr
        landing = run([*cli, "land"])
        assert landing.returncode == 0, landing.stderr
        yield {
            "root": root,
            "config": config,
            "settings": settings,
            "cli": cli,
            "export": export,
            "mapping": mapping,
            "import": first,
        }
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def trained(imported):
    """Dagster's training assets and gate checks on the landed snapshot."""
    result = dg.materialize(
        [*ml_assets, *ml_asset_checks],
        resources={"platform": PlatformResource(config_path=str(imported["config"]))},
        raise_on_error=False,
    )
    assert result.success
    return result


@pytest.fixture(scope="module")
def served(imported, trained):
    server = start_server(imported["config"], imported["root"] / "serve.log")
    try:
        yield server
    finally:
        server.stop()


def test_import_lands_valid_rows_rejects_damaged_ones_and_lands_nothing_twice(imported):
    settings, export = imported["settings"], imported["export"]
    assert f"{ROWS} rows, {ROWS - DAMAGED} valid, {DAMAGED} rejected" in imported["import"].stderr
    rejects = (export.parent / "telco.rejects.csv").read_text().splitlines()
    assert rejects[0] == "row,column,reason" and len(rejects) == DAMAGED + 1
    reasons = "\n".join(rejects[1:])
    assert "unknown category 'Three year'" in reasons
    assert "Maybe" in reasons and "tenure" in reasons and "MonthlyCharges" in reasons
    assert landed(settings, "landed_customer_events") == ROWS - DAMAGED
    assert landed(settings, "landed_feedback") == ROWS - DAMAGED
    with connect(settings.warehouse_path, read_only=True) as con:
        values = dict(
            con.execute(
                "SELECT tech_support, count(*) FROM landed_customer_events GROUP BY 1"
            ).fetchall()
        )
        seniors = con.execute(
            "SELECT count(*) FROM landed_customer_events WHERE senior_citizen"
        ).fetchone()[0]
    assert set(values) == {"yes", "no", "no_internet"}
    assert 0 < seniors < ROWS - DAMAGED

    again = run([*imported["cli"], "import", str(export), "--mapping", str(imported["mapping"])])
    assert again.returncode == 0, again.stderr
    landing = run([*imported["cli"], "land"])
    assert landing.returncode == 0, landing.stderr
    assert f"replayed (already landed, not inserted) {ROWS - DAMAGED}" in landing.stdout
    assert landed(settings, "landed_customer_events") == ROWS - DAMAGED
    assert landed(settings, "landed_feedback") == ROWS - DAMAGED


def test_the_snapshot_trains_a_champion_that_carries_the_ten_feature_contract(imported, trained):
    settings = imported["settings"]
    training = materialization(trained, "training_set")
    candidate = materialization(trained, "candidate_model")
    split = json.dumps({k: str(v.value) for k, v in {**training, **candidate}.items()})
    assert "customer" in split and "stratified" in split
    auc = candidate["test_roc_auc"].value
    print(f"ten-feature snapshot: holdout ROC-AUC {auc:.3f}")
    assert 0.6 < auc <= 1.0
    registry = ModelRegistry(settings.registry_dir)
    assert registry.aliases()["champion"] == "v1"
    model = load_model(registry, "champion")
    assert model.contract.digest == settings.contract.digest
    assert model.contract.names[-2:] == EXTRA
    assert {"senior_citizen", "tech_support"} <= set(model.transformer.source_features())
    shown = run([*imported["cli"], "models", "show", "v1"])
    assert shown.returncode == 0, shown.stderr
    assert settings.contract.digest in shown.stdout
    assert "tech_support" in shown.stdout and "senior_citizen" in shown.stdout


def test_rest_and_grpc_serve_the_ten_features(imported, served):
    status, body = post(f"{served.http}/predict", {**REQUEST, "customer_id": "c-10"})
    assert status == 200, body
    assert 0.0 <= body["probability"] <= 1.0

    # One contribution per model input: ten features and the three derived ones.
    status, body = post(f"{served.http}/explain?top_k=13", REQUEST)
    assert status == 200, body
    named = {c["feature"] for c in body["top_contributions"]}
    assert {"senior_citizen", "tech_support", "charge_ratio"} <= named and len(named) == 13
    assert post(f"{served.http}/explain?top_k=14", REQUEST)[0] == 422

    missing = {k: v for k, v in REQUEST.items() if k != "tech_support"}
    status, body = post(f"{served.http}/predict", missing)
    assert status == 422 and "tech_support" in json.dumps(body)

    row = {
        **REQUEST,
        "customer_id": "g-10",
        "contract_type": "two_year",
        "payment_method": "credit_card",
        "internet_service": "fiber_optic",
        "tech_support": "no_internet",
    }
    names = imported["settings"].contract.names
    with grpc.insecure_channel(served.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(infer_request([row], names=names), timeout=30)
    assert len(answer.outputs) >= 1


def test_the_drift_report_covers_every_feature_of_the_contract(imported, trained):
    result = dg.materialize(
        [drift_report],
        resources={"platform": PlatformResource(config_path=str(imported["config"]))},
        raise_on_error=False,
    )
    assert result.success
    settings = imported["settings"]
    latest = read_monitoring(settings.read_models_dir)["drift"]
    assert set(latest["features"]) == {*settings.contract.names, "prediction"}
    with connect(settings.warehouse_path, read_only=True) as con:
        detectors = dict(
            con.execute(
                "SELECT feature, detector FROM drift_history WHERE report_id = ?",
                [latest["report_id"]],
            ).fetchall()
        )
    # Per kind: KS for integers and numbers, chi-square for categories and booleans.
    assert {f: detectors[f] for f in ("customer_tenure", "monthly_charges")} == {
        "customer_tenure": "ks",
        "monthly_charges": "ks",
    }
    assert {f: detectors[f] for f in ("senior_citizen", "tech_support", "contract_type")} == {
        "senior_citizen": "chi2",
        "tech_support": "chi2",
        "contract_type": "chi2",
    }


def test_the_dashboard_form_asks_for_the_extra_features(imported, served):
    contract = imported["settings"].contract
    dashboard = Dashboard(imported["config"], served.http, imported["root"] / "panel.log")
    try:
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{dashboard.url}?page=prediction")
            for name in EXTRA:
                label = contract.feature(name).description
                expect(page.get_by_text(label, exact=False).first).to_be_visible(timeout=30_000)
            page.get_by_role("button", name="Predict").click()
            expect(page.get_by_text("churn probability", exact=False).first).to_be_visible(
                timeout=30_000
            )
            assert page.get_by_text("Traceback").count() == 0
    finally:
        dashboard.stop()
