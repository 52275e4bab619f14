"""Planning an import: a telco-layout export, mapped to the contract, validated row by row."""

from pathlib import Path

import pandas as pd
import pytest

from churn_assets.config import DEFAULT_CONTRACT
from churn_assets.contract import load_contract
from churn_assets.importer import ImportError_, ImportMapping, plan_import, read_export
from churn_assets.schemas import (
    CustomerEvent,
    FeedbackEvent,
    Topics,
    decode_message,
    encode_message,
)

pytestmark = pytest.mark.unit

CONTRACT = load_contract(DEFAULT_CONTRACT)
HEADER = (
    "customerID,tenure,MonthlyCharges,TotalCharges,Contract,PaymentMethod,InternetService,"
    "Tickets,Logins,Churn\n"
)
ROWS = [
    "7590-VHVEG,1,29.85,29.85,Month-to-month,Electronic check,DSL,0,12,No",
    "5575-GNVDE,34,56.95,1889.5,One year,Mailed check,DSL,1,4.5,No",
    "3668-QPYBK,2,53.85,108.15,Month-to-month,Mailed check,DSL,2,3,Yes",
    "7795-CFOCW,45,42.30,1840.75,One year,Bank transfer (automatic),DSL,0,8,No",
    "9237-HQITU,2,70.70,151.65,Two year,Credit card (automatic),Fiber optic,3,1,Yes",
    # malformed: tenure text, an unknown contract, a blank charge, a label that is neither
    "9305-CDSKC,eight,99.65,820.5,Month-to-month,Electronic check,Fiber optic,0,2,Yes",
    "1452-KIOVK,22,89.10,1949.4,Three year,Credit card (automatic),No,0,2,No",
    "6713-OKOMC,10,,301.9,Month-to-month,Mailed check,DSL,0,2,No",
    "7892-POOKP,28,104.80,3046.05,Month-to-month,Electronic check,Fiber optic,1,2,Maybe",
]
MAPPING = {
    "customer_id": "customerID",
    "as_of": "2026-06-30",
    "label": "Churn",
    "positive": "Yes",
    "features": {
        "customer_tenure": "tenure",
        "monthly_charges": "MonthlyCharges",
        "total_charges": "TotalCharges",
        "contract_type": "Contract",
        "payment_method": "PaymentMethod",
        "internet_service": "InternetService",
        "support_tickets": "Tickets",
        "login_frequency": "Logins",
    },
}


@pytest.fixture
def export(tmp_path) -> Path:
    path = tmp_path / "telco.csv"
    path.write_text(HEADER + "\n".join(ROWS) + "\n")
    return path


@pytest.fixture
def mapping(tmp_path) -> ImportMapping:
    import yaml

    path = tmp_path / "mapping.yaml"
    path.write_text(yaml.safe_dump(MAPPING))
    return ImportMapping.from_yaml(path)


def test_valid_rows_become_canonical_events_and_outcomes(export, mapping):
    plan = plan_import(read_export(export), mapping, CONTRACT)
    assert plan.rows == 9 and len(plan.events) == 5 and len(plan.outcomes) == 5
    first = decode_message(Topics.CUSTOMERS, encode_message(Topics.CUSTOMERS, plan.events[4]))
    assert isinstance(first, CustomerEvent)
    assert (first.contract_type, first.payment_method, first.internet_service) == (
        "two_year",
        "credit_card",
        "fiber_optic",
    )
    assert first.event_time.isoformat() == "2026-06-30T00:00:00+00:00"
    outcome = decode_message(Topics.FEEDBACK, encode_message(Topics.FEEDBACK, plan.outcomes[2]))
    assert isinstance(outcome, FeedbackEvent) and outcome.churned is True
    assert [o["churned"] for o in plan.outcomes] == [False, False, True, False, True]
    # Within the 14-day horizon when churned; past it when retained.
    assert outcome.outcome_time.isoformat() == "2026-07-01T00:00:00+00:00"
    assert plan.outcomes[0]["outcome_time"] == "2026-07-15T00:00:00+00:00"
    longer = plan_import(read_export(export), mapping, CONTRACT, horizon_days=30)
    assert longer.outcomes[0]["outcome_time"] == "2026-07-31T00:00:00+00:00"
    assert longer.outcomes[2]["outcome_time"] == "2026-07-01T00:00:00+00:00"


def test_malformed_rows_are_rejected_with_row_column_and_reason(export, mapping, tmp_path):
    plan = plan_import(read_export(export), mapping, CONTRACT)
    assert [(e.row + 1, e.column) for e in plan.rejects] == [
        (6, "tenure"),
        (7, "Contract"),
        (8, "MonthlyCharges"),
        (9, "Churn"),
    ]
    rejects = tmp_path / "rejects.csv"
    plan.write_rejects(rejects)
    table = pd.read_csv(rejects)
    assert list(table.columns) == ["row", "column", "reason"]
    assert "unknown category 'Three year'" in table.loc[1, "reason"]
    assert "neither 'Yes' (churned) nor 'No'" in table.loc[3, "reason"]


def test_the_same_file_gives_the_same_ids_and_a_changed_row_a_new_one(export, mapping):
    once = plan_import(read_export(export), mapping, CONTRACT)
    again = plan_import(read_export(export), mapping, CONTRACT)
    assert [e["event_id"] for e in once.events] == [e["event_id"] for e in again.events]
    export.write_text(export.read_text().replace("29.85,29.85", "30.85,29.85"))
    changed = plan_import(read_export(export), mapping, CONTRACT)
    assert changed.events[0]["event_id"] != once.events[0]["event_id"]
    assert [e["event_id"] for e in changed.events[1:]] == [e["event_id"] for e in once.events[1:]]


def test_a_mapping_that_does_not_fit_is_a_clear_error(export, mapping):
    frame = read_export(export)
    broken = ImportMapping(
        customer_id="id", features={**mapping.features, "colour": "Colour"}, as_of=mapping.as_of
    )
    with pytest.raises(ImportError_, match="the export has no customer id column 'id'"):
        plan_import(frame, broken, CONTRACT)
    partial = ImportMapping(
        customer_id="customerID",
        features={k: v for k, v in mapping.features.items() if k != "support_tickets"},
        as_of=mapping.as_of,
    )
    with pytest.raises(
        ImportError_, match=r"no column is mapped to the features \['support_tickets'\]"
    ):
        plan_import(frame, partial, CONTRACT)
    timeless = ImportMapping(customer_id="customerID", features=mapping.features)
    with pytest.raises(ImportError_, match="either an observation time column or one as_of"):
        plan_import(frame, timeless, CONTRACT)
    with pytest.raises(ImportError_, match="unknown file type '.xlsx'"):
        read_export(export.with_suffix(".xlsx"))
