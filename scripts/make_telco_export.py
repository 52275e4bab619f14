"""Write a customer export in the common telco layout, for trying `churn import`.

    .venv/bin/python scripts/make_telco_export.py telco.csv [--rows 5000] [--bad 30] [--seed 7]

The rows are the simulator's customers (churn labels drawn from its true model over 30 days),
spelled the way CRM and billing exports spell them: ``customerID``, ``tenure``,
``MonthlyCharges``, ``Contract`` = "One year", ``PaymentMethod`` = "Bank transfer (automatic)",
``InternetService`` = "No", ``Churn`` = "Yes"/"No", plus two columns the default contract does
not use (``SeniorCitizen``, ``TechSupport``). ``--bad`` rows are damaged on purpose (text in a
number, an unknown contract, a blank charge, an unknown label), so the rejects file has
something to show. Senior citizens and customers without tech support churn more, so the two
extra columns carry signal.

Beside the file it writes the mapping for the default contract (``<name>.mapping.yaml``), and a
ten-feature contract (``<name>.features.yaml``: the default contract plus a boolean
``senior_citizen`` and a category ``tech_support``) with its mapping
(``<name>.extended.mapping.yaml``), for trying your own columns. No third-party data set is
shipped or downloaded.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from churn_assets.config import DEFAULT_CONTRACT  # noqa: E402
from churn_assets.simulator import sample_customers  # noqa: E402

EXTRA_FEATURES = [
    {"name": "senior_citizen", "kind": "boolean", "description": "65 or older"},
    {
        "name": "tech_support",
        "kind": "category",
        "description": "tech support subscription",
        "categories": {"yes": [], "no": [], "no_internet": ["No internet service"]},
    },
]
EXTRA_COLUMNS = {"senior_citizen": "SeniorCitizen", "tech_support": "TechSupport"}

SPELLINGS = {
    "contract_type": {
        "month-to-month": "Month-to-month",
        "one_year": "One year",
        "two_year": "Two year",
    },
    "payment_method": {
        "electronic_check": "Electronic check",
        "mailed_check": "Mailed check",
        "bank_transfer": "Bank transfer (automatic)",
        "credit_card": "Credit card (automatic)",
    },
    "internet_service": {"dsl": "DSL", "fiber_optic": "Fiber optic", "none": "No"},
}
COLUMNS = {
    "customer_tenure": "tenure",
    "monthly_charges": "MonthlyCharges",
    "total_charges": "TotalCharges",
    "contract_type": "Contract",
    "payment_method": "PaymentMethod",
    "internet_service": "InternetService",
    "support_tickets": "SupportTickets",
    "login_frequency": "LoginsLast30Days",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the CSV to write")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--bad", type=int, default=30, help="rows damaged on purpose")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    frame = sample_customers(args.rows, seed=args.seed, horizon_days=30)
    rng = np.random.default_rng(args.seed)
    export = frame.rename(columns=COLUMNS)[["customer_id", *COLUMNS.values()]].astype(object)
    export.insert(
        0, "customerID", [f"{rng.integers(1000, 9999)}-{c[-5:]}" for c in frame.customer_id]
    )
    export = export.drop(columns="customer_id")
    for feature, spelled in SPELLINGS.items():
        export[COLUMNS[feature]] = frame[feature].map(spelled)
    senior = rng.random(args.rows) < 0.16
    tech_support = rng.choice(["Yes", "No", "No internet service"], size=args.rows)
    churned = (
        (frame["label"].to_numpy() == 1)
        | (senior & (rng.random(args.rows) < 0.25))
        | ((tech_support == "No") & (rng.random(args.rows) < 0.12))
    )
    export["SeniorCitizen"] = senior.astype(int)
    export["TechSupport"] = tech_support
    export["Churn"] = np.where(churned, "Yes", "No")
    damages = [
        ("tenure", "eight"),
        ("Contract", "Three year"),
        ("MonthlyCharges", ""),
        ("Churn", "Maybe"),
    ]
    for n, row in enumerate(rng.choice(args.rows, size=min(args.bad, args.rows), replace=False)):
        column, value = damages[n % len(damages)]
        export.loc[row, column] = value
    export.to_csv(args.path, index=False)
    mapping = {
        "customer_id": "customerID",
        "as_of": "2026-06-30",
        "label": "Churn",
        "positive": "Yes",
        "negative": "No",
        "features": COLUMNS,
    }
    mapping_path = args.path.with_suffix(".mapping.yaml")
    mapping_path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    contract = yaml.safe_load(DEFAULT_CONTRACT.read_text())
    contract["features"] += EXTRA_FEATURES
    contract_path = args.path.with_suffix(".features.yaml")
    contract_path.write_text(yaml.safe_dump(contract, sort_keys=False))
    extended = {**mapping, "features": {**COLUMNS, **EXTRA_COLUMNS}}
    extended_path = args.path.with_suffix(".extended.mapping.yaml")
    extended_path.write_text(yaml.safe_dump(extended, sort_keys=False))
    print(
        f"wrote {args.path} ({args.rows} rows, {args.bad} damaged), {mapping_path}, "
        f"{contract_path} (ten features) and {extended_path}"
    )


if __name__ == "__main__":
    main()
