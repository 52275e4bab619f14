"""Training on snapshot data: a static export (each customer observed once) is split by customer,
stratified on the label and seeded, and says so; an event history keeps its purged time split."""

import functools

import numpy as np
import pandas as pd
import pytest

from churn_assets.features import customer_features_as_of
from churn_assets.simulator import sample_customers
from churn_assets.training import (
    GROUPED_SPLIT,
    TIME_SPLIT,
    TrainingError,
    TrainingSet,
    assert_point_in_time,
    build_training_set,
)
from tests.ml_fixtures import small_frames

pytestmark = pytest.mark.unit

HORIZON_DAYS = 14
AS_OF = pd.Timestamp("2026-06-30", tz="UTC")


def export_frames(
    customers: int = 1200, seed: int = 3, times: list[pd.Timestamp] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Events and outcomes as ``churn import`` writes them for an export: one event per customer
    at its observation time; churned -> an outcome a day later, stayed -> a retained outcome a
    day past the horizon."""
    sample = sample_customers(customers, seed=seed, horizon_days=HORIZON_DAYS)
    observed = (
        pd.Series([AS_OF] * customers)
        if times is None
        else pd.Series([times[i % len(times)] for i in range(customers)])
    )
    events = sample.drop(columns=["label", "true_probability"]).assign(
        event_time=observed.to_numpy()
    )
    churned = sample["label"].to_numpy() == 1
    outcome = observed + pd.to_timedelta(np.where(churned, 1, HORIZON_DAYS + 1), unit="D")
    feedback = pd.DataFrame(
        {
            "customer_id": sample["customer_id"],
            "request_id": None,
            "churned": churned,
            "outcome_time": outcome.to_numpy(),
            "observed_at": outcome.to_numpy(),
        }
    )
    return events, feedback


def build(events: pd.DataFrame, feedback: pd.DataFrame, seed: int = 0) -> TrainingSet:
    return build_training_set(
        events,
        feedback,
        horizon_days=HORIZON_DAYS,
        step_days=3,
        label_grace_days=10,
        seed=seed,
    )


@pytest.fixture(scope="module")
def single_snapshot() -> TrainingSet:
    return build(*export_frames())


def test_a_single_snapshot_is_split_by_customer_and_says_why(single_snapshot):
    assert single_snapshot.split_method == GROUPED_SPLIT
    assert single_snapshot.split_reason.startswith("single snapshot: all 1200 customers")
    assert "stratified on the label" in single_snapshot.split_reason
    frame = single_snapshot.frame
    assert len(frame) == 1200  # every customer's outcome is known: none censored
    assert set(frame["split_method"]) == {GROUPED_SPLIT}
    assert set(frame["split_reason"]) == {single_snapshot.split_reason}
    sizes = frame["split"].value_counts()
    assert sizes["train"] == 720 and sizes["validation"] == 240 and sizes["test"] == 240


def test_no_customer_is_in_two_parts_and_each_part_keeps_the_churn_rate(single_snapshot):
    frame = single_snapshot.frame
    assert frame.groupby("customer_id")["split"].nunique().max() == 1
    overall = frame["label"].mean()
    assert 0.05 < overall < 0.95
    for split in ("train", "validation", "test"):
        assert frame.loc[frame["split"] == split, "label"].mean() == pytest.approx(
            overall, abs=0.01
        )


def test_the_grouped_split_is_seeded(single_snapshot):
    events, feedback = export_frames()
    again = build(events, feedback)
    pd.testing.assert_frame_equal(again.frame, single_snapshot.frame)
    other = build(events, feedback, seed=1)
    assert not other.frame["split"].equals(single_snapshot.frame["split"])
    assert "seeded (1)" in other.split_reason


def test_labels_line_up_with_the_importers_outcomes(single_snapshot):
    """Churned -> 1, stayed -> 0; a churn reported at the observation time itself is a churn
    within the horizon, not a customer gone before it."""
    events, feedback = export_frames()
    expected = feedback.set_index("customer_id")["churned"].astype(int)
    labels = single_snapshot.frame.set_index("customer_id")["label"]
    pd.testing.assert_series_equal(labels.sort_index(), expected.sort_index(), check_names=False)

    first = feedback.index[feedback["churned"]][0]
    feedback.loc[first, ["outcome_time", "observed_at"]] = AS_OF
    rebuilt = build(events, feedback).frame.set_index("customer_id")
    assert rebuilt.loc[feedback.loc[first, "customer_id"], "label"] == 1


def test_the_snapshot_features_are_point_in_time(single_snapshot):
    events, _ = export_frames()
    for snapshot in single_snapshot.plan.test[-3:]:
        assert_point_in_time(events, snapshot.to_pydatetime())


def test_a_stored_grouped_set_reads_back_its_split(single_snapshot):
    stored = TrainingSet.from_frame(single_snapshot.frame, HORIZON_DAYS)
    assert stored.split_method == GROUPED_SPLIT
    assert stored.split_reason == single_snapshot.split_reason
    assert stored.plan.test == [AS_OF]


def test_a_static_export_with_many_observation_times_is_split_by_customer():
    times = [AS_OF - pd.Timedelta(days=d) for d in range(0, 300, 5)]
    built = build(*export_frames(times=times))
    assert built.split_method == GROUPED_SPLIT
    assert built.split_reason.startswith("static export: each of the 1200 customers")
    assert set(built.frame["snapshot_time"]) == set(times)
    assert built.frame.groupby("customer_id")["split"].nunique().max() == 1


def test_a_few_exports_too_close_for_a_time_split_are_split_by_customer():
    events, feedback = export_frames(customers=900)
    later = events.assign(event_time=AS_OF + pd.Timedelta(days=30))
    later_outcomes = feedback.assign(
        outcome_time=feedback["outcome_time"] + pd.Timedelta(days=30),
        observed_at=feedback["observed_at"] + pd.Timedelta(days=30),
    )
    # Churned customers are gone by the second export: only the others are observed again.
    stayed = set(feedback.loc[~feedback["churned"], "customer_id"])
    built = build(
        pd.concat([events, later.loc[later["customer_id"].isin(stayed)]], ignore_index=True),
        pd.concat(
            [feedback, later_outcomes.loc[later_outcomes["customer_id"].isin(stayed)]],
            ignore_index=True,
        ),
    )
    assert built.split_method == GROUPED_SPLIT
    assert built.split_reason.startswith("snapshot exports: 2 observation times are too few")
    assert built.frame.groupby("customer_id")["split"].nunique().max() == 1
    assert len(built.frame) == 900 + len(stayed)


def test_an_event_history_keeps_its_purged_time_split():
    events, feedback = small_frames(customers=600, days=90)
    built = build(events, feedback)
    assert built.split_method == TIME_SPLIT
    assert built.split_reason.startswith("event history: purged time split over")
    horizon = pd.Timedelta(days=HORIZON_DAYS)
    assert max(built.plan.train) + horizon <= min(built.plan.validation)
    assert max(built.plan.validation) + horizon <= min(built.plan.test)


def test_an_export_with_too_few_churned_customers_is_a_clear_error():
    events, feedback = export_frames(customers=200)
    churned = feedback.index[feedback["churned"]]
    feedback.loc[churned[2:], "churned"] = False
    feedback.loc[churned[2:], ["outcome_time", "observed_at"]] = AS_OF + pd.Timedelta(
        days=HORIZON_DAYS + 1
    )
    with pytest.raises(TrainingError, match="only 2 churned customers with a known outcome"):
        build(events, feedback)


def test_a_time_per_row_export_builds_the_same_rows_in_one_pass():
    """A static export with a time per row takes one feature pass (every observation moved to a
    common time); it gives exactly the rows of one pass per observation time."""
    times = [AS_OF - pd.Timedelta(minutes=7 * i) for i in range(400)]
    events, feedback = export_frames(customers=400, times=times)
    fast = build(events, feedback)
    per_time = build_training_set(
        events,
        feedback,
        horizon_days=HORIZON_DAYS,
        step_days=3,
        label_grace_days=10,
        feature_builder=functools.partial(customer_features_as_of),
    )
    assert fast.split_method == per_time.split_method == GROUPED_SPLIT
    pd.testing.assert_frame_equal(fast.frame, per_time.frame)
