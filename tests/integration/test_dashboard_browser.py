"""The Panel dashboard in headless Chromium, against a real serving process and a real broker.

One serving process (v1 champion, v2 challenger), one embedded broker and one `panel serve`
subprocess per module, pointed at a temporary config whose read models are published here with
the project's own code (simulator, drift p-value correction, SHAP, rollout state machine, and a
calibration read model of the shape the calibration asset publishes). Every page is loaded on a
1440x900 desktop and, with Playwright's mobile emulation (mobile viewport honouring the viewport
meta tag, touch, device pixel ratio, mobile user agent), an 820x1180 tablet and a 390x844 phone:
no console errors, no sideways scrolling but inside a wide table's own box, the page's headline
figures inside the window and at least 12 CSS px, and so is its body text. Screenshots go to
``$CHURN_TEST_ARTIFACTS/dashboard`` (default ``test-artifacts/dashboard``); with
``CHURN_DASHBOARD_DOCS_DIR`` set, the guide's images too (``scripts/dashboard_screenshots.py``).
"""

import json
import os
import threading
import time
import urllib.request
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
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
from dashboards.sources.serving import RETRAIN_TIMEOUT_S
from tests.browser import (
    DESKTOP,
    DEVICES,
    PHONE,
    Dashboard,
    Device,
    boxes,
    chromium,
    layout,
    screenshot_whole_page,
)
from tests.conftest import write_config
from tests.serving_fixtures import ADMIN_TOKEN, build_registry, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LANDED_PER_PARTITION, PRODUCED_PER_PARTITION = 7, 10
# Per page: its heading, texts that show it rendered, and its headline figures (a selector, and
# how many there are at least).
PAGES = {
    "monitoring": (
        "Monitoring",
        ["Serving", "Requests/s", "Error rate", "Kafka lag"],
        (".card .value", 7),
    ),
    "drift": (
        "Drift",
        ["Open alerts", "8 reports from", "Latest report", "Multivariate drift", "monthly_charges"],
        (".card .value", 4),
    ),
    # The form's labels are the contract's descriptions (config/features.yaml).
    "prediction": (
        "Prediction testing",
        ["Months since sign-up", "Contract term", "Predict"],
        ("[class*='feature-kind-'] label", 8),
    ),
    "models": (
        "Model management",
        ["Registered versions", "Rollout decisions", "Champion", "Retrain"],
        (".router-state .card .value", 5),
    ),
    "analytics": (
        "Analytics",
        ["Calibration", "By score decile", "By segment", "Customer segments", "Global feature"],
        (".calibration-cards .card .value", 4),
    ),
}
# Body text: paragraphs, list items, table cells, form labels, card labels and notes, chart keys.
BODY_TEXT = "p, li, td, th, label, .card .label, .card .note, .chart-key"
MIN_FONT_PX = 12
# Guide images: every page on the desktop, these on the phone too.
DOCS_PHONE_PAGES = ("monitoring", "analytics")


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
    """A browser tab on one device that records console errors and page errors."""

    def __init__(self, browser, device: Device = DESKTOP) -> None:
        self.device = device
        self.context = browser.new_context(**device.context_options())
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on(
            "console",
            lambda message: (
                self.errors.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def open(self, url: str, ready_text: str, timeout_ms: int = 30_000):
        self.page.goto(url, timeout=timeout_ms)
        self.page.get_by_text(ready_text, exact=False).first.wait_for(timeout=timeout_ms)
        return self.page

    def close(self, name: str | None = None) -> None:
        if name:  # the last state of an interaction test, for whoever reads the artefacts
            self.page.screenshot(path=str(artifacts_dir() / f"{name}.png"))
        self.context.close()


def docs_screenshot(page, name: str, max_height: int = 1600) -> None:
    """With CHURN_DASHBOARD_DOCS_DIR set (scripts/dashboard_screenshots.py), the guide's image:
    the page's top ``max_height`` CSS pixels, at one image pixel per CSS pixel."""
    docs = os.environ.get("CHURN_DASHBOARD_DOCS_DIR")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        screenshot_whole_page(page, Path(docs) / f"{name}.png", max_height, css_pixels=True)


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


def _assert_readable_layout(page, device: Device, headline: tuple[str, int]) -> None:
    """The page is laid out at the device's width (the viewport meta tag works) without sideways
    scrolling but inside a wide table's own box, and nothing is cut off at the window's edges;
    its headline figures are in the window and its headline and body text at least MIN_FONT_PX
    CSS pixels."""
    where = f"{device.name} {device.width}x{device.height}"
    found = layout(page)
    assert (found["innerWidth"], found["scale"]) == (device.width, 1), (where, found)
    assert found["scrollWidth"] <= found["innerWidth"], (where, found)
    assert all(box["table"] for box in found["sideways"]), (where, found["sideways"])
    assert found["cut"] == [], (where, found["cut"])
    selector, least = headline
    figures = [box for box in boxes(page.locator(selector)) if box["text"]]
    assert len(figures) >= least, (where, selector, figures)
    for box in figures:
        assert box["width"] > 0 and box["height"] > 0, (where, box)
        assert 0 <= box["left"] and box["right"] <= found["innerWidth"], (where, box)
        assert box["fontSize"] >= MIN_FONT_PX, (where, box)
    body = [box for box in boxes(page.locator(BODY_TEXT)) if box["width"] > 0 and box["text"]]
    assert body, where
    small = [box for box in body if box["fontSize"] < MIN_FONT_PX]
    assert small == [], (where, small)


@pytest.mark.parametrize("device", DEVICES, ids=[d.name for d in DEVICES])
@pytest.mark.parametrize("page_key", list(PAGES))
def test_page_reads_on_every_device(platform, browser, page_key, device):
    _settings, _server, dashboard = platform
    title, texts, headline = PAGES[page_key]
    tab = Page(browser, device)
    try:
        page = tab.open(f"{dashboard.url}?page={page_key}", texts[0])
        # expect() retries until the element renders (or 10 s pass); is_visible() would not.
        expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible(timeout=10_000)
        for text in texts:
            expect(page.get_by_text(text, exact=False).first).to_be_visible(timeout=10_000)
        expect(page.locator(f'nav a.active[data-page="{page_key}"]')).to_have_count(1)
        assert page.get_by_text("Traceback").count() == 0
        page.wait_for_timeout(500)  # let late renders (Bokeh, periodic callbacks) report errors
        _assert_readable_layout(page, device, headline)
        shot = artifacts_dir() / f"{page_key}-{device.name}.png"
        screenshot_whole_page(page, shot)
        assert shot.stat().st_size > 5_000
        if device == DESKTOP and page_key != "prediction":  # that one is shot with an answer
            docs_screenshot(page, page_key)
        if device == PHONE and page_key in DOCS_PHONE_PAGES:
            docs_screenshot(page, f"{page_key}-phone", max_height=2400)
        assert tab.errors == [], f"{title} on the {device.name}: {tab.errors}"
    finally:
        tab.close()


def test_monitoring_shows_live_serving_figures_and_kafka_lag(platform, browser):
    _settings, server, dashboard = platform
    _json("POST", f"{server.http}/predict", {**SAMPLE, "customer_id": "lag-check"})
    tab = Page(browser)
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
        tab.close("monitoring-live-desktop")


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
    tab = Page(browser)
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
        tab.close("prediction-round-trip-desktop")


def test_admin_buttons_promote_roll_back_and_set_the_strategy_on_the_live_router(platform, browser):
    _settings, server, dashboard = platform
    before = _json("GET", f"{server.http}/router/metrics")["state"]
    assert (before["champion"], before["challenger"]) == ("v1", "v2")
    tab = Page(browser)
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
        tab.close("models-after-rollback-desktop")


def test_kafka_lag_counts_messages_past_the_landed_offsets(platform):
    from dashboards.sources.kafka import kafka_lag
    from dashboards.sources.read_models import ReadModels

    settings, _server, _dashboard = platform
    lag = kafka_lag(settings, ReadModels(settings).frame("landing_offsets"), budget_s=5)
    rows = lag.loc[lag["topic"] == "churn.customers"]
    assert rows["lag"].tolist() == [PRODUCED_PER_PARTITION - LANDED_PER_PARTITION] * 3
    assert rows["exact"].all()
    assert lag.loc[lag["topic"] == "ml.feedback", "lag"].sum() == 0


def test_analytics_sets_observed_beside_predicted_churn_over_one_horizon(platform, browser):
    """The calibration view renders the published read model: its figures, by decile and by
    segment, with the definitions and the horizon from the data."""
    from churn_assets.warehouse import load_read_model

    settings, _server, dashboard = platform
    calibration = load_read_model(settings.read_models_dir, "calibration")
    deciles = calibration.loc[calibration["grouping"] == "decile"]
    gaps = deciles["observed_rate"] - deciles["predicted_rate"]
    within = int((gaps.abs() <= deciles["tolerance"]).sum())
    worst = deciles.loc[gaps.abs().idxmax()]
    tab = Page(browser, PHONE)
    try:
        page = tab.open(f"{dashboard.url}?page=analytics", "By score decile")

        def card(label: str) -> str:
            return page.locator(
                f'.calibration-cards .card[data-label="{label}"] .value'
            ).inner_text()

        assert card("Horizon") == f"{CALIBRATION_HORIZON_DAYS} days"
        assert card("Deciles within tolerance") == f"{within} of 10"
        worst_gap = (worst["observed_rate"] - worst["predicted_rate"]) * 100
        assert card("Largest gap") == f"{worst_gap:+.1f} pp"
        assert card("Customers") == f"{int(deciles['customers'].sum()):,}"
        definitions = " ".join(page.locator(".calibration-definitions p").all_inner_texts())
        for text in (
            f"for churn within {CALIBRATION_HORIZON_DAYS} days",
            f"churned within {CALIBRATION_HORIZON_DAYS} days after they were scored",
            "decile 1 has the lowest predicted risk, 10 the highest",
        ):
            assert text in definitions, definitions
        groups = page.locator("td", has_text="decile ").all_inner_texts()
        assert groups == [f"decile {n}" for n in range(1, 11)]  # numeric order
        segments = page.locator("td", has_text="segment ").all_inner_texts()
        assert segments == [
            f"segment {label}"
            for label in sorted(
                calibration.loc[calibration["grouping"] == "segment", "group_label"]
            )
        ]
        # The chart of deciles and the chart of segments (plus tiers and importance).
        expect(page.locator(".bk-Canvas, canvas").first).to_be_visible()
        assert page.get_by_text("observed churn").count() == 0  # the old "ever churned" chart
        assert tab.errors == []
    finally:
        tab.close("analytics-calibration-phone")


# -- retraining from the dashboard -----------------------------------------------------------------

RUN_ID = "4f1c2d8e-retrain"
ROLLOUT_REASON = "a rollout is in progress: canary step 2 of 5 (v2 at 25%)"
DAGSTER_DOWN = "Dagster at http://127.0.0.1:3000/graphql does not answer"


class RetrainAPI(BaseHTTPRequestHandler):
    """A stand-in for the serving API's ``POST /admin/retrain``, answering as the real endpoint
    does (200 with run id, job and reason; 401 without the admin token; 409 with the reason
    while a rollout is in progress; 503 when Dagster is unreachable). The real endpoint, which
    launches the job in Dagster, is tested with serving (tests/integration/, the serving
    worker's retraining test); this one checks what the dashboard sends and shows. Every other
    path answers 404, which the page explains.

    ``answer`` picks the reply; ``release`` holds the reply until the test sets it."""

    answer = "ok"
    token = ADMIN_TOKEN
    release = threading.Event()
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/admin/retrain":
            return self._reply(404, {"detail": "Not Found"})
        request = {
            "authorization": self.headers.get("Authorization"),
            "content_type": self.headers.get("Content-Type"),
            "body": json.loads(body),
        }
        RetrainAPI.received.append(request)
        assert RetrainAPI.release.wait(90), "the test never released the answer"
        if request["authorization"] != f"Bearer {RetrainAPI.token}":
            return self._reply(401, {"detail": "a valid admin bearer token is required"})
        if RetrainAPI.answer == "rollout":
            return self._reply(409, {"detail": ROLLOUT_REASON})
        if RetrainAPI.answer == "dagster_down":
            return self._reply(503, {"detail": DAGSTER_DOWN})
        reason = request["body"]["reason"]
        return self._reply(200, {"run_id": RUN_ID, "job": "retraining_job", "reason": reason})

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._reply(404, {"detail": "Not Found"})

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def retrain_dashboard(platform, tmp_path_factory):
    """A second ``churn dashboard`` whose serving API is :class:`RetrainAPI`."""
    _settings, _server, main_dashboard = platform
    server = ThreadingHTTPServer(("127.0.0.1", 0), RetrainAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    root = tmp_path_factory.mktemp("retrain")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    dashboard = None
    try:
        dashboard = Dashboard(main_dashboard.config_path, url, root / "panel.log")
        yield dashboard
    finally:
        RetrainAPI.release.set()
        if dashboard is not None:
            dashboard.stop()
        server.shutdown()
        server.server_close()


def _retrain(page, reason: str) -> None:
    box = page.locator(".retrain-reason input")
    box.fill(reason)
    page.locator(".action-retrain button").click()


def test_retrain_button_launches_a_run_off_the_event_loop_and_shows_refusals(
    retrain_dashboard, browser
):
    RetrainAPI.received.clear()
    RetrainAPI.release.clear()
    RetrainAPI.answer, RetrainAPI.token = "ok", ADMIN_TOKEN
    tab = Page(browser)
    frames: list[str] = []
    tab.page.on(
        "websocket",
        lambda socket: socket.on("framereceived", lambda payload: frames.append(str(payload))),
    )
    other = None
    try:
        page = tab.open(f"{retrain_dashboard.url}?page=models", "Reason for retraining")
        result = page.locator(".retrain-result")

        # No reason, no request.
        page.locator(".action-retrain button").click()
        result.get_by_text("Give a reason for retraining first.").wait_for(timeout=10_000)
        assert RetrainAPI.received == []

        # The launch waits on the API; meanwhile the server still serves another page.
        _retrain(page, "drift in monthly charges since the price change")
        result.get_by_text("Launching the retraining job").wait_for(timeout=10_000)
        expect(page.locator(".action-retrain button")).to_be_disabled()
        # Given less time than the dashboard waits for the answer (RETRAIN_TIMEOUT_S), so a
        # call that blocks the event loop shows as a page that does not load.
        other = Page(browser)
        try:
            other.open(
                f"{retrain_dashboard.url}?page=analytics",
                "Global feature importance",
                timeout_ms=int(RETRAIN_TIMEOUT_S * 1000 * 2 / 3),
            )
        except PlaywrightTimeoutError:
            pytest.fail("no other page loads while the retrain call waits: it blocks the loop")
        assert page.locator(".retrain-success").count() == 0  # still waiting on the API
        RetrainAPI.release.set()
        result.get_by_text(f"Retraining launched: run {RUN_ID} of retraining_job").wait_for(
            timeout=30_000
        )
        assert "drift in monthly charges since the price change" in " ".join(
            result.get_by_text("Retraining launched").all_inner_texts()
        )
        expect(page.locator(".action-retrain button")).to_be_enabled()
        assert RetrainAPI.received == [
            {
                "authorization": f"Bearer {ADMIN_TOKEN}",
                "content_type": "application/json",
                "body": {"reason": "drift in monthly charges since the price change"},
            }
        ]

        # Refusals say why.
        refusals = (
            (
                "rollout",
                ADMIN_TOKEN,
                f"refused (a rollout is in progress): HTTP 409: {ROLLOUT_REASON}",
            ),
            (
                "dagster_down",
                ADMIN_TOKEN,
                f"(the serving API cannot reach Dagster): HTTP 503: {DAGSTER_DOWN}",
            ),
            (
                "ok",
                "another-token",
                "(the serving API did not accept the dashboard's admin token): HTTP 401",
            ),
        )
        for answer, token, shown in refusals:
            RetrainAPI.answer, RetrainAPI.token = answer, token
            _retrain(page, f"check {answer}")
            page.locator(".retrain-danger").get_by_text(shown).wait_for(timeout=30_000)
        assert len(RetrainAPI.received) == 4
        # The admin token stays in the dashboard process: it never reaches the browser.
        assert frames and not any(ADMIN_TOKEN in frame for frame in frames)
        assert tab.errors == []
    finally:
        RetrainAPI.release.set()
        if other is not None:
            other.close()
        tab.close("models-retrain-desktop")
