"""The notebooks, executed end to end with nbclient against small demo data.

The demo data is built once for the module the way a user builds it, only smaller: a covariate
drift scenario simulated with `churn simulate` into a real embedded broker, `churn land`, the
training assets twice (v1 champion, then v2 challenger from a retrain with another seed), a real
`churn serve` that takes shadow traffic and then canary traffic, `churn land` of the mirrored
predictions, and the monitoring assets. Each notebook then runs top to bottom in a fresh kernel
(the project's Python) with `CHURN_CONFIG` pointing at that data, and its summary cell is checked
against the registry, the read models and the running router.
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from churn_assets.assets.ml import ml_asset_checks, ml_assets
from churn_assets.assets.monitoring import monitoring_assets, monitoring_checks
from churn_assets.broker import EmbeddedBroker
from churn_assets.config import REPO_ROOT, Settings, load_settings
from churn_assets.kafka import ensure_topics
from churn_assets.monitoring import read_monitoring
from churn_assets.registry import ModelRegistry
from churn_assets.resources import PlatformResource
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.warehouse import load_read_model
from tests.conftest import write_config
from tests.serving_fixtures import ADMIN_TOKEN, RunningServer, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NOTEBOOKS = REPO_ROOT / "notebooks"
SCENARIO_START_DAY = 75
SHADOW_REQUESTS = 600
CANARY_REQUESTS = 600
CANARY_WEIGHT = 0.5
BATCH = 200
CELL_TIMEOUT_S = 180
# A Python warning printed by a cell ("...Warning: ..."), not TensorFlow's C++ log lines.
PYTHON_WARNING = re.compile(r"\b[A-Z]\w*Warning: ")


@dataclass(frozen=True)
class Demo:
    config_path: Path
    settings: Settings
    server: RunningServer


def _run(argv: list[str], log: Path) -> None:
    with log.open("a") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == 0, f"{argv[4:]} failed:\n{log.read_text()[-3000:]}"


def _materialize(config_path: Path, assets: list[Any]) -> None:
    result = dg.materialize(
        assets,
        resources={"platform": PlatformResource(config_path=str(config_path))},
        raise_on_error=False,
    )
    failures = [e.message for e in result.all_events if e.is_failure]
    assert result.success, failures


def _call(server: RunningServer, method: str, path: str, body: Any = None, token=None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        server.http + path,
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method=method,
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _wait_for(server: RunningServer, done, what: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = _call(server, "GET", "/router/metrics")
        if done(metrics):
            return metrics
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {metrics}"
        time.sleep(0.2)


def _send(server: RunningServer, records: list[dict]) -> None:
    for start in range(0, len(records), BATCH):
        _call(server, "POST", "/predict/batch", {"instances": records[start : start + BATCH]})


def _serve_shadow_then_canary(server: RunningServer, settings: Settings) -> None:
    events = load_read_model(settings.read_models_dir, "landed_customer_events")
    recent = events.sort_values("event_time").tail(SHADOW_REQUESTS + CANARY_REQUESTS)
    records = [
        {**{name: row[name] for name in FEATURE_NAMES}, "customer_id": row["customer_id"]}
        for row in json.loads(recent.to_json(orient="records"))
    ]
    _send(server, records[:SHADOW_REQUESTS])
    _wait_for(
        server,
        lambda m: m["requests"].get("v2/shadow/ok", 0) == SHADOW_REQUESTS,
        "shadow scoring",
    )
    _call(
        server,
        "PUT",
        "/router/policy",
        {"strategy": "canary", "canary_weight": CANARY_WEIGHT},
        token=ADMIN_TOKEN,
    )
    _send(server, records[SHADOW_REQUESTS:])
    expected = 2 * SHADOW_REQUESTS + CANARY_REQUESTS  # primary + shadow, then one per request
    _wait_for(server, lambda m: m["mirror"]["delivered"] == expected, "the Kafka mirror")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Demo]:
    root = tmp_path_factory.mktemp("notebook-demo")
    config_path = write_config(
        root,
        simulator={
            "customers": 2000,
            "days": 90,
            "scenario": "covariate_drift",
            "scenario_start_day": SCENARIO_START_DAY,
        },
        # Judge the canary on its evidence at once instead of waiting the default 30 minutes.
        rollout={"min_step_minutes": 0},
    )
    settings = load_settings(config_path)
    log = root / "demo.log"
    churn = [sys.executable, "-m", "churn_assets.cli", "--config", str(config_path)]
    broker = EmbeddedBroker(settings.run_dir)
    broker.start()
    server = None
    try:
        ensure_topics(settings)
        _run([*churn, "simulate"], log)
        _run([*churn, "land"], log)
        _materialize(config_path, [*ml_assets, *ml_asset_checks])
        # A retrain on the same data with another seed passes the gates as the challenger.
        retrain = yaml.safe_load(config_path.read_text())
        retrain["training"]["seed"] = settings.training.seed + 1
        retrain_path = config_path.with_name("retrain.yaml")
        retrain_path.write_text(yaml.safe_dump(retrain, sort_keys=False))
        _materialize(retrain_path, [*ml_assets, *ml_asset_checks])
        assert ModelRegistry(settings.registry_dir).aliases() == {
            "champion": "v1",
            "challenger": "v2",
        }
        server = start_server(config_path, root / "serve.log")
        _serve_shadow_then_canary(server, settings)
        _run([*churn, "land", "--topic", "ml.predictions"], log)
        _materialize(config_path, [*monitoring_assets, *monitoring_checks])
        yield Demo(config_path, settings, server)
    finally:
        if server is not None:
            server.stop()
        broker.stop()


def execute(name: str, demo: Demo, monkeypatch, tmp_path) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` top to bottom; return the executed notebook."""
    # Kernel connection files, IPython profile and Jupyter config stay out of the user's home.
    for variable, folder in (
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_CONFIG_DIR", "config"),
        ("IPYTHONDIR", "ipython"),
    ):
        directory = tmp_path / "jupyter" / folder
        directory.mkdir(parents=True)
        monkeypatch.setenv(variable, str(directory))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # "python3" is ipykernel's own kernel: jupyter_client starts it with sys.executable.
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    env = {
        **os.environ,
        "CHURN_CONFIG": str(demo.config_path),
        "CHURN_SERVING_URL": demo.server.http,
    }
    started = time.monotonic()
    client.execute(env=env)
    print(f"{name}: {time.monotonic() - started:.1f}s")
    warnings = [
        output["text"]
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("name") == "stderr" and PYTHON_WARNING.search(output["text"])
    ]
    assert not warnings, f"{name} printed Python warnings:\n" + "\n".join(warnings)
    return notebook


def summary(notebook: nbformat.NotebookNode) -> dict[str, Any]:
    (cell,) = [c for c in notebook.cells if "summary" in c.metadata.get("tags", [])]
    text = "".join(o["text"] for o in cell.outputs if o.get("name") == "stdout")
    return json.loads(text)


def images(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def test_data_exploration(demo, monkeypatch, tmp_path):
    notebook = execute("01_data_exploration.ipynb", demo, monkeypatch, tmp_path)
    result = summary(notebook)
    events = load_read_model(demo.settings.read_models_dir, "landed_customer_events")
    feedback = load_read_model(demo.settings.read_models_dir, "landed_feedback")
    assert result["events"] == len(events) > 10_000
    assert result["customers"] == events["customer_id"].nunique()
    assert result["outcomes"] == len(feedback)
    assert result["churns"] == int(feedback["churned"].sum()) > 0
    assert result["dead_letters"] == 0
    assert result["first_event"].startswith(demo.settings.simulator.start_date.isoformat())
    assert result["highest_churn_contract"] == "month-to-month"  # +1.3 in the churn logit
    assert images(notebook) == 3


def test_model_evaluation_reproduces_the_registry(demo, monkeypatch, tmp_path):
    notebook = execute("02_model_evaluation_explainability.ipynb", demo, monkeypatch, tmp_path)
    result = summary(notebook)
    registry = ModelRegistry(demo.settings.registry_dir)
    champion = registry.get("champion").metadata["metrics"]
    challenger = registry.get("challenger").metadata["metrics"]
    assert (result["champion"], result["challenger"]) == ("v1", "v2")
    assert result["same_data_as_registry"] is True
    assert result["test_roc_auc"] == pytest.approx(champion["test_roc_auc"], abs=1e-9)
    assert result["registry_test_roc_auc"] == champion["test_roc_auc"]
    assert result["challenger_test_roc_auc"] == pytest.approx(challenger["test_roc_auc"], abs=1e-9)
    assert result["baseline_roc_auc"] < result["test_roc_auc"]
    assert result["top_features"][0] in {"contract_type", "support_tickets", "customer_tenure"}
    assert result["shap_additivity_error"] < 1e-4
    assert images(notebook) >= 5


def test_drift_investigation_finds_the_shifted_features_and_when(demo, monkeypatch, tmp_path):
    notebook = execute("03_drift_investigation.ipynb", demo, monkeypatch, tmp_path)
    result = summary(notebook)
    published = read_monitoring(demo.settings.read_models_dir)["drift"]
    assert result["report_id"] == published["report_id"]
    # The covariate scenario raises prices and moves customers to electronic checks.
    assert result["flagged_features"] == ["monthly_charges", "payment_method"]
    assert result["prediction_drift"] is True
    assert result["windows_tested"] == 28
    switch = (demo.settings.simulator.start_date + timedelta(days=SCENARIO_START_DAY)).isoformat()
    first = result["first_flagged_day"]
    assert first["monthly_charges"] == first["payment_method"] == switch
    untouched = {"customer_tenure", "support_tickets", "login_frequency", "contract_type"}
    assert not untouched & set(first), first
    assert 0.75 < result["backtest_realised_auc"] < 1
    assert 0.75 < result["backtest_estimated_auc"] < 1
    assert images(notebook) == 3


def test_shadow_and_canary_analysis_match_the_router(demo, monkeypatch, tmp_path):
    notebook = execute("04_shadow_canary_analysis.ipynb", demo, monkeypatch, tmp_path)
    result = summary(notebook)
    shadow = result["shadow"]
    assert (shadow["champion"], shadow["challenger"]) == ("v1", "v2")
    assert shadow["pairs"] == SHADOW_REQUESTS
    router = _call(demo.server, "GET", "/router/shadow-analysis")
    assert result["router_shadow_analysis"]["pairs"] == router["pairs"] == SHADOW_REQUESTS
    for figure in ("agreement_rate", "ks_statistic", "latency_overhead_ms"):
        assert shadow[figure] == pytest.approx(router[figure], abs=1e-9), figure
    assert shadow["agreement_rate"] >= 0.9
    assert result["shadow_decision"] == "advance"

    canary = result["canary"]
    predictions = load_read_model(demo.settings.read_models_dir, "landed_predictions")
    arms = predictions.groupby("arm").size()
    assert canary["requests"] == arms["canary"] > 0
    assert canary["requests"] + canary["control_requests"] == CANARY_REQUESTS
    assert canary["errors"] == 0
    assert canary["customers_in_both_arms"] == 0  # sticky per customer
    assert canary["router_weight"] == CANARY_WEIGHT and canary["step"] == 3
    assert canary["auc_kind"] == "estimated"  # served now, outcomes simulated months ago
    assert result["canary_decision"] == "advance"
    assert images(notebook) == 2
