"""Column validation compiled from the contract: strict types, bounds, spellings, missing values,
each bad row with its reason; numeric arrays and JSON values agree."""

from pathlib import Path

import numpy as np
import pytest

from churn_assets.contract import contract_from_dict, load_contract
from churn_assets.validation import RowError, check_columns

pytestmark = pytest.mark.unit

DEFAULT = load_contract(Path(__file__).resolve().parents[2] / "config" / "features.yaml")


def columns(**changes):
    base = {
        "customer_tenure": [24, 12],
        "monthly_charges": [79.99, 50],
        "total_charges": [1919.76, 600.0],
        "contract_type": ["Two year", "month-to-month"],
        "payment_method": ["Credit card", "Bank transfer (automatic)"],
        "internet_service": ["Fiber optic", "No"],
        "support_tickets": [2, 0],
        "login_frequency": [5.2, 3],
    }
    return base | changes


def test_good_columns_come_back_canonical():
    check = check_columns(DEFAULT, columns())
    assert check.ok and check.rows == 2
    assert list(check.columns["contract_type"]) == ["two_year", "month-to-month"]
    assert list(check.columns["payment_method"]) == ["credit_card", "bank_transfer"]
    assert list(check.columns["internet_service"]) == ["fiber_optic", "none"]
    assert check.columns["customer_tenure"].dtype == np.float64


@pytest.mark.parametrize(
    ("column", "values", "reason"),
    [
        ("customer_tenure", [True, 12], "must be a whole number, not bool"),
        ("customer_tenure", ["24", 12], "must be a whole number, not str"),
        ("customer_tenure", [24.5, 12], "must be a whole number"),
        ("customer_tenure", [-1, 12], "must be ≥ 0"),
        ("customer_tenure", [601, 12], "must be ≤ 600"),
        ("monthly_charges", [float("nan"), 1.0], "missing value"),
        ("monthly_charges", [None, 1.0], "missing value"),
        ("monthly_charges", [float("inf"), 1.0], "must be a finite number"),
        ("login_frequency", [False, 1.0], "must be a number, not bool"),
        ("contract_type", ["forever", "one_year"], "unknown category 'forever'"),
        ("contract_type", [2, "one_year"], "unknown category 2"),
        ("contract_type", [None, "one_year"], "missing value"),
    ],
)
def test_each_bad_value_is_its_row_with_a_reason(column, values, reason):
    check = check_columns(DEFAULT, columns(**{column: values}))
    assert [(e.row, e.column) for e in check.errors] == [(0, column)]
    assert reason in check.errors[0].reason, check.errors
    assert list(check.bad_rows) == [0]


def test_numeric_arrays_and_json_values_give_the_same_answers():
    values = [3, 2.0, -1, 700, float("nan"), 5.5]
    as_list = check_columns(DEFAULT, columns(**_six(customer_tenure=values)))
    as_array = check_columns(
        DEFAULT, columns(**_six(customer_tenure=np.array(values, dtype=np.float64)))
    )
    assert as_list.errors == as_array.errors
    assert [e.row for e in as_list.errors] == [2, 3, 4, 5]
    np.testing.assert_array_equal(as_list.columns["customer_tenure"][:2], [3.0, 2.0])


def _six(**changes):
    return {name: list(values) * 3 for name, values in columns().items()} | changes


def test_missing_and_unknown_columns_fail_every_row():
    given = columns()
    del given["support_tickets"]
    given["colour"] = ["red", "blue"]
    check = check_columns(DEFAULT, given)
    assert RowError(0, "support_tickets", "missing column") in check.errors
    assert RowError(1, "colour", "unknown column") in check.errors
    assert list(check.bad_rows) == [0, 1]


def test_a_contract_may_fill_missing_values_and_take_booleans():
    contract = contract_from_dict(
        {
            "format": 1,
            "features": [
                {"name": "tenure", "kind": "integer", "min": 0, "missing": "median"},
                {"name": "senior_citizen", "kind": "boolean"},
                {
                    "name": "tech_support",
                    "kind": "category",
                    "categories": ["yes", "no"],
                    "missing": "most_frequent",
                },
            ],
        }
    )
    given = {"tenure": [None, 3], "senior_citizen": [True, "Yes"], "tech_support": [None, "No"]}
    strict = check_columns(contract, given)
    assert [(e.row, e.column) for e in strict.errors] == [(1, "senior_citizen")]
    assert np.isnan(strict.columns["tenure"][0])
    imported = check_columns(contract, given, text_booleans=True)
    assert imported.ok and list(imported.columns["senior_citizen"]) == [True, True]
    assert list(imported.columns["tech_support"]) == [None, "no"]


@pytest.mark.parametrize("length", [1, 3, 16, 17, 40])
def test_short_and_long_json_columns_agree_with_arrays(length):
    """A request's few JSON numbers are checked in Python, longer columns as arrays: both
    give what the array path gives, value for value, on edge values of every bound."""
    rng = np.random.default_rng(length)
    edges = [
        0,
        600,
        600.0,
        -0.0,
        1e-9,
        -1e-9,
        600.5,
        12.0,
        12.5,
        2**53,
        float("nan"),
        float("inf"),
        -float("inf"),
        1e308,
    ]
    for feature in ("customer_tenure", "monthly_charges", "support_tickets", "login_frequency"):
        for _ in range(30):
            values = [edges[i] for i in rng.integers(0, len(edges), length)]
            rows = {name: [column[0]] * length for name, column in columns().items()}
            as_list = check_columns(DEFAULT, rows | {feature: values})
            as_array = check_columns(DEFAULT, rows | {feature: np.array(values, dtype=np.float64)})
            assert as_list.errors == as_array.errors, (feature, values)
            np.testing.assert_array_equal(
                as_list.columns[feature], as_array.columns[feature], err_msg=str(values)
            )
