"""Rollout evidence: the warehouse's figures (SQL over landed predictions and feedback in real
DuckDB files), and what an unreachable source does to a decision."""

import socket
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from churn_assets.evidence import EvidenceUnavailable
from churn_assets.evidence.auc import auc_fields, auc_pair
from churn_assets.evidence.prometheus import PrometheusClient
from churn_assets.evidence.warehouse import SHADOW_PAIRS_SQL, WarehouseFigures
from churn_assets.warehouse import connect, ensure_schema

pytestmark = pytest.mark.unit

NOW = datetime(2026, 6, 1, tzinfo=UTC)
HORIZON_DAYS = 14


def _predictions(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["kafka_topic"] = "ml.predictions"
    frame["kafka_partition"] = 0
    frame["kafka_offset"] = range(len(frame))
    frame["model_name"] = "churn"
    frame["latency_ms"] = 1.0
    frame["status"] = frame["status"].fillna("ok") if "status" in frame else "ok"
    frame["landed_at"] = NOW
    return frame


def _land(con, table: str, frame: pd.DataFrame) -> None:
    con.register("incoming", frame)
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
    con.unregister("incoming")


@pytest.fixture
def warehouse(tmp_path):
    with connect(tmp_path / "warehouse.duckdb") as con:
        ensure_schema(con)
        yield con


def test_shadow_pairs_join_the_window_s_shadow_and_primary_answers(warehouse):
    rng = np.random.default_rng(3)
    start, end = NOW - timedelta(minutes=30), NOW
    rows, champion, challenger = [], [], []
    for i in range(300):
        at = start + timedelta(seconds=5 * i + 1)
        primary, shadow = float(rng.random()), float(rng.random() ** 2)
        rows.append(
            dict(
                request_id=f"r{i}",
                model_version="v1",
                arm="primary",
                score=primary,
                predicted_at=at,
            )
        )
        if i % 10:  # some requests were never shadowed: they make no pair
            rows.append(
                dict(
                    request_id=f"r{i}",
                    model_version="v2",
                    arm="shadow",
                    score=shadow,
                    predicted_at=at,
                )
            )
            champion.append(primary)
            challenger.append(shadow)
    # Outside the window, another version, a failed shadow answer: none of them pairs.
    before = start - timedelta(seconds=1)
    rows += [
        dict(request_id="old", model_version="v1", arm="primary", score=0.9, predicted_at=before),
        dict(request_id="old", model_version="v2", arm="shadow", score=0.1, predicted_at=before),
        dict(request_id="r1", model_version="v3", arm="shadow", score=0.0, predicted_at=start),
        dict(
            request_id="r0",
            model_version="v2",
            arm="shadow",
            score=None,
            status="error",
            predicted_at=start + timedelta(seconds=1),
        ),
    ]
    _land(warehouse, "landed_predictions", _predictions(rows))

    figures = WarehouseFigures(warehouse, HORIZON_DAYS).shadow_pairs(
        "v1", "v2", 0.4, start.timestamp(), end.timestamp()
    )

    champion_scores, challenger_scores = np.array(champion), np.array(challenger)
    assert figures.pairs == len(champion) == 270
    expected_agreement = np.mean((champion_scores >= 0.4) == (challenger_scores >= 0.4))
    assert figures.agreement_rate == pytest.approx(expected_agreement)
    assert figures.ks_statistic == pytest.approx(
        ks_2samp(champion_scores, challenger_scores).statistic
    )
    query = figures.figures["agreement_rate"]
    assert query.source == "warehouse"
    assert " ".join(SHADOW_PAIRS_SQL.split()) in query.query
    assert "'v1', 'v2'" in query.query and "score >= 0.4" in query.query
    assert figures.figures["shadow_requests"].value == 270


def test_no_pairs_in_the_window_is_no_data_not_zero_agreement(warehouse):
    figures = WarehouseFigures(warehouse, HORIZON_DAYS).shadow_pairs(
        "v1", "v2", 0.5, (NOW - timedelta(hours=1)).timestamp(), NOW.timestamp()
    )
    assert figures.pairs == 0
    assert figures.agreement_rate is None and figures.ks_statistic is None
    assert set(figures.figures) == {"shadow_requests"}


def _canary_traffic(con, rng, *, good: bool) -> tuple[np.ndarray, ...]:
    """v1 primary and v2 canary answers 30 days ago, every outcome known by NOW."""
    at = NOW - timedelta(days=30)
    labels = rng.random(800) < 0.3
    signal = labels + rng.normal(0, 0.6, 800)
    v1 = 1 / (1 + np.exp(-signal))
    v2 = 1 / (1 + np.exp(-(signal if good else rng.normal(0, 1, 800))))
    rows, feedback = [], []
    for i in range(800):
        version, arm, score = ("v2", "canary", v2[i]) if i % 4 == 0 else ("v1", "primary", v1[i])
        rows.append(
            dict(
                request_id=f"c{i}",
                customer_id=f"u{i}",
                model_version=version,
                arm=arm,
                score=float(score),
                predicted_at=at + timedelta(seconds=i),
            )
        )
        outcome = at + (timedelta(days=2) if labels[i] else timedelta(days=20))
        feedback.append(
            dict(
                event_id=f"f{i}",
                customer_id=f"u{i}",
                request_id=f"c{i}",
                churned=bool(labels[i]),
                outcome_time=outcome,
                observed_at=outcome,
            )
        )
    _land(con, "landed_predictions", _predictions(rows))
    fb = pd.DataFrame(feedback).assign(
        kafka_topic="ml.feedback", kafka_partition=0, kafka_offset=range(800), landed_at=NOW
    )
    _land(con, "landed_feedback", fb)
    return labels, v1, v2


def test_canary_auc_is_realised_with_enough_labels_and_estimated_without(warehouse):
    labels, v1, v2 = _canary_traffic(warehouse, np.random.default_rng(5), good=False)
    start, end = (NOW - timedelta(days=31)).timestamp(), NOW.timestamp()
    rows, queries = WarehouseFigures(warehouse, HORIZON_DAYS).canary_auc_rows(
        "v1", "v2", start, end
    )
    canary = np.arange(800) % 4 == 0
    realised = auc_pair(rows, "v1", "v2", min_labelled=150)
    assert realised["kind"] == "realised"
    fields = auc_fields(realised)
    assert fields["challenger_auc"] == pytest.approx(roc_auc_score(labels[canary], v2[canary]))
    assert fields["champion_auc"] == pytest.approx(roc_auc_score(labels[~canary], v1[~canary]))
    assert (fields["champion_labelled"], fields["challenger_labelled"]) == (600, 200)
    assert fields["challenger_positives"] == labels[canary].sum()
    assert fields["challenger_auc"] < 0.6 < 0.75 < fields["champion_auc"]
    assert (
        "landed_feedback" in queries["feedback"] and "landed_predictions" in queries["predictions"]
    )

    estimated = auc_fields(auc_pair(rows, "v1", "v2", min_labelled=201))
    assert estimated["auc_kind"] == "estimated"
    assert estimated["challenger_labelled"] == 200  # every row, labelled or not
    assert estimated["challenger_positives"] == pytest.approx(v2[canary].sum())

    # A window that ends before the outcomes were observed has only pending labels.
    early = NOW - timedelta(days=29)
    rows, _ = WarehouseFigures(warehouse, HORIZON_DAYS).canary_auc_rows(
        "v1", "v2", start, early.timestamp()
    )
    assert auc_pair(rows, "v1", "v2", min_labelled=1)["kind"] == "estimated"
    assert all(r["labelled"] == 0 for r in rows if r["kind"] == "realised")


def test_prometheus_that_does_not_answer_is_unavailable_not_empty():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = PrometheusClient(f"http://127.0.0.1:{port}", timeout_s=1, retries=1, backoff_s=0)
    with pytest.raises(EvidenceUnavailable, match=r"did not answer .* after 2 attempt"):
        client.query("up", NOW.timestamp())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_source_holds_the_rollout_and_applies_nothing(config_factory):
    """A rollout in shadow whose evidence source does not answer records "hold: evidence
    unavailable", keeps its state and sends the deployment target nothing. The Kubernetes API
    is recorded (no API server can run here); the warehouse and registry are real files."""
    from churn_assets.config import load_settings
    from churn_assets.deploy import KubernetesSeldonTarget
    from churn_assets.evidence.router import RouterEvidence
    from churn_assets.registry import ModelRegistry
    from churn_assets.rollout_control import current_state, run_rollout_step
    from tests.k8s_recording import RecordingApiClient
    from tests.serving_fixtures import contract_model, register_model

    settings = load_settings(config_factory(serving={"url": f"http://127.0.0.1:{_closed_port()}"}))
    registry = ModelRegistry(settings.registry_dir)
    model = contract_model(settings.contract, rows=200)
    register_model(registry, model, "champion")
    register_model(registry, model, "challenger")
    api = RecordingApiClient()
    target = KubernetesSeldonTarget("churn", api_client=api, kind="v1")
    source = RouterEvidence(settings, timeout_s=1)
    with connect(settings.warehouse_path) as con:
        started = run_rollout_step(settings, con, target, run_id="r1", evidence=source)
        assert started.decision.action == "start_shadow"
        calls = len(api.calls)

        held = run_rollout_step(settings, con, target, run_id="r2", evidence=source)

        assert held.decision.action == "hold"
        [reason] = held.decision.reasons
        assert reason.startswith("hold: evidence unavailable from router: GET http://127.0.0.1:")
        assert "/router/metrics failed" in reason
        assert held.decision.next_state == started.decision.next_state
        assert held.applied is None and len(api.calls) == calls
        assert held.evidence["source"] == "router" and held.evidence["unavailable"]
        assert current_state(con, registry) == started.decision.next_state
        recorded = con.execute(
            "SELECT action, applied, phase_to FROM rollout_decisions ORDER BY rowid"
        ).fetchall()
    assert recorded == [("start_shadow", True, "shadow"), ("hold", False, "shadow")]
