from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from churn_assets.features import FeatureTransformer, TransformerError, customer_features_as_of
from churn_assets.schemas import FEATURE_NAMES
from churn_assets.training import LeakageError, assert_point_in_time
from tests.ml_fixtures import small_frames

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def frames():
    return small_frames(customers=400, days=40)


def test_features_are_the_latest_state_at_or_before_t(frames):
    events, _ = frames
    as_of = events["event_time"].min() + timedelta(days=10)
    features = customer_features_as_of(events, as_of.to_pydatetime())
    assert (features["last_event_time"] <= as_of).all()
    one = features.iloc[0]
    history = events.loc[
        (events["customer_id"] == one["customer_id"]) & (events["event_time"] <= as_of)
    ]
    latest = history.sort_values("event_time").iloc[-1]
    assert one["monthly_charges"] == latest["monthly_charges"]
    assert one["events_30d"] == len(history)


def test_real_feature_builder_passes_the_leakage_guard(frames):
    events, _ = frames
    as_of = events["event_time"].min() + timedelta(days=20)
    assert_point_in_time(events, as_of.to_pydatetime())


def test_leakage_guard_catches_a_feature_that_looks_ahead(frames):
    events, _ = frames
    as_of = events["event_time"].min() + timedelta(days=20)

    def leaky(all_events, t):
        features = customer_features_as_of(all_events, t)
        # Deliberate leak: counts the customer's events over the whole data set.
        totals = all_events.groupby("customer_id").size()
        return features.assign(lifetime_events=features["customer_id"].map(totals))

    with pytest.raises(LeakageError, match=r"\['lifetime_events'\]"):
        assert_point_in_time(events, as_of.to_pydatetime(), feature_builder=leaky)


def test_transformer_parity_between_frame_and_records(frames):
    events, _ = frames
    transformer = FeatureTransformer.fit(events)
    sample = events.head(300)
    training_path = transformer.transform(sample)
    serving_path = transformer.transform_records(sample[list(FEATURE_NAMES)].to_dict("records"))
    assert training_path.shape == (300, len(transformer.feature_names_out))
    np.testing.assert_array_equal(training_path, serving_path)


def test_transformer_round_trips_as_json_not_pickle(frames):
    events, _ = frames
    transformer = FeatureTransformer.fit(events)
    text = transformer.to_json()
    assert text.startswith("{")
    again = FeatureTransformer.from_json(text)
    np.testing.assert_array_equal(
        transformer.transform(events.head(50)), again.transform(events.head(50))
    )


def test_missing_values_take_the_training_median_and_unknown_categories_encode_as_zero(frames):
    events, _ = frames
    transformer = FeatureTransformer.fit(events)
    record = events[list(FEATURE_NAMES)].iloc[0].to_dict()
    record["login_frequency"] = None
    record["contract_type"] = "lifetime"
    matrix = transformer.transform_records([record])
    names = transformer.feature_names_out
    login = names.index("login_frequency")
    expected = (transformer.medians["login_frequency"] - transformer.means["login_frequency"]) / (
        transformer.scales["login_frequency"]
    )
    assert matrix[0, login] == pytest.approx(expected, rel=1e-5)
    contract_columns = [i for i, n in enumerate(names) if n.startswith("contract_type=")]
    assert matrix[0, contract_columns].sum() == 0


def test_missing_columns_and_bad_stored_transformer_are_refused(frames):
    events, _ = frames
    with pytest.raises(TransformerError, match="lacks the model features"):
        FeatureTransformer.fit(events.drop(columns=["support_tickets"]))
    with pytest.raises(TransformerError, match="format"):
        FeatureTransformer.from_json('{"format_version": 99}')
    with pytest.raises(TransformerError, match="malformed"):
        FeatureTransformer.from_json('{"format_version": 1}')


def test_derived_features_use_only_the_record(frames):
    events, _ = frames
    transformer = FeatureTransformer.fit(events)
    assert {"charges_per_tenure_month", "charge_ratio", "tickets_per_login"} <= set(
        transformer.numeric
    )
    record = {name: events[name].iloc[5] for name in FEATURE_NAMES}
    record.update(customer_tenure=0, total_charges=90.0, monthly_charges=45.0)
    row = pd.DataFrame([record])
    column = transformer.feature_names_out.index("charges_per_tenure_month")
    scaled = transformer.transform(row)[0, column]
    raw = (
        scaled * transformer.scales["charges_per_tenure_month"]
        + transformer.means["charges_per_tenure_month"]
    )
    assert raw == pytest.approx(90.0, rel=1e-5)  # tenure 0 counts as one month
