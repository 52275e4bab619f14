"""The Panel dashboard in headless Chromium, against a real serving process and a real broker.

One serving process (v1 champion, v2 challenger), one embedded broker and one `panel serve`
subprocess per module, pointed at a temporary config whose read models are published here with
the project's own code (simulator, drift p-value correction, SHAP, rollout state machine). Every
page is loaded at 1280, 768 and 390 pixels wide with no console errors, and screenshotted into
``$CHURN_TEST_ARTIFACTS/dashboard`` (default ``test-artifacts/dashboard``). With
``CHURN_DASHBOARD_DOCS_DIR`` set, the 1280-wide screenshots are also copied there (what
``scripts/dashboard_screenshots.py`` does for docs/images/dashboard).
"""

import json
import os
import time
import urllib.request
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from playwright.sync_api import expect
from scipy.stats import chi2_contingency, ks_2samp

from churn_assets.broker import EmbeddedBroker
from churn_assets.config import REPO_ROOT, Settings, load_settings
from churn_assets.drift import FeatureDrift, adjust_p_values
from churn_assets.explain import ShapExplainer
from churn_assets.kafka import ensure_topics, make_producer, topic_log
from churn_assets.model import load_model
from churn_assets.monitoring import publish_monitoring_section
from churn_assets.outliers import REFERENCE_FILE, load_reference_frame
from churn_assets.registry import ModelRegistry
from churn_assets.rollout import (
    CanaryEvidence,
    Phase,
    RolloutPolicy,
    RolloutState,
    ShadowEvidence,
    decide,
    start,
)
from churn_assets.schemas import FEATURE_NAMES, NUMERIC_FEATURES
from churn_assets.segments import segment_table
from churn_assets.simulator import SimulationConfig, sample_customers, simulate_frames
from churn_assets.warehouse import publish_read_model
from tests.browser import Dashboard, chromium
from tests.conftest import write_config
from tests.serving_fixtures import ADMIN_TOKEN, build_registry, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WIDTHS = (1280, 768, 390)
LANDED_PER_PARTITION, PRODUCED_PER_PARTITION = 7, 10
PAGES = {
    "monitoring": ("Monitoring", ["Serving", "Requests/s", "Error rate", "Kafka lag"]),
    "drift": ("Drift", ["Open alerts", "Latest report", "Multivariate drift", "monthly_charges"]),
    # The form's labels are the contract's descriptions (config/features.yaml).
    "prediction": ("Prediction testing", ["Months since sign-up", "Contract term", "Predict"]),
    "models": ("Model management", ["Registered versions", "Rollout decisions", "Champion"]),
    "analytics": ("Analytics", ["Customer segments", "Churn by cohort", "Global feature"]),
}


def artifacts_dir() -> Path:
    root = Path(os.environ.get("CHURN_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    path = root / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- sample read models, produced with the project's code ------------------------------------------


def _publish(read_models: Path, name: str, frame: pd.DataFrame) -> None:
    con = duckdb.connect()
    try:
        con.register("frame", frame)
        publish_read_model(con, read_models, name, "SELECT * FROM frame")
    finally:
        con.close()


def _drift_tests(reference: pd.DataFrame, live: pd.DataFrame) -> list[dict]:
    """KS per numeric feature, chi-square per categorical one, BH-corrected: the shape of the
    drift_report asset's history rows (FeatureDrift), on small windows."""
    raw = []
    for name in FEATURE_NAMES:
        if name in NUMERIC_FEATURES:
            result = ks_2samp(reference[name], live[name])
            raw.append((name, "numeric", "ks", result.statistic, result.pvalue, result.statistic))
        else:
            counts = pd.crosstab(
                np.r_[np.zeros(len(reference)), np.ones(len(live))],
                np.r_[reference[name].to_numpy(), live[name].to_numpy()],
            )
            chi2, p, _, _ = chi2_contingency(counts)
            shares = counts.div(counts.sum(axis=1), axis=0)
            raw.append((name, "categorical", "chi2", chi2, p, 0.5 * shares.diff().abs().sum(1)[1]))
    corrected = adjust_p_values([r[4] for r in raw], "fdr")
    return [
        asdict(
            FeatureDrift(
                feature=name,
                kind=kind,
                detector=detector,
                statistic=float(statistic),
                p_value=float(p),
                p_value_corrected=float(q),
                effect_size=float(effect),
                effect_metric="ks_statistic" if kind == "numeric" else "total_variation",
                drift=bool(q < 0.05 and effect >= 0.1),
                min_effect=0.1,
            )
        )
        for (name, kind, detector, statistic, p, effect), q in zip(raw, corrected, strict=True)
    ]


CALIBRATION_HORIZON_DAYS = 14


def calibration_frame(customers: pd.DataFrame) -> pd.DataFrame:
    """The ``calibration`` read model (the shape the calibration asset publishes: one row per
    score decile and per contract segment) for customers scored by v1 (column ``risk``).
    Realised churn within the horizon is drawn from each customer's risk (seeded), so the
    groups land near the diagonal with sampling noise, as a calibrated model's do."""
    rng = np.random.default_rng(7)
    scored = customers.assign(
        churned=rng.random(len(customers)) < customers["risk"],
        decile=(pd.qcut(customers["risk"], 10, labels=False) + 1).astype(str),
    )
    rows = []
    for grouping, column in (("decile", "decile"), ("segment", "contract_type")):
        for label, group in scored.groupby(column):
            predicted = float(group["risk"].mean())
            rows.append(
                {
                    "grouping": grouping,
                    "group_label": str(label),
                    "customers": len(group),
                    "predicted_rate": predicted,
                    "observed_rate": float(group["churned"].mean()),
                    "tolerance": 0.01 + 1.96 * np.sqrt(predicted * (1 - predicted) / len(group)),
                    "horizon_days": CALIBRATION_HORIZON_DAYS,
                    "model_version": "v1",
                }
            )
    return pd.DataFrame(rows).astype({"customers": "int64", "horizon_days": "int32"})


def publish_sample_read_models(settings: Settings) -> None:
    read_models = settings.read_models_dir
    registry = ModelRegistry(settings.registry_dir)
    model = load_model(registry, "v1")
    now = datetime.now(UTC)

    # Landed events from a covariate-drift simulation: prices rise from day 20.
    events, _ = simulate_frames(
        SimulationConfig(
            customers=800, days=28, seed=11, scenario="covariate_drift", scenario_start_day=20
        )
    )
    events["event_time"] = pd.to_datetime(events["event_time"], utc=True)
    landed = events.assign(
        kafka_topic="churn.customers",
        kafka_partition=0,
        kafka_offset=np.arange(len(events)),
        landed_at=now,
    )
    _publish(read_models, "landed_customer_events", landed)
    # Offsets in the broker's current log, plus a stale log's (a broker restarted since) that
    # must not count.
    epoch = topic_log(settings, "churn.customers").epoch
    _publish(
        read_models,
        "landing_offsets",
        pd.DataFrame(
            {
                "kafka_epoch": [epoch] * 3 + ["an-older-cluster/some-topic-id"] * 3,
                "topic": "churn.customers",
                "kafka_partition": [0, 1, 2] * 2,
                "next_offset": [LANDED_PER_PARTITION] * 3 + [1000] * 3,
                "updated_at": now,
            }
        ),
    )

    # Drift history: one report per simulated day for the last eight days.
    reference = load_reference_frame({REFERENCE_FILE: registry.read_file("v1", REFERENCE_FILE)})
    history = []
    day = events["event_time"].dt.floor("D")
    for offset, window_day in enumerate(sorted(day.unique())[-8:]):
        live = events.loc[day == window_day]
        computed_at = now - timedelta(hours=8 - offset)
        for row in _drift_tests(reference, live):
            history.append(
                row
                | {
                    "report_id": f"r{offset}",
                    "computed_at": computed_at,
                    "model_version": "v1",
                    "window_start": window_day,
                    "window_end": window_day + pd.Timedelta(days=1),
                    "live_rows": len(live),
                }
            )
    history_frame = pd.DataFrame(history)
    _publish(read_models, "drift_history", history_frame)
    latest = history_frame.loc[history_frame["report_id"] == "r7"]
    publish_monitoring_section(
        read_models,
        "drift",
        {
            "report_id": "r7",
            "computed_at": now.isoformat(),
            "model_version": "v1",
            "features": {
                r["feature"]: {"p_value": r["p_value_corrected"], "drift": r["drift"]}
                for r in latest.to_dict("records")
            },
            "multivariate": {
                "detector": "mmd",
                "p_value": 0.0,
                "distance": 0.031,
                "distance_threshold": 0.004,
                "sample_rows": 1000,
                "n_permutations": 100,
                "drift": True,
            },
        },
    )
    publish_monitoring_section(
        read_models,
        "outliers",
        {
            "computed_at": now.isoformat(),
            "rates": {"isolation_forest": 0.012, "mahalanobis": 0.009},
            "expected": 0.01,
        },
    )
    publish_monitoring_section(
        read_models,
        "performance",
        {
            "auc": [
                {
                    "model_version": "v1",
                    "arm": "primary",
                    "kind": "realised",
                    "roc_auc": 0.84,
                    "labelled": 900,
                }
            ]
        },
    )

    # Analytics: SHAP importance and risk segments, as the ml assets compute them.
    customers = sample_customers(1500, seed=5)
    importance = ShapExplainer(model).global_importance(model.transformer.transform(customers))
    _publish(read_models, "feature_importance", importance.assign(model_version="v1"))
    customers["risk"] = model.predict_frame(customers)
    segments = segment_table(customers.assign(churned=customers["label"].astype(bool)), "v1")
    _publish(read_models, "customer_segments", segments)
    _publish(read_models, "calibration", calibration_frame(customers))

    # Rollout: shadow started, passed, and the canary advanced once.
    policy = RolloutPolicy.from_settings(settings)
    t0 = now.timestamp() - 3600
    decisions = [start(RolloutState(Phase.IDLE, "v1", None), "v2", now=t0)]
    shadow = ShadowEvidence(
        requests=800, agreement_rate=0.97, ks_statistic=0.04, latency_overhead_ms=0.8
    )
    decisions.append(decide(decisions[-1].next_state, policy, shadow=shadow, now=t0 + 600))
    canary = CanaryEvidence(
        requests=900,
        errors=0,
        p99_latency_ms=4.0,
        champion_auc=0.84,
        challenger_auc=0.845,
        champion_labelled=400,
        challenger_labelled=300,
        auc_kind="realised",
        elapsed_s=1200,
    )
    decisions.append(decide(decisions[-1].next_state, policy, canary=canary, now=t0 + 1800))
    rows, previous = [], RolloutState(Phase.IDLE, "v1", None)
    for index, decision in enumerate(decisions):
        rows.append(
            {
                "decided_at": pd.Timestamp(t0 + 600 * index * 1.5, unit="s", tz="UTC"),
                "run_id": f"run-{index}",
                "action": decision.action,
                "phase_from": previous.phase.value,
                "phase_to": decision.next_state.phase.value,
                "champion": decision.next_state.champion,
                "challenger": decision.next_state.challenger,
                "traffic": float(decision.traffic),
                "reasons": json.dumps(list(decision.reasons)),
                "figures": json.dumps(decision.figures),
                "target": "local",
                "applied": True,
            }
        )
        previous = decision.next_state
    _publish(read_models, "rollout_decisions", pd.DataFrame(rows))
    state = previous.to_dict() | {"updated_at": now.isoformat()}
    (read_models / "rollout_state.json").write_text(json.dumps(state))


def produce_backlog(settings: Settings) -> None:
    """PRODUCED_PER_PARTITION messages on each churn.customers partition (content is irrelevant
    to the lag count)."""
    producer = make_producer(settings)
    for partition in range(settings.kafka.partitions):
        for index in range(PRODUCED_PER_PARTITION):
            producer.produce(
                "churn.customers", key=f"k{index}".encode(), value=b"{}", partition=partition
            )
    assert producer.flush(10) == 0


# -- processes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    config_path = write_config(root)
    settings = load_settings(config_path)
    build_registry(settings.registry_dir)
    broker = EmbeddedBroker(settings.run_dir)
    broker.start()
    server = dashboard = None
    try:
        ensure_topics(settings)
        produce_backlog(settings)
        publish_sample_read_models(settings)
        server = start_server(config_path, root / "serve.log")
        dashboard = Dashboard(config_path, server.http, root / "panel.log")
        yield settings, server, dashboard
    finally:
        if dashboard is not None:
            dashboard.stop()
        if server is not None:
            server.stop()
        broker.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


class Page:
    """A browser tab at one width that records console errors and page errors."""

    def __init__(self, browser, width: int) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on(
            "console",
            lambda message: (
                self.errors.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def open(self, url: str, ready_text: str):
        self.page.goto(url)
        self.page.get_by_text(ready_text, exact=False).first.wait_for(timeout=30_000)
        return self.page

    def close(self, name: str | None = None) -> None:
        if name:  # the last state of an interaction test, for whoever reads the artefacts
            self.page.screenshot(path=str(artifacts_dir() / f"{name}.png"))
        self.context.close()


def docs_screenshot(page, name: str) -> None:
    """With CHURN_DASHBOARD_DOCS_DIR set (scripts/dashboard_screenshots.py), the guide's image."""
    docs = os.environ.get("CHURN_DASHBOARD_DOCS_DIR")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        size = page.viewport_size
        page.set_viewport_size({"width": 1280, "height": 1400})  # the pages scroll inside
        page.wait_for_timeout(1000)
        page.screenshot(path=str(Path(docs) / f"{name}.png"))
        page.set_viewport_size(size)


def _json(method: str, url: str, body=None, token=None):
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), method=method
    )
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("page_key", list(PAGES))
def test_page_loads_without_console_errors(platform, browser, page_key, width):
    _settings, _server, dashboard = platform
    title, texts = PAGES[page_key]
    tab = Page(browser, width)
    try:
        page = tab.open(f"{dashboard.url}?page={page_key}", texts[0])
        # expect() retries until the element renders (or 10 s pass); is_visible() would not.
        expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible(timeout=10_000)
        for text in texts:
            expect(page.get_by_text(text, exact=False).first).to_be_visible(timeout=10_000)
        expect(page.locator(f'nav a.active[data-page="{page_key}"]')).to_have_count(1)
        assert page.get_by_text("Traceback").count() == 0
        page.wait_for_timeout(500)  # let late renders (Bokeh, periodic callbacks) report errors
        shot = artifacts_dir() / f"{page_key}-{width}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 5_000
        if width == 1280 and page_key != "prediction":  # that one is shot with an answer
            docs_screenshot(page, page_key)
        assert tab.errors == [], f"{title} at {width}px: {tab.errors}"
    finally:
        tab.close()


def test_monitoring_shows_live_serving_figures_and_kafka_lag(platform, browser):
    _settings, server, dashboard = platform
    _json("POST", f"{server.http}/predict", {**SAMPLE, "customer_id": "lag-check"})
    tab = Page(browser, 1280)
    try:
        page = tab.open(f"{dashboard.url}?page=monitoring", "Kafka lag")
        cards = page.locator(".card")
        serving_card = page.locator('.card[data-label="Serving"] .value')
        assert serving_card.inner_text() == "ready"
        assert cards.count() >= 6
        missing = PRODUCED_PER_PARTITION - LANDED_PER_PARTITION
        for partition in range(3):
            row = page.locator("tr", has_text="churn.customers").nth(partition)
            cells = row.locator("td").all_inner_texts()
            assert cells[:4] == ["churn.customers", str(partition), "7", str(missing)], cells
        # Dagster is not running in this test: the page explains it instead of failing.
        expect(page.get_by_text("Dagster runs is unavailable")).to_be_visible()
        # Live update: the requests/s card gets a figure on the next refresh.
        rate = page.locator('.card[data-label="Requests/s"] .value')
        first_update = page.get_by_text("Updated ").first.inner_text()
        deadline = time.monotonic() + 20
        while rate.inner_text() == "measuring…" and time.monotonic() < deadline:
            page.wait_for_timeout(500)
        assert float(rate.inner_text()) >= 0
        assert page.get_by_text("Updated ").first.inner_text() != first_update
        assert tab.errors == []
    finally:
        tab.close("monitoring-live-1280")


SAMPLE = {
    "customer_tenure": 3,
    "monthly_charges": 99.5,
    "total_charges": 298.5,
    "contract_type": "month-to-month",
    "payment_method": "electronic_check",
    "internet_service": "fiber_optic",
    "support_tickets": 4,
    "login_frequency": 2.0,
}


def _fill_form(page, features: dict, customer_id: str) -> None:
    for name, value in features.items():
        field = page.locator(f".feature-{name}")
        if isinstance(value, str):
            field.locator("select").select_option(value)
        elif isinstance(value, bool):
            field.locator("input").set_checked(value)
        else:
            box = field.locator("input")
            box.fill(str(value))
            box.press("Enter")
    customer = page.get_by_label("Customer id (optional)")
    customer.fill(customer_id)
    customer.press("Enter")


def test_prediction_form_round_trips_to_the_serving_process(platform, browser):
    settings, server, dashboard = platform
    tab = Page(browser, 1280)
    try:
        page = tab.open(f"{dashboard.url}?page=prediction", "Predict")
        # One field per feature of the champion's contract, each its kind's widget.
        contract = load_model(ModelRegistry(settings.registry_dir), "champion").contract
        assert set(SAMPLE) == set(contract.names)
        widgets = {"integer": "input", "number": "input", "category": "select"}
        widgets["boolean"] = "input[type=checkbox]"
        for feature in contract.features:
            field = page.locator(f".feature-{feature.name}.feature-kind-{feature.kind}")
            expect(field).to_have_count(1)
            expect(field.locator(widgets[feature.kind])).to_have_count(1)
        expect(page.locator("[class*='feature-kind-']")).to_have_count(len(contract.names))
        expect(page.get_by_text("The form has the features of v1's contract")).to_be_visible()
        _fill_form(page, SAMPLE, "browser-customer-1")
        page.get_by_role("button", name="Predict").click()
        routed = page.locator(".routed-answer")
        routed.wait_for(timeout=30_000)
        expected = _json(
            "POST", f"{server.http}/predict", {**SAMPLE, "customer_id": "browser-customer-1"}
        )
        text = " ".join(page.locator(".routed-answer .card").all_inner_texts())
        assert f"p = {expected['probability']:.6f}" in text, text
        assert expected["model_version"] == "v1" and "v1" in text
        assert f"arm: {expected['arm']}" in text
        # Both versions explained side by side, each with its own probability and SHAP chart.
        for version in ("v1", "v2"):
            summary = page.locator(f".version-{version}").get_by_text(
                f"{version}: churn probability"
            )
            summary.wait_for(timeout=30_000)
            explained = _json("POST", f"{server.http}/explain?version={version}&top_k=8", SAMPLE)
            assert f"{explained['probability']:.2%}" in summary.inner_text()
        docs_screenshot(page, "prediction")

        # Validation: a cleared field is refused before any call to the server.
        tenure = page.locator(".feature-customer_tenure input")
        tenure.fill("")
        tenure.press("Enter")
        page.get_by_role("button", name="Predict").click()
        error = page.locator(".form-errors li").first
        error.wait_for(timeout=10_000)
        assert error.inner_text() == "Months since sign-up: required"  # the description
        assert routed.count() == 0
        assert tab.errors == []
    finally:
        tab.close("prediction-round-trip-1280")


def test_admin_buttons_promote_roll_back_and_set_the_strategy_on_the_live_router(platform, browser):
    _settings, server, dashboard = platform
    before = _json("GET", f"{server.http}/router/metrics")["state"]
    assert (before["champion"], before["challenger"]) == ("v1", "v2")
    tab = Page(browser, 1280)
    frames: list[str] = []
    tab.page.on(
        "websocket",
        lambda socket: socket.on("framereceived", lambda payload: frames.append(str(payload))),
    )
    try:
        page = tab.open(f"{dashboard.url}?page=models", "Registered versions")

        # Rollback has nothing to return to yet; cancelling a promotion changes nothing.
        expect(page.locator(".action-rollback button")).to_be_disabled()
        page.locator(".action-promote button").click()
        page.get_by_text("Confirm promote").wait_for(timeout=10_000)
        page.locator(".cancel-action button").click()
        page.get_by_text("Confirm promote").wait_for(state="hidden", timeout=10_000)
        assert _json("GET", f"{server.http}/router/metrics")["state"]["champion"] == "v1"

        page.locator(".action-promote button").click()
        page.get_by_text("Confirm promote").wait_for(timeout=10_000)
        assert _json("GET", f"{server.http}/router/metrics")["state"]["champion"] == "v1"
        page.locator(".confirm-action button").click()
        page.locator(".action-result").get_by_text("Promote / switch: done").wait_for(
            timeout=30_000
        )
        promoted = _json("GET", f"{server.http}/router/metrics")["state"]
        assert promoted["champion"] == "v2" and promoted["previous_champions"] == ["v1"]
        champion = page.locator('.router-state .card[data-label="Champion"] .value')
        assert champion.inner_text() == "v2"

        page.locator(".action-rollback button").click()
        page.get_by_text("Confirm roll back").wait_for(timeout=10_000)
        page.locator(".confirm-action button").click()
        deadline = time.monotonic() + 30
        while champion.inner_text() != "v1" and time.monotonic() < deadline:
            page.wait_for_timeout(300)
        assert champion.inner_text() == "v1"
        restored = _json("GET", f"{server.http}/router/metrics")["state"]
        assert (restored["champion"], restored["challenger"]) == ("v1", "v2")
        audit = _json("GET", f"{server.http}/router/audit", token=ADMIN_TOKEN)
        assert [entry["action"] for entry in audit[-2:]] == ["promote", "rollback"]

        # Canary at the slider's weight (the configured router.canary_weight), then back.
        for action, strategy in (("canary", "canary"), ("shadow", "shadow")):
            page.locator(f".action-{action} button").click()
            page.locator(".confirm-action button").click()
            page.locator(".router-state .card[data-label='Strategy']").get_by_text(
                strategy, exact=True
            ).wait_for(timeout=30_000)
            state = _json("GET", f"{server.http}/router/metrics")["state"]
            assert (state["strategy"], state["canary_weight"]) == (strategy, 0.1)
            assert (state["champion"], state["challenger"]) == ("v1", "v2")

        # The admin token stays in the dashboard process: it never reaches the browser.
        assert frames and not any(ADMIN_TOKEN in frame for frame in frames)
        assert tab.errors == []
    finally:
        tab.close("models-after-rollback-1280")


def test_kafka_lag_counts_messages_past_the_landed_offsets(platform):
    from dashboards.sources.kafka import kafka_lag
    from dashboards.sources.read_models import ReadModels

    settings, _server, _dashboard = platform
    lag = kafka_lag(settings, ReadModels(settings).frame("landing_offsets"), budget_s=5)
    rows = lag.loc[lag["topic"] == "churn.customers"]
    assert rows["lag"].tolist() == [PRODUCED_PER_PARTITION - LANDED_PER_PARTITION] * 3
    assert rows["exact"].all()
    assert lag.loc[lag["topic"] == "ml.feedback", "lag"].sum() == 0
