"""The dashboard's data layer without a browser: missing, empty and broken sources become
explanations; form validation; the Dagster GraphQL query against Dagster's own schema."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import panel as pn
import pytest

from churn_assets.config import load_settings
from churn_assets.monitoring import publish_monitoring_section
from churn_assets.schemas import DEFAULT_CONTRACT
from dashboards.forms import default_features, validate_features
from dashboards.sources import Unavailable
from dashboards.sources.dagster import DAGSTER_RUNS_QUERY, dagster_graphql_url, dagster_runs
from dashboards.sources.kafka import kafka_lag
from dashboards.sources.read_models import ReadModels, open_alerts
from dashboards.sources.registry import registry_versions
from dashboards.sources.serving import ServingClient, request_rate
from tests.serving_fixtures import free_port

pytestmark = pytest.mark.unit

DEFAULT_FEATURES = default_features(DEFAULT_CONTRACT)


@pytest.fixture
def settings(config_factory):
    # Nothing listens on these ports: serving and Dagster are "down".
    return load_settings(
        config_factory(serving={"http_port": free_port()}, dagster={"webserver_port": free_port()})
    )


def test_missing_read_model_explains_what_publishes_it(settings):
    result = ReadModels(settings).frame("customer_segments", what="Customer segments")
    assert isinstance(result, Unavailable)
    assert result.source == "Customer segments"
    assert (
        "not been published yet" in result.reason and "customer_segments.parquet" in result.reason
    )
    assert "Dagster" in result.hint


def test_empty_and_corrupt_read_models_are_explained(settings):
    directory = settings.read_models_dir
    directory.mkdir(parents=True)
    pd.DataFrame({"feature": pd.Series([], dtype=str)}).to_parquet(directory / "empty.parquet")
    (directory / "broken.parquet").write_bytes(b"not a parquet file")
    empty = ReadModels(settings).frame("empty")
    broken = ReadModels(settings).frame("broken")
    assert isinstance(empty, Unavailable) and empty.reason == "it holds no rows yet"
    assert isinstance(broken, Unavailable) and "cannot be read" in broken.reason


def test_no_rollout_yet_then_state_and_decisions(settings):
    models = ReadModels(settings)
    for result in (models.rollout_state(), models.rollout_decisions()):
        assert isinstance(result, Unavailable) and result.reason == "no rollout yet"
    directory = settings.read_models_dir
    directory.mkdir(parents=True)
    state = {"phase": "canary", "champion": "v1", "challenger": "v2", "step_index": 0}
    (directory / "rollout_state.json").write_text(json.dumps(state | {"updated_at": "x"}))
    pd.DataFrame(
        {
            "decided_at": pd.to_datetime(["2026-01-01T10:00Z", "2026-01-01T11:00Z"]),
            "action": ["start_shadow", "advance"],
            "reasons": [json.dumps(["shadowing v2"]), json.dumps(["agreement 0.97", "ks 0.04"])],
        }
    ).to_parquet(directory / "rollout_decisions.parquet")
    assert models.rollout_state()["phase"] == "canary"
    decisions = models.rollout_decisions()
    assert decisions["action"].tolist() == ["advance", "start_shadow"]  # newest first
    assert decisions["reasons"].tolist() == [["agreement 0.97", "ks 0.04"], ["shadowing v2"]]


def test_monitoring_read_model_and_open_alerts(settings):
    assert isinstance(ReadModels(settings).monitoring(), Unavailable)
    directory = settings.read_models_dir
    publish_monitoring_section(
        directory,
        "drift",
        {
            "features": {
                "monthly_charges": {"p_value": 1e-9, "drift": True},
                "support_tickets": {"p_value": 0.4, "drift": False},
            },
            "multivariate": {"p_value": 0.001, "drift": True},
        },
    )
    publish_monitoring_section(
        directory,
        "outliers",
        {"rates": {"mahalanobis": 0.05, "isolation_forest": 0.011}, "expected": 0.01},
    )
    publish_monitoring_section(
        directory,
        "performance",
        {
            "auc": [
                {
                    "model_version": "v2",
                    "arm": "canary",
                    "kind": "realised",
                    "roc_auc": 0.7,
                    "labelled": 500,
                }
            ]
        },
    )
    monitoring = ReadModels(settings).monitoring()
    alerts = {(a["kind"], a["subject"]) for a in open_alerts(settings, monitoring)}
    assert alerts == {
        ("drift", "monthly_charges"),
        ("drift", "multivariate (MMD)"),
        ("outliers", "mahalanobis"),
        ("performance", "v2/canary"),
    }
    assert (
        open_alerts(settings, {"drift": {"features": {"x": {"p_value": 0.5, "drift": False}}}})
        == []
    )


def test_unreachable_serving_is_explained_not_raised(settings, monkeypatch):
    monkeypatch.delenv("CHURN_ADMIN_TOKEN", raising=False)
    client = ServingClient.from_settings(settings)
    for result in (
        client.health(),
        client.router_metrics(),
        client.prediction_counts(),
        client.predict(DEFAULT_FEATURES),
        client.explain(DEFAULT_FEATURES, "v1"),
    ):
        assert isinstance(result, Unavailable), result
        assert result.source == "Serving API" and "does not answer" in result.reason
    refused = client.promote()
    assert not refused.ok and "CHURN_ADMIN_TOKEN" in refused.message
    assert isinstance(client.audit(), Unavailable)


def test_admin_call_to_a_down_server_fails_with_the_reason(settings, monkeypatch):
    monkeypatch.setenv("CHURN_ADMIN_TOKEN", "secret")
    client = ServingClient.from_settings(settings)
    result = client.rollback()
    assert not result.ok and "does not answer" in result.message
    assert "secret" not in result.message


def test_form_validation_uses_the_platform_schema():
    assert validate_features(DEFAULT_FEATURES, DEFAULT_CONTRACT).features == DEFAULT_FEATURES
    missing = validate_features(DEFAULT_FEATURES | {"customer_tenure": None}, DEFAULT_CONTRACT)
    assert not missing.ok and missing.errors == {"customer_tenure": "required"}
    bad = validate_features(
        DEFAULT_FEATURES
        | {"support_tickets": -1, "contract_type": "weekly", "monthly_charges": float("nan")},
        DEFAULT_CONTRACT,
    )
    assert not bad.ok
    assert set(bad.errors) == {"support_tickets", "contract_type", "monthly_charges"}
    assert "greater than or equal to 0" in bad.errors["support_tickets"]
    assert "month-to-month" in bad.errors["contract_type"]


def test_request_rate_needs_two_samples_and_ignores_counter_resets():
    assert request_rate(None, (10.0, 100.0)) is None
    assert request_rate((10.0, 100.0), (15.0, 150.0)) == pytest.approx(10.0)
    assert request_rate((10.0, 100.0), (15.0, 3.0)) is None


def test_the_runs_query_is_valid_against_dagsters_schema():
    from dagster_graphql.schema import create_schema
    from graphql import parse, validate

    assert validate(create_schema().graphql_schema, parse(DAGSTER_RUNS_QUERY)) == []


class _GraphQL(BaseHTTPRequestHandler):
    answer: dict = {}

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["query"] == DAGSTER_RUNS_QUERY and body["variables"] == {"limit": 10}
        payload = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def graphql_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GraphQL)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_dagster_runs_parsed_and_errors_explained(config_factory, graphql_server):
    port = graphql_server.server_address[1]
    settings = load_settings(config_factory(dagster={"webserver_port": port}))
    _GraphQL.answer = {
        "data": {
            "runsOrError": {
                "__typename": "Runs",
                "results": [
                    {
                        "runId": "abcdef123456",
                        "jobName": "training_job",
                        "status": "SUCCESS",
                        "creationTime": 1.7e9,
                        "startTime": 1.7e9 + 1,
                        "endTime": 1.7e9 + 31.5,
                    },
                    {
                        "runId": "0123456789ab",
                        "jobName": "__ASSET_JOB",
                        "status": "STARTED",
                        "creationTime": 1.7e9,
                        "startTime": None,
                        "endTime": None,
                    },
                ],
            }
        }
    }
    runs = dagster_runs(settings)
    assert runs[["run", "job", "status"]].values.tolist() == [
        ["abcdef12", "training_job", "SUCCESS"],
        ["01234567", "__ASSET_JOB", "STARTED"],
    ]
    assert runs["duration_s"].tolist()[0] == 30.5
    _GraphQL.answer = {"data": {"runsOrError": {"__typename": "PythonError", "message": "boom"}}}
    failed = dagster_runs(settings)
    assert isinstance(failed, Unavailable) and failed.reason == "boom"


def test_dagster_url_setting_is_where_runs_are_read(config_factory, graphql_server):
    """``dagster.url`` (the webserver's service name in Compose) wins over the local port."""
    port = graphql_server.server_address[1]
    dead = free_port()
    local = load_settings(config_factory(dagster={"webserver_port": dead}))
    assert dagster_graphql_url(local) == f"http://127.0.0.1:{dead}/graphql"
    assert isinstance(dagster_runs(local), Unavailable)
    settings = load_settings(
        config_factory(dagster={"webserver_port": dead, "url": f"http://127.0.0.1:{port}/"})
    )
    assert dagster_graphql_url(settings) == f"http://127.0.0.1:{port}/graphql"
    _GraphQL.answer = {"data": {"runsOrError": {"__typename": "Runs", "results": []}}}
    result = dagster_runs(settings)
    assert isinstance(result, Unavailable) and result.reason == "Dagster has no runs yet"


class _Serving(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        payload = json.dumps({"path": self.path, "state": {"champion": "v1"}}).encode()
        self.send_response(200 if self.path == "/router/metrics" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_serving_client_uses_the_rollouts_serving_url(config_factory, monkeypatch):
    """The dashboard reaches serving where the rollout does: ``serving.url`` when set (e.g.
    http://serving:8080 in Compose), else ``serving.host``/``http_port`` with a wildcard bind
    address read as this machine."""
    from churn_assets.rollout_control import serving_url

    monkeypatch.delenv("CHURN_SERVING__URL", raising=False)
    dead = free_port()
    local = load_settings(config_factory(serving={"host": "0.0.0.0", "http_port": dead}))
    assert ServingClient.from_settings(local).base_url == f"http://127.0.0.1:{dead}"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Serving)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        settings = load_settings(
            config_factory(serving={"host": "0.0.0.0", "http_port": dead, "url": url})
        )
        client = ServingClient.from_settings(settings)
        assert client.base_url == serving_url(settings) == url.rstrip("/")
        assert client.router_metrics() == {"path": "/router/metrics", "state": {"champion": "v1"}}
        monkeypatch.setenv("CHURN_SERVING__URL", f"http://127.0.0.1:{dead}")
        from_env = ServingClient.from_settings(load_settings(config_factory()))
        assert from_env.base_url == f"http://127.0.0.1:{dead}"
        assert isinstance(from_env.router_metrics(), Unavailable)
    finally:
        server.shutdown()
        server.server_close()


def test_dagster_down_is_explained(settings):
    result = dagster_runs(settings)
    assert isinstance(result, Unavailable) and "does not answer" in result.reason


def test_kafka_lag_without_a_broker_is_explained(settings):
    result = kafka_lag(settings, ReadModels(settings).frame("landing_offsets"), budget_s=0.5)
    assert isinstance(result, Unavailable)
    assert "broker cannot be reached" in result.reason and "not running" in result.reason


def test_empty_registry_is_explained(settings):
    result = registry_versions(settings)
    assert isinstance(result, Unavailable) and "no model is registered" in result.reason


EXPLAINED = {
    "monitoring": ["Serving API", "Kafka lag", "Dagster runs"],
    "drift": ["Monitoring figures", "Drift history"],
    "prediction": ["Serving API"],
    "models": ["Serving API", "Model registry", "Rollout state", "Rollout decisions"],
    "analytics": ["Calibration", "Customer segments", "Feature importance"],
}


@pytest.mark.parametrize("page_key", list(EXPLAINED))
def test_every_page_builds_with_nothing_available(settings, page_key, monkeypatch):
    """No read models, no registry, no serving, no Dagster, no broker: each page still builds
    and explains what is missing."""
    monkeypatch.delenv("CHURN_ADMIN_TOKEN", raising=False)
    from dashboards.app import PAGES
    from dashboards.pages.common import Context

    page = PAGES[page_key][1](Context.from_settings(settings))
    layout = page.__panel__()
    if page_key == "prediction":  # nothing is called until the form is submitted
        page._on_submit()
        layout = page.routed
    alerts = [alert.object for alert in layout.select(pn.pane.Alert) if alert.object]
    for source in EXPLAINED[page_key]:
        assert any(f"**{source}** is unavailable" in text for text in alerts), (source, alerts)
    assert all("unavailable" in text or "disabled" in text for text in alerts), alerts


def _calibration(**overrides) -> pd.DataFrame:
    rows = {
        "grouping": ["decile", "decile", "decile", "segment"],
        "group_label": ["2", "10", "1", "month-to-month"],
        "customers": [100, 100, 100, 300],
        "predicted_rate": [0.05, 0.40, 0.02, 0.20],
        "observed_rate": [0.06, 0.30, 0.02, 0.21],
        "tolerance": [0.03, 0.05, 0.02, 0.03],
        "horizon_days": [14, 14, 14, 14],
        "model_version": ["v3"] * 4,
    }
    return pd.DataFrame(rows | overrides)


def test_calibration_waits_for_its_read_model_then_checks_its_shape(settings):
    from dashboards.pages.analytics import calibration_rows

    models = ReadModels(settings)
    waiting = models.calibration()
    assert isinstance(waiting, Unavailable) and waiting.source == "Calibration"
    assert waiting.reason.startswith("waiting for the 'calibration' read model")
    assert "calibration.parquet" in waiting.reason and "horizon" in waiting.hint
    directory = settings.read_models_dir
    directory.mkdir(parents=True)
    path = directory / "calibration.parquet"
    _calibration().drop(columns="tolerance").to_parquet(path)
    absent = models.calibration()
    assert isinstance(absent, Unavailable) and absent.reason.endswith("no column tolerance")
    _calibration(horizon_days=[14, 14, 7, 14]).to_parquet(path)
    mixed = models.calibration()
    assert isinstance(mixed, Unavailable) and "mixes horizon_days values (14, 7)" in mixed.reason
    _calibration().to_parquet(path)
    frame = models.calibration()
    deciles = calibration_rows(frame, "decile")
    assert deciles["group_label"].tolist() == ["1", "2", "10"]  # numeric, not text, order
    assert deciles["within"].tolist() == [True, True, False]  # |0.30 - 0.40| > 0.05
    assert deciles["gap"].round(4).tolist() == [0.0, 0.01, -0.1]
    assert calibration_rows(frame, "segment")["group_label"].tolist() == ["month-to-month"]


def test_the_app_module_never_imports_dagster():
    import subprocess
    import sys

    code = (
        "import sys, dashboards.app; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_read_models_are_cached_until_republished_and_copies_are_independent(settings):
    directory = settings.read_models_dir
    directory.mkdir(parents=True)
    path = directory / "feature_importance.parquet"
    pd.DataFrame({"feature": ["a"], "mean_abs_shap": [0.5]}).to_parquet(path)
    models = ReadModels(settings)
    first = models.frame("feature_importance")
    first.loc[0, "feature"] = "changed by a page"
    assert models.frame("feature_importance")["feature"].tolist() == ["a"]
    tmp = directory / ".feature_importance.tmp"
    pd.DataFrame({"feature": ["a", "b"], "mean_abs_shap": [0.5, 0.2]}).to_parquet(tmp)
    tmp.replace(path)  # how publishers replace read models: atomically
    assert models.frame("feature_importance")["feature"].tolist() == ["a", "b"]


def test_lag_counts_from_offsets_of_the_brokers_current_log_only():
    from dashboards.sources.kafka import _landed_offsets

    offsets = pd.DataFrame(
        {
            "kafka_epoch": ["legacy", "now", "old", "legacy", "old"],
            "topic": ["t", "t", "t", "t", "u"],
            "kafka_partition": [0, 0, 1, 2, 0],
            "next_offset": [5, 9, 100, 4, 50],
        }
    )
    # Current epoch beats legacy; another epoch's offsets count as nothing; legacy alone counts.
    assert _landed_offsets(offsets, {"t": "now", "u": "new"}) == {("t", 0): 9, ("t", 2): 4}
    without_epochs = offsets.drop(columns="kafka_epoch").iloc[[1, 2]]
    assert _landed_offsets(without_epochs, {"t": "now"}) == {("t", 0): 9, ("t", 1): 100}
    assert _landed_offsets(Unavailable("x", "y"), {"t": "now"}) == {}
