"""The feature contract: the default file, spellings, and a specific error for each bad one."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from churn_assets.contract import ContractError, contract_from_dict, load_contract, spelling_key
from churn_assets.schemas import CATEGORY_VALUES, FEATURE_NAMES
from tests.serving_fixtures import DOCUMENTED_REQUEST

pytestmark = pytest.mark.unit

DEFAULT = Path(__file__).resolve().parents[2] / "config" / "features.yaml"


@pytest.fixture(scope="module")
def default_raw():
    return yaml.safe_load(DEFAULT.read_text())


def test_the_default_contract_is_todays_eight_features():
    contract = load_contract(DEFAULT)
    assert contract.names == FEATURE_NAMES
    for name, values in CATEGORY_VALUES.items():
        assert tuple(contract.feature(name).categories) == values
    assert contract.feature("customer_tenure").kind == "integer"
    assert (
        contract.feature("monthly_charges").minimum,
        contract.feature("monthly_charges").maximum,
    ) == (0, 10000)
    assert len(contract.digest) == 64 and contract.digest == load_contract(DEFAULT).digest


@pytest.mark.parametrize(
    ("feature", "spelled", "canonical"),
    [
        ("contract_type", "Two year", "two_year"),
        ("contract_type", "two year", "two_year"),
        ("contract_type", "Two_Year", "two_year"),
        ("contract_type", "Month-to-month", "month-to-month"),
        ("contract_type", "One year", "one_year"),
        ("payment_method", "Credit card", "credit_card"),
        ("payment_method", "Bank transfer (automatic)", "bank_transfer"),
        ("payment_method", "Credit card (automatic)", "credit_card"),
        ("payment_method", "Electronic check", "electronic_check"),
        ("internet_service", "Fiber optic", "fiber_optic"),
        ("internet_service", "No", "none"),
        ("internet_service", "DSL", "dsl"),
        ("payment_method", "cash", None),
        ("contract_type", "three year", None),
    ],
)
def test_categories_match_their_spellings(feature, spelled, canonical):
    assert load_contract(DEFAULT).feature(feature).canonical(spelled) == canonical


def test_spelling_keys_ignore_case_spaces_and_punctuation():
    assert spelling_key("Month-to-month") == spelling_key("MONTH TO MONTH") == "monthtomonth"
    assert spelling_key("Ｔｗｏ year") == "twoyear"  # full-width letters fold too


def with_derived(raw, entry):
    bad = copy.deepcopy(raw)
    bad["derived"].append(entry)
    return bad


def changed(raw, index, **fields):
    bad = copy.deepcopy(raw)
    bad["features"][index].update(fields)
    return bad


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: changed(r, 0, kind="float"), "feature 'customer_tenure': unknown kind 'float'"),
        (lambda r: changed(r, 1, min=100, max=10), "feature 'monthly_charges': bounds reversed"),
        (
            lambda r: changed(r, 2, name="monthly_charges"),
            "feature 'monthly_charges': the name is declared twice",
        ),
        (
            lambda r: changed(r, 3, categories={"one_year": ["annual"], "two_year": ["Annual"]}),
            "feature 'contract_type': 'Annual' would spell both 'one_year' and 'two_year'",
        ),
        (
            lambda r: changed(r, 4, categories={"credit_card": [], "Credit Card": []}),
            "feature 'payment_method': 'Credit Card' would spell both",
        ),
        (
            lambda r: changed(r, 0, min=float("nan")),
            "feature 'customer_tenure': min must be finite",
        ),
        (lambda r: changed(r, 0, min=0.5), "min of an integer must be a whole number"),
        (lambda r: changed(r, 0, max="600"), "feature 'customer_tenure': max must be a number"),
        (lambda r: changed(r, 3, categories=[]), "feature 'contract_type': a category needs"),
        (lambda r: changed(r, 3, min=0), "min and max apply to numbers, not to a category"),
        (lambda r: changed(r, 0, categories=["a"]), "categories apply to a category"),
        (
            lambda r: changed(r, 0, unit="months"),
            "feature 'customer_tenure': unknown keys ['unit']",
        ),
        (lambda r: changed(r, 0, missing="zero"), "missing must be one of reject, median"),
        (lambda r: changed(r, 3, missing="median"), "missing must be one of reject, most_frequent"),
        (lambda r: changed(r, 0, name="Tenure"), "name 'Tenure' must be lower-case"),
        (lambda r: changed(r, 4, categories={"credit_card": [False]}), "must be a list of text"),
        (lambda r: {**r, "format": 2}, "format must be 1"),
        (lambda r: {**r, "features": []}, "'features' must be a non-empty list"),
        (lambda r: {**r, "extra": 1}, "unknown keys ['extra']"),
        (lambda r: changed(r, 0, example=700), "'customer_tenure': example 700 is outside"),
        (lambda r: changed(r, 0, example=2.5), "example 2.5 is not a whole number"),
        (lambda r: changed(r, 1, example="79"), "'monthly_charges': example '79' is not a number"),
        (lambda r: changed(r, 3, example="Three year"), "example 'Three year' is not a spelling"),
        (lambda r: changed(r, 3, trend="contract_trend"), "a trend applies to numbers"),
        (lambda r: changed(r, 0, trend="login_trend"), "trend name 'login_trend' is taken"),
        (
            lambda r: with_derived(r, {"name": "x", "expression": "contract_type * 2"}),
            "derived feature 'x': expression uses 'contract_type', which is not a numeric",
        ),
        (
            lambda r: with_derived(r, {"name": "x", "expression": "__import__('os')"}),
            "derived feature 'x': expression may call only max and min",
        ),
        (
            lambda r: with_derived(r, {"name": "x", "expression": "total_charges ** 2"}),
            "may use only + - * /, max, min, numbers and features",
        ),
        (
            lambda r: with_derived(r, {"name": "x", "expression": "total_charges +"}),
            "derived feature 'x': expression 'total_charges +' is not valid",
        ),
        (
            lambda r: with_derived(r, {"name": "charge_ratio", "expression": "1"}),
            "derived feature 'charge_ratio': the name is declared twice",
        ),
        (
            lambda r: with_derived(r, {"name": "monthly_charges", "expression": "1"}),
            "derived feature 'monthly_charges': the name is declared twice",
        ),
    ],
)
def test_a_bad_contract_is_refused_naming_the_feature_and_the_problem(default_raw, change, message):
    with pytest.raises(ContractError, match=None) as info:
        contract_from_dict(change(default_raw))
    assert message in str(info.value)


def test_a_bad_file_names_itself(tmp_path):
    path = tmp_path / "features.yaml"
    with pytest.raises(ContractError, match="feature contract not found"):
        load_contract(path)
    path.write_text("format: 1\nfeatures: [")
    with pytest.raises(ContractError, match=f"feature contract {path} is not valid YAML"):
        load_contract(path)
    path.write_text("format: 1\nfeatures:\n  - {name: x, kind: number, min: 5, max: 1}\n")
    with pytest.raises(ContractError, match=f"feature contract {path}: feature 'x': bounds"):
        load_contract(path)


def test_the_features_model_takes_the_documented_request_and_stores_canonical_values():
    from churn_assets.contract import features_model

    model = features_model(load_contract(DEFAULT))
    record = model.model_validate(DOCUMENTED_REQUEST)
    assert (record.contract_type, record.payment_method, record.internet_service) == (
        "two_year",
        "credit_card",
        "fiber_optic",
    )
    assert model.model_validate_json(json.dumps(DOCUMENTED_REQUEST)) == record
    schema = model.model_json_schema()
    assert "Two year" not in schema["properties"]["contract_type"]["enum"]  # spelled by rule
    assert "Bank transfer (automatic)" in schema["properties"]["payment_method"]["enum"]
    tenure = schema["properties"]["customer_tenure"]
    assert (tenure["type"], tenure["minimum"], tenure["maximum"]) == ("integer", 0, 600)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("customer_tenure", True),
        ("customer_tenure", "24"),
        ("customer_tenure", 24.5),
        ("monthly_charges", "79.99"),
        ("monthly_charges", float("inf")),
        ("contract_type", "forever"),
        ("contract_type", 2),
        ("colour", "red"),
    ],
)
def test_the_features_model_is_strict(field, value):
    from pydantic import ValidationError

    from churn_assets.contract import features_model

    model = features_model(load_contract(DEFAULT))
    with pytest.raises(ValidationError) as info:
        model.model_validate({**DOCUMENTED_REQUEST, field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_derived_features_are_computed_per_record_and_a_zero_division_is_missing():
    import numpy as np

    from churn_assets.contract import evaluate_derived

    contract = load_contract(DEFAULT)
    columns = {
        "total_charges": np.array([100.0, 50.0]),
        "customer_tenure": np.array([0.0, 10.0]),
        "monthly_charges": np.array([30.0, 5.0]),
        "support_tickets": np.array([1.0, 2.0]),
        "login_frequency": np.array([-1.0, 3.0]),
    }
    for derived in contract.derived:
        columns[derived.name] = evaluate_derived(derived, columns)
    np.testing.assert_allclose(columns["charges_per_tenure_month"], [100.0, 5.0])
    np.testing.assert_allclose(columns["charge_ratio"], [30.0 / 101.0, 5.0 / 6.0])
    assert np.isnan(columns["tickets_per_login"][0]) and columns["tickets_per_login"][1] == 0.5


def test_the_default_contract_examples_are_the_documented_request():
    contract = load_contract(DEFAULT)
    assert {f.name: f.example for f in contract.features} == DOCUMENTED_REQUEST


def test_a_challenger_contract_needing_other_inputs_is_named():
    contract = load_contract(DEFAULT)
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["features"].append({"name": "senior_citizen", "kind": "boolean"})
    raw["features"][3]["categories"].pop("two_year")
    raw["features"][3].pop("example")
    raw["features"][0]["kind"] = "number"
    raw["features"][0].pop("example")
    challenger = contract_from_dict(raw)
    assert challenger.missing_inputs(contract) == [
        "customer_tenure (a number; the champion's is integer)",
        "contract_type (does not know two_year)",
        "senior_citizen (not in the champion's contract)",
    ]
    assert contract.missing_inputs(contract) == []


def test_a_stored_model_keeps_its_contract_in_declared_order():
    """contract.json round trip: category order (the form's default, the docs) survives."""
    from churn_assets.model import ScoringModel
    from tests.serving_fixtures import contract_model, extended_contract

    contract = extended_contract()
    declared = list(contract.feature("tech_support").categories)
    assert declared != sorted(declared)
    model = contract_model(contract, rows=200)
    again = ScoringModel.from_files(model.to_files()).contract
    assert list(again.feature("tech_support").categories) == declared
    assert again.digest == contract.digest
