"""A ten-feature contract (the default eight, a boolean ``senior_citizen`` and a category
``tech_support``) through drift, outliers, segments and the dashboard's prediction form: every
feature is covered, each by its kind, with no feature named in the code under test."""

import json

import numpy as np
import pandas as pd
import panel as pn
import pytest
import xgboost as xgb

from churn_assets.config import load_settings
from churn_assets.contract import Contract, contract_from_dict
from churn_assets.drift import drift_report
from churn_assets.features import FeatureTransformer
from churn_assets.model import ScoringModel
from churn_assets.outliers import (
    OutlierError,
    load_outlier_scorer,
    load_reference_frame,
    reference_files,
)
from churn_assets.registry import ModelRegistry
from churn_assets.segments import cohort_types, segment_table
from churn_assets.simulator import sample_customers
from dashboards.forms import default_features, form_fields, validate_features
from dashboards.sources.registry import form_contract
from tests.serving_fixtures import extended_contract

pytestmark = pytest.mark.unit

EXTRA = ("senior_citizen", "tech_support")
TECH_SUPPORT = ("yes", "no", "no_internet")


CONTRACT = extended_contract()


def customers(rows: int, seed: int, senior_share: float = 0.16, support_first: float = 0.3):
    """The simulator's customers with the two extra features drawn (seeded)."""
    frame = sample_customers(rows, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    rest = (1 - support_first) / 2
    return frame.assign(
        senior_citizen=rng.random(rows) < senior_share,
        tech_support=rng.choice(TECH_SUPPORT, rows, p=(support_first, rest, rest)),
    )


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return customers(2_000, seed=3)


@pytest.fixture(scope="module")
def transformer(reference) -> FeatureTransformer:
    return FeatureTransformer.fit(reference, CONTRACT)


# -- drift ----------------------------------------------------------------------------------------


def test_drift_covers_all_ten_features_each_by_its_kind(reference, transformer):
    live = customers(1_500, seed=4, senior_share=0.4, support_first=0.55)
    report = drift_report(reference, live, contract=CONTRACT, mmd_sample=300)
    by_name = {test.feature: test for test in report.features}
    assert list(by_name) == list(CONTRACT.names)
    expected = {
        name: "ks" if CONTRACT.feature(name).kind in ("integer", "number") else "chi2"
        for name in CONTRACT.names
    }
    assert {name: test.detector for name, test in by_name.items()} == expected
    assert by_name["senior_citizen"].kind == by_name["tech_support"].kind == "categorical"
    # Only the two extra features moved (and the default eight are drawn alike).
    assert report.drifted_features == list(EXTRA)
    assert report.multivariate["detector"] == "mmd" and report.multivariate["drift"] is True
    # The same report through the model's transformer (the MMD on the model matrix).
    through_model = drift_report(
        reference, live, contract=CONTRACT, mmd_sample=300, transformer=transformer
    )
    assert through_model.drifted_features == list(EXTRA)
    assert through_model.multivariate["drift"] is True


def test_a_window_without_the_extra_features_is_refused_by_name(reference):
    live = customers(500, seed=5).drop(columns=list(EXTRA))
    with pytest.raises(ValueError, match=r"live window lacks feature columns \['senior_citizen', "):
        drift_report(reference, live, contract=CONTRACT, mmd=False)


# -- outliers -------------------------------------------------------------------------------------


def test_outlier_reference_holds_every_contract_feature(reference, transformer):
    files = reference_files(transformer, reference.assign(label=0), 0.01, seed=7, sample_rows=300)
    stored = load_reference_frame(files)
    assert list(stored.columns) == list(CONTRACT.names)  # the training frame's order, no label
    assert stored["senior_citizen"].dtype == bool
    assert list(load_reference_frame(files, ["tech_support", "senior_citizen"]).columns) == [
        "tech_support",
        "senior_citizen",
    ]
    scorer = load_outlier_scorer(transformer, files)
    scores, flags = scorer.score_mahalanobis(transformer.transform(reference.head(200)))
    assert scores.shape == flags.shape == (200,)
    with pytest.raises(OutlierError, match=r"lacks the model features \['contract_length'\]"):
        load_reference_frame(files, ["contract_length"])
    with pytest.raises(OutlierError, match=r"training frame lacks the model features"):
        reference_files(transformer, reference.drop(columns=["tech_support"]), 0.01, seed=7)


# -- segments -------------------------------------------------------------------------------------


def test_segments_have_a_cohort_per_category_and_boolean_and_bands_of_the_first_integer(reference):
    assert cohort_types(CONTRACT) == (
        "risk_tier",
        "contract_type",
        "payment_method",
        "internet_service",
        "senior_citizen",
        "tech_support",
        "customer_tenure_band",
    )
    scored = reference.assign(
        risk=np.linspace(0, 0.3, len(reference)), churned=reference["label"].astype(bool)
    )
    table = segment_table(scored, "v9", CONTRACT)
    assert list(dict.fromkeys(table["cohort_type"])) == list(cohort_types(CONTRACT))
    cohorts = table.groupby("cohort_type")["cohort"].apply(set).to_dict()
    assert cohorts["senior_citizen"] == {"True", "False"}
    assert cohorts["tech_support"] == set(TECH_SUPPORT)
    assert cohorts["customer_tenure_band"] == {"0-5", "6-11", "12-23", "24-47", "48+"}
    assert (table.groupby("cohort_type")["customers"].sum() == len(reference)).all()
    with pytest.raises(ValueError, match=r"needs columns \['senior_citizen'\]"):
        segment_table(scored.drop(columns=["senior_citizen"]), "v9", CONTRACT)


def test_a_contract_without_integers_has_no_bands():
    contract = contract_from_dict(
        {"format": 1, "features": [{"name": "plan", "kind": "category", "categories": ["a"]}]}
    )
    assert cohort_types(contract) == ("risk_tier", "plan")


# -- the dashboard's prediction form --------------------------------------------------------------


def test_the_form_has_one_field_per_feature_by_kind_with_contract_labels_and_defaults(reference):
    fields = {field.name: field for field in form_fields(CONTRACT, reference)}
    assert list(fields) == list(CONTRACT.names)
    assert {name: f.kind for name, f in fields.items()} == {
        f.name: f.kind for f in CONTRACT.features
    }
    senior, support = fields["senior_citizen"], fields["tech_support"]
    assert (senior.kind, senior.label, senior.default) == ("boolean", "65 or older", False)
    assert (support.kind, support.options, support.default) == ("category", TECH_SUPPORT, "yes")
    assert support.label == "Tech support subscription"
    tenure = fields["customer_tenure"]
    assert (tenure.start, tenure.end, tenure.label) == (0, 600, "Months since sign-up")
    assert tenure.default == int(reference["customer_tenure"].median())
    assert fields["monthly_charges"].default == round(reference["monthly_charges"].median(), 2)
    # Without a reference: each number's minimum, still within bounds.
    assert default_features(CONTRACT)["customer_tenure"] == 0


def test_the_form_validates_with_the_contracts_schema(reference):
    values = default_features(CONTRACT, reference)
    check = validate_features(values | {"tech_support": "No internet service"}, CONTRACT)
    assert check.ok and check.features["tech_support"] == "no_internet"
    assert check.features["senior_citizen"] is False
    assert set(check.features) == set(CONTRACT.names)
    missing = validate_features({k: v for k, v in values.items() if k != "tech_support"}, CONTRACT)
    assert missing.errors == {"tech_support": "required"}
    bad = validate_features(values | {"senior_citizen": "maybe", "tech_support": "some"}, CONTRACT)
    assert set(bad.errors) == set(EXTRA)
    assert "yes, no, no_internet" in bad.errors["tech_support"]


def _register(registry: ModelRegistry, contract: Contract, frame: pd.DataFrame) -> str:
    transformer = FeatureTransformer.fit(frame, contract)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 2, "seed": 0, "nthread": 1},
        xgb.DMatrix(transformer.transform(frame), label=frame["label"].astype(int)),
        num_boost_round=5,
    )
    model = ScoringModel(booster=booster, transformer=transformer, contract=contract)
    files = model.to_files() | reference_files(transformer, frame, 0.01, seed=0, sample_rows=200)
    version = registry.register(files, {"metrics": {}})
    registry.set_alias("champion", version.version)
    return version.version


def test_the_form_follows_the_champions_contract(config_factory, reference):
    settings = load_settings(config_factory())
    before = form_contract(settings)
    assert before.contract == settings.contract and "configured" in before.source
    registry = ModelRegistry(settings.registry_dir)
    version = _register(registry, CONTRACT, reference)
    found = form_contract(settings)
    assert found.contract == CONTRACT and found.source == f"{version}'s contract"
    stored = json.loads(registry.read_file(version, "contract.json"))
    assert [f["name"] for f in stored["features"]] == list(CONTRACT.names)


def test_the_prediction_page_renders_a_widget_per_contract_feature(
    config_factory, reference, monkeypatch
):
    from dashboards.pages.common import Context
    from dashboards.pages.prediction import PredictionPage

    monkeypatch.delenv("CHURN_ADMIN_TOKEN", raising=False)
    settings = load_settings(config_factory())
    _register(ModelRegistry(settings.registry_dir), CONTRACT, reference)
    page = PredictionPage(Context.from_settings(settings))
    assert list(page.inputs) == list(CONTRACT.names)
    widget_kinds = {
        "integer": pn.widgets.IntInput,
        "number": pn.widgets.FloatInput,
        "category": pn.widgets.Select,
        "boolean": pn.widgets.Checkbox,
    }
    for feature in CONTRACT.features:
        widget = page.inputs[feature.name]
        assert type(widget) is widget_kinds[feature.kind], feature.name
        assert f"feature-{feature.name}" in widget.css_classes
    # In the order of the champion's stored contract (contract.json is written with sorted
    # keys, so the stored order may differ from the YAML's).
    stored = page.contract.feature("tech_support").categories
    assert page.inputs["tech_support"].options == list(stored)
    assert set(stored) == set(TECH_SUPPORT)
    assert page.inputs["senior_citizen"].label == "65 or older"
    tenure = page.inputs["customer_tenure"]
    assert (tenure.start, tenure.end) == (0, 600)
    # The reference sample stored with the champion gives the defaults: they validate.
    assert validate_features(page.values(), CONTRACT).ok
    page.inputs["tech_support"].value = "no_internet"
    page.inputs["senior_citizen"].value = True
    assert validate_features(page.values(), CONTRACT).features["senior_citizen"] is True


# -- the monitoring asset's live window -----------------------------------------------------------


def test_the_live_window_reads_the_champions_features_from_a_real_warehouse(
    config_factory, reference
):
    from churn_assets.assets.monitoring import MonitoringError, _live_events, live_events_sql
    from churn_assets.warehouse import connect, ensure_schema

    assert all(f'"{name}"' in live_events_sql(CONTRACT) for name in CONTRACT.names)
    settings = load_settings(config_factory())
    with connect(settings.warehouse_path) as con:
        ensure_schema(con)  # a warehouse landed with the default contract
    lacking = r"no column for the champion's features \['senior_citizen', 'tech_support'\]"
    with pytest.raises(MonitoringError, match=lacking):
        _live_events(settings, CONTRACT)

    days = settings.monitoring.live_window_days
    rows = customers(400, seed=6)
    end = pd.Timestamp("2026-03-01", tz="UTC")
    times = end - pd.to_timedelta(np.linspace(0, 2 * days, len(rows)), unit="D")
    landed = rows[list(CONTRACT.names)].assign(
        kafka_topic="churn.customers",
        kafka_partition=0,
        kafka_offset=np.arange(len(rows)),
        event_id=[f"e{i}" for i in range(len(rows))],
        customer_id=rows["customer_id"],
        event_time=times,
        landed_at=end,
    )
    with connect(settings.warehouse_path) as con:
        con.execute("ALTER TABLE landed_customer_events ADD COLUMN senior_citizen BOOLEAN")
        con.execute("ALTER TABLE landed_customer_events ADD COLUMN tech_support VARCHAR")
        con.register("landed", landed)
        con.execute("INSERT INTO landed_customer_events BY NAME SELECT * FROM landed")
    live = _live_events(settings, CONTRACT)
    assert list(live.columns) == ["event_id", "customer_id", "event_time", *CONTRACT.names]
    inside = times > end - pd.Timedelta(days=days)
    assert sorted(live["event_id"]) == sorted(landed.loc[inside, "event_id"])
    report = drift_report(reference, live, contract=CONTRACT, mmd=False)
    assert [test.feature for test in report.features] == list(CONTRACT.names)
