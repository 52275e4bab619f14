"""Realised and estimated performance on synthetic landed predictions and feedback.

Tolerance of the label-free estimate (also stated in ``churn_assets.performance``): on calibrated
scores with at least 5,000 labelled rows per group, |estimated - realised| <= 0.03 ROC-AUC and
<= 0.05 precision and recall at a threshold flagging ~700+ rows per group (0.3 here; at 0.5 only
~300 rows are flagged and precision noise alone reaches ~0.065).
"""

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from churn_assets.performance import (
    estimated_performance,
    expected_roc_auc,
    join_outcomes,
    performance_alerts,
    performance_report,
    realised_performance,
)
from churn_assets.simulator import expected_best_auc, sample_customers

pytestmark = pytest.mark.unit

HORIZON_DAYS = 14
START = datetime(2026, 1, 1, tzinfo=UTC)
GROUPS = (("v1", "primary"), ("v1", "canary"), ("v2", "primary"), ("v2", "canary"))
PER_GROUP = 6_000
MATURE = START + timedelta(days=120)  # every outcome of the 20 days of predictions is known
AUC_TOLERANCE = 0.03
RATE_TOLERANCE = 0.05
THRESHOLD = 0.3


def landed_frames(
    seed: int, *, per_group: int = PER_GROUP, drifted_version: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Landed-style predictions (score = true probability) and feedback with reporting delays.

    Churners churn inside the horizon and are reported 1 + Exp(4) days later; the others renew
    after the horizon and are reported a day later. ``drifted_version`` shuffles which of its
    customers churn, so its outcomes no longer follow its scores (concept drift).
    """
    # A stream of its own: sharing sample_customers' seed would tie times to features.
    rng = np.random.default_rng([seed, 1])
    n = per_group * len(GROUPS)
    customers = sample_customers(n, seed=seed, horizon_days=HORIZON_DAYS)
    versions = np.repeat([version for version, _ in GROUPS], per_group)
    arms = np.repeat([arm for _, arm in GROUPS], per_group)
    predicted_at = pd.Timestamp(START) + pd.to_timedelta(rng.uniform(0, 20, n), unit="D")
    churned = customers["label"].to_numpy().astype(bool)
    if drifted_version is not None:
        rows = np.flatnonzero(versions == drifted_version)
        churned[rows] = rng.permutation(churned[rows])
    predictions = pd.DataFrame(
        {
            "request_id": [f"req-{i}" for i in range(n)],
            "customer_id": customers["customer_id"].to_numpy(),
            "model_name": "churn",
            "model_version": versions,
            "arm": arms,
            "score": customers["true_probability"].to_numpy(),
            "latency_ms": rng.uniform(1, 20, n),
            "status": "ok",
            "predicted_at": predicted_at,
        }
    )
    errors = predictions.sample(50, random_state=seed).assign(
        request_id=lambda f: f["request_id"] + "-error", status="error", score=np.nan
    )
    predictions = pd.concat([predictions, errors], ignore_index=True)

    churn_after = pd.to_timedelta(rng.uniform(0.01, HORIZON_DAYS, n), unit="D")
    renew_after = pd.to_timedelta(HORIZON_DAYS + rng.uniform(1, 16, n), unit="D")
    outcome_time = predicted_at + np.where(churned, churn_after, renew_after)
    delay = np.where(churned, 1 + rng.exponential(4, n), 1.0)
    feedback = pd.DataFrame(
        {
            "customer_id": customers["customer_id"].to_numpy(),
            "request_id": None,
            "churned": churned,
            "outcome_time": outcome_time,
            "observed_at": outcome_time + pd.to_timedelta(delay, unit="D"),
        }
    )
    return predictions, feedback


@pytest.fixture(scope="module")
def landed() -> tuple[pd.DataFrame, pd.DataFrame]:
    return landed_frames(seed=11)


@pytest.fixture(scope="module")
def mature(landed) -> pd.DataFrame:
    predictions, feedback = landed
    return join_outcomes(predictions, feedback, horizon_days=HORIZON_DAYS, as_of=MATURE)


def overall(frame: pd.DataFrame, version: str, arm: str) -> pd.Series:
    rows = frame.loc[
        (frame["model_version"] == version) & (frame["arm"] == arm) & (frame["period"] == "all")
    ]
    assert len(rows) == 1
    return rows.iloc[0]


def test_mature_join_labels_every_scored_prediction(landed, mature):
    predictions, feedback = landed
    assert len(mature) == (predictions["status"] == "ok").sum()
    assert mature["labelled"].all()
    assert set(mature["label_source"]) == {"customer"}
    expected = feedback.set_index("customer_id")["churned"].astype(float)
    assert (mature["label"].to_numpy() == mature["customer_id"].map(expected).to_numpy()).all()


def test_realised_auc_equals_sklearn_on_the_same_rows(mature):
    realised = realised_performance(mature, threshold=THRESHOLD)
    assert set(realised["period"]) >= {"all", "2026-01-01", "2026-01-20"}
    days = mature["predicted_at"].dt.strftime("%Y-%m-%d")
    for row in realised.itertuples():
        mask = (mature["model_version"] == row.model_version) & (mature["arm"] == row.arm)
        if row.period != "all":
            mask &= days == row.period
        part = mature.loc[mask & mature["labelled"]]
        assert row.labelled == len(part)
        assert row.positives == part["label"].sum()
        assert abs(row.roc_auc - roc_auc_score(part["label"], part["score"])) <= 1e-12
        flagged = part["score"] >= THRESHOLD
        assert row.precision == pytest.approx(part.loc[flagged, "label"].mean(), abs=1e-12)
        assert row.recall == pytest.approx(flagged[part["label"] == 1].mean(), abs=1e-12)
    assert len(realised) == len(GROUPS) * 21


def test_recent_predictions_stay_pending_and_late_feedback_is_ignored(landed):
    predictions, feedback = landed
    as_of = START + timedelta(days=25)
    joined = join_outcomes(predictions, feedback, horizon_days=HORIZON_DAYS, as_of=as_of)
    outcome = feedback.set_index("customer_id")
    churned = joined["customer_id"].map(outcome["churned"]).astype(bool)
    observed = joined["customer_id"].map(outcome["observed_at"]) <= as_of
    open_horizon = joined["horizon_end"] > as_of

    churn_known = churned & observed
    assert (joined.loc[churn_known, "label"] == 1).all()
    assert joined.loc[~churn_known, "label"].ne(1).all()
    # Without a reported churn, an open horizon is pending: nothing yet shows the customer stayed.
    pending = open_horizon & ~churn_known
    assert pending.sum() > 1_000
    assert joined.loc[pending, "label"].isna().all()
    # A churn that happened but is reported after as_of does not count.
    late = churned & ~observed
    assert late.sum() > 100
    assert joined.loc[late, "label"].isna().all()
    # Non-churns whose renewal was observed by as_of are known negatives.
    renewed = ~churned & observed & ~open_horizon
    assert renewed.sum() > 100
    assert (joined.loc[renewed, "label"] == 0).all()
    assert (joined["label"].isna() == ~joined["labelled"]).all()


def test_error_rows_and_future_predictions_are_left_out(landed):
    predictions, feedback = landed
    as_of = START + timedelta(days=10)
    joined = join_outcomes(predictions, feedback, horizon_days=HORIZON_DAYS, as_of=as_of)
    assert (joined["status"] == "ok").all() and joined["score"].notna().all()
    assert (joined["predicted_at"] <= as_of).all()
    assert 0 < len(joined) < (predictions["status"] == "ok").sum()


def test_request_id_feedback_wins_over_customer_matching():
    t0 = START
    predictions = pd.DataFrame(
        {
            "request_id": ["a", "a", "b", "c"],
            "customer_id": ["C1", "C1", "C1", "C2"],
            "model_version": ["v1", "v2", "v1", "v1"],
            "arm": ["primary", "shadow", "primary", "primary"],
            "score": [0.8, 0.7, 0.6, 0.3],
            "status": "ok",
            "predicted_at": [t0, t0, t0 + timedelta(days=1), t0],
        }
    )
    day = timedelta(days=1)
    feedback = pd.DataFrame(
        {
            "customer_id": ["C1", "C1", "C2"],
            "request_id": ["b", None, None],
            "churned": [True, False, True],
            "outcome_time": [t0 + 3 * day, t0 + 20 * day, t0 + 5 * day],
            "observed_at": [t0 + 4 * day, t0 + 21 * day, t0 + 6 * day],
        }
    )
    joined = join_outcomes(predictions, feedback, horizon_days=HORIZON_DAYS, as_of=t0 + 30 * day)
    indexed = joined.set_index(["request_id", "model_version"])
    labels, sources = indexed["label"].to_dict(), indexed["label_source"].to_dict()
    # The churn tagged with request "b" labels b only; request "a" (both its primary and shadow
    # rows) is labelled by the customer's later renewal, not by b's churn inside its horizon.
    assert labels[("b", "v1")] == 1.0 and sources[("b", "v1")] == "request"
    assert labels[("a", "v1")] == 0.0 and labels[("a", "v2")] == 0.0
    assert sources[("a", "v1")] == "customer"
    assert labels[("c", "v1")] == 1.0 and sources[("c", "v1")] == "customer"

    # The same churn without a request id is matched by customer and time: a is a positive too.
    untagged = feedback.assign(request_id=[None, None, None])
    joined = join_outcomes(predictions, untagged, horizon_days=HORIZON_DAYS, as_of=t0 + 30 * day)
    assert joined.loc[joined["request_id"] == "a", "label"].eq(1.0).all()

    # A tagged renewal after the horizon beats an untagged churn inside it.
    contradicting = pd.DataFrame(
        {
            "customer_id": ["C2", "C2"],
            "request_id": ["c", ""],
            "churned": [False, True],
            "outcome_time": [t0 + 16 * day, t0 + 5 * day],
            "observed_at": [t0 + 17 * day, t0 + 6 * day],
        }
    )
    joined = join_outcomes(
        predictions, contradicting, horizon_days=HORIZON_DAYS, as_of=t0 + 30 * day
    )
    row = joined.loc[joined["request_id"] == "c"].iloc[0]
    assert row["label"] == 0.0 and row["label_source"] == "request"


def test_expected_auc_is_exact_and_matches_the_simulator_reference():
    rng = np.random.default_rng(3)
    scores = np.round(rng.uniform(size=300), 2)  # ties included
    probabilities = np.clip(scores + rng.normal(0, 0.1, size=300), 0, 1)
    q = 1 - probabilities
    greater = (scores[:, None] > scores[None, :]) + 0.5 * (scores[:, None] == scores[None, :])
    np.fill_diagonal(greater, 0.0)
    pairs = np.outer(probabilities, q)
    np.fill_diagonal(pairs, 0.0)
    brute = float(np.sum(pairs * greater) / np.sum(pairs))
    assert expected_roc_auc(scores, probabilities) == pytest.approx(brute, abs=1e-12)
    assert expected_roc_auc(scores) == pytest.approx(expected_best_auc(scores), abs=1e-12)
    with pytest.raises(ValueError, match="no positive-negative pairs"):
        expected_roc_auc(np.array([0.0, 0.0, 0.0]))


def test_estimate_tracks_realised_on_calibrated_scores(mature):
    realised = realised_performance(mature, threshold=THRESHOLD, period=None)
    estimated = estimated_performance(mature, threshold=THRESHOLD, period=None)
    assert list(realised.columns) == list(estimated.columns)
    assert set(estimated["kind"]) == {"estimated"} and set(realised["kind"]) == {"realised"}
    for version, arm in GROUPS:
        real, est = overall(realised, version, arm), overall(estimated, version, arm)
        assert real["labelled"] >= 5_000
        assert abs(est["roc_auc"] - real["roc_auc"]) <= AUC_TOLERANCE
        assert abs(est["precision"] - real["precision"]) <= RATE_TOLERANCE
        assert abs(est["recall"] - real["recall"]) <= RATE_TOLERANCE
        assert abs(est["observed_rate"] - real["observed_rate"]) <= 0.01
        assert np.isnan(est["calibration_error"]) and real["calibration_error"] < 0.02


def test_estimate_covers_pending_rows_too(landed):
    predictions, feedback = landed
    joined = join_outcomes(
        predictions, feedback, horizon_days=HORIZON_DAYS, as_of=START + timedelta(days=25)
    )
    estimated = estimated_performance(joined, threshold=THRESHOLD)
    realised = realised_performance(joined, threshold=THRESHOLD)
    last_day = estimated.loc[estimated["period"] == "2026-01-20"]
    assert (last_day["rows"] > 0).all() and (last_day["roc_auc"] > 0.75).all()
    # The freshest day only has early-reported churns labelled: realised cannot score it yet.
    fresh = realised.loc[realised["period"] == "2026-01-20"]
    assert fresh["auc_reason"].str.startswith("one class only").all()
    assert fresh["roc_auc"].isna().all()


def test_concept_drift_sinks_realised_auc_while_the_estimate_stays_high():
    predictions, feedback = landed_frames(seed=5, drifted_version="v2")
    joined = join_outcomes(predictions, feedback, horizon_days=HORIZON_DAYS, as_of=MATURE)
    report = performance_report(joined, threshold=THRESHOLD, period=None)
    realised = report.loc[report["kind"] == "realised"]
    estimated = report.loc[report["kind"] == "estimated"]
    for arm in ("primary", "canary"):
        assert abs(overall(realised, "v2", arm)["roc_auc"] - 0.5) <= 0.05
        assert overall(estimated, "v2", arm)["roc_auc"] >= 0.8
        assert overall(realised, "v1", arm)["roc_auc"] >= 0.8

    alerts = performance_alerts(report, 0.75, min_labelled=1_000)
    assert {(a["model_version"], a["arm"]) for a in alerts} == {
        ("v2", "primary"),
        ("v2", "canary"),
    }
    assert all(a["kind"] == "realised" and a["roc_auc"] < 0.6 for a in alerts)
    assert all(a["estimated_roc_auc"] >= 0.8 for a in alerts)
    # Too few labels to trust the realised figure: the (blind) estimate is judged, no alert.
    assert performance_alerts(report, 0.75, min_labelled=10**6) == []


def test_alerts_fall_back_to_the_estimate_when_labels_are_few(mature):
    report = performance_report(mature, threshold=THRESHOLD, period=None)
    alerts = performance_alerts(report, 0.99, min_labelled=10**6)
    assert len(alerts) == len(GROUPS)
    assert {a["kind"] for a in alerts} == {"estimated"}
    assert all("below 0.990" in a["message"] for a in alerts)


def test_one_class_groups_have_nan_auc_with_a_reason():
    t0 = START
    predictions = pd.DataFrame(
        {
            "request_id": ["a", "b", "c", "d"],
            "customer_id": ["C1", "C2", "C3", "C4"],
            "model_version": ["v1", "v1", "v2", "v2"],
            "arm": "primary",
            "score": [0.2, 0.6, 0.0, 0.0],
            "status": "ok",
            "predicted_at": t0,
        }
    )
    feedback = pd.DataFrame(
        {
            "customer_id": ["C1", "C2"],
            "request_id": None,
            "churned": [False, False],
            "outcome_time": t0 + timedelta(days=20),
            "observed_at": t0 + timedelta(days=21),
        }
    )
    joined = join_outcomes(
        predictions, feedback, horizon_days=HORIZON_DAYS, as_of=t0 + timedelta(days=30)
    )
    realised = realised_performance(joined, period=None).set_index("model_version")
    assert np.isnan(realised.loc["v1", "roc_auc"])
    assert realised.loc["v1", "auc_reason"] == "one class only: 0 positives, 2 negatives labelled"
    assert np.isnan(realised.loc["v1", "recall"]) and realised.loc["v1", "precision"] == 0.0
    assert np.isnan(realised.loc["v2", "roc_auc"])
    assert realised.loc["v2", "auc_reason"] == "no labelled rows"
    estimated = estimated_performance(joined, period=None).set_index("model_version")
    # Pairs (0.6 before 0.2) weigh 0.6 * 0.8 of the 0.8 * 1.2 - (0.16 + 0.24) expected pairs.
    assert estimated.loc["v1", "roc_auc"] == pytest.approx(0.48 / 0.56, abs=1e-12)
    assert estimated.loc["v1", "auc_reason"] is None
    assert np.isnan(estimated.loc["v2", "roc_auc"])
    assert "no positive-negative pairs" in estimated.loc["v2", "auc_reason"]
    assert performance_alerts(pd.concat([realised.reset_index()]), 0.75) == []


def test_isotonic_calibration_repairs_miscalibrated_scores(mature):
    reference = sample_customers(20_000, seed=99, horizon_days=HORIZON_DAYS)
    # A monotone but overconfident score: same ranking, wrong probabilities.
    distorted = mature.assign(score=np.sqrt(mature["score"]))
    realised = realised_performance(distorted, threshold=THRESHOLD, period=None)
    raw = estimated_performance(distorted, threshold=THRESHOLD, period=None)
    calibrated = estimated_performance(
        distorted,
        threshold=THRESHOLD,
        period=None,
        calibration=(np.sqrt(reference["true_probability"]), reference["label"]),
    )
    for version, arm in GROUPS:
        real = overall(realised, version, arm)
        fixed, blind = overall(calibrated, version, arm), overall(raw, version, arm)
        assert abs(blind["observed_rate"] - real["observed_rate"]) > 0.1
        assert abs(fixed["observed_rate"] - real["observed_rate"]) <= 0.01
        assert abs(fixed["roc_auc"] - real["roc_auc"]) <= AUC_TOLERANCE
        assert abs(fixed["precision"] - real["precision"]) <= RATE_TOLERANCE
        assert abs(fixed["recall"] - real["recall"]) <= RATE_TOLERANCE
        assert abs(blind["roc_auc"] - real["roc_auc"]) > abs(fixed["roc_auc"] - real["roc_auc"])
