"""The prediction form's fields, defaults and validation, from a feature contract (no Panel)."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from pydantic import ValidationError

from churn_assets.contract import Contract, Feature
from churn_assets.schemas import features_schema

__all__ = [
    "FormCheck",
    "FormField",
    "default_features",
    "feature_label",
    "form_fields",
    "validate_features",
]


@dataclass(frozen=True)
class FormField:
    """One input of the prediction form: ``kind`` chooses the widget (integer and number:
    a number box within ``start``/``end``; category: a choice of ``options``; boolean: a
    checkbox). ``required`` is false where the contract fills a missing value."""

    name: str
    kind: str
    label: str
    default: Any
    options: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    required: bool = True


def feature_label(feature: Feature) -> str:
    """The form's label of a feature: its description (capitalised), else its name."""
    text = feature.description or feature.name.replace("_", " ")
    return text[:1].upper() + text[1:]


def form_fields(contract: Contract, reference: pd.DataFrame | None = None) -> list[FormField]:
    """One field per feature of ``contract``, in its order. Defaults: a number's median in
    ``reference`` (the model's training reference) when it has the column, else its minimum
    (or 0), within its bounds; a category's first value; false."""
    fields = []
    for feature in contract.features:
        default: Any
        if feature.kind in ("integer", "number"):
            default = _number_default(feature, reference)
        elif feature.kind == "category":
            default = next(iter(feature.categories))
        else:
            default = False
        fields.append(
            FormField(
                name=feature.name,
                kind=feature.kind,
                label=feature_label(feature),
                default=default,
                options=tuple(feature.categories),
                start=feature.minimum,
                end=feature.maximum,
                required=feature.missing == "reject",
            )
        )
    return fields


def _number_default(feature: Feature, reference: pd.DataFrame | None) -> int | float:
    value = 0.0
    if feature.minimum is not None:
        value = feature.minimum
    if reference is not None and feature.name in reference.columns:
        column = pd.to_numeric(reference[feature.name], errors="coerce").dropna()
        if not column.empty:
            value = float(column.median())
    if feature.minimum is not None:
        value = max(value, feature.minimum)
    if feature.maximum is not None:
        value = min(value, feature.maximum)
    if feature.kind == "integer":
        return int(round(value))
    return round(float(value), 2)


def default_features(contract: Contract, reference: pd.DataFrame | None = None) -> dict[str, Any]:
    """The form's starting values (:func:`form_fields`' defaults), by feature name."""
    return {field.name: field.default for field in form_fields(contract, reference)}


@dataclass(frozen=True)
class FormCheck:
    """The form's values validated with the platform's own feature schema."""

    features: dict[str, Any] | None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.features is not None


def validate_features(raw: Mapping[str, Any], contract: Contract) -> FormCheck:
    """Validate form values with ``contract``'s feature schema (the ranges and categories
    serving enforces); errors are keyed by feature and phrased for the form."""
    errors: dict[str, str] = {}
    for feature in contract.features:
        if feature.missing == "reject" and (raw.get(feature.name) in (None, "")):
            errors[feature.name] = "required"
    if not errors:
        values = {name: (None if raw.get(name) == "" else raw.get(name)) for name in contract.names}
        try:
            model = features_schema(contract).model_validate(values)
        except ValidationError as exc:
            for error in exc.errors():
                name = str(error["loc"][0]) if error["loc"] else "form"
                errors.setdefault(name, error["msg"])
        else:
            return FormCheck(model.model_dump())
    return FormCheck(None, errors)
