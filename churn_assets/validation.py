"""Validation compiled from the feature contract, by column.

:func:`check_columns` takes whole columns (lists from JSON, NumPy arrays, pandas columns) and
returns the canonical columns with, for every bad row, its reason: one pass per column, no row
objects. Numeric columns of a numeric dtype are checked with vector operations; columns of
Python objects (JSON) element by element, strictly: a bool or a string is never a number, a
count takes ``12`` or ``12.0`` but not ``12.5``, NaN and infinities are refused, categories are
stored under their canonical name.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from churn_assets.contract import Contract, Feature

__all__ = ["CheckedColumn", "ColumnCheck", "InputColumn", "RowError", "check_columns"]

# A column as it arrives: JSON values, or an array of any dtype (pandas/Arrow columns are
# turned into arrays with ``to_numpy``).
InputColumn = Sequence[Any] | npt.NDArray[Any]
# A checked column: float64 for numbers, an object array for categories and booleans.
CheckedColumn = npt.NDArray[np.float64] | npt.NDArray[np.object_]


@dataclass(frozen=True)
class RowError:
    row: int
    column: str
    reason: str


@dataclass
class ColumnCheck:
    """Canonical columns (numbers as float64 with NaN for a missing value the contract fills,
    categories and booleans as object arrays with ``None``) and the rows that failed."""

    rows: int
    columns: dict[str, CheckedColumn] = field(default_factory=dict)
    errors: list[RowError] = field(default_factory=list)

    @property
    def bad_rows(self) -> npt.NDArray[np.int64]:
        """Sorted indices of rows with at least one error."""
        return np.unique(np.array([e.row for e in self.errors], dtype=np.int64))

    @property
    def ok(self) -> bool:
        return not self.errors

    def values(self, feature: Feature) -> list[Any]:
        """``feature``'s checked column as the plain values a record or a table holds: ``int``
        for an integer, ``float`` for a number, ``None`` for a missing value."""
        column = self.columns[feature.name]
        if feature.kind == "integer":
            return [None if math.isnan(v) else int(v) for v in column.tolist()]
        if feature.kind == "number":
            return [None if math.isnan(v) else v for v in column.tolist()]
        labels: list[Any] = column.tolist()
        return labels


def check_columns(
    contract: Contract,
    columns: Mapping[str, InputColumn],
    *,
    text_booleans: bool = False,
) -> ColumnCheck:
    """Check ``columns`` against ``contract``; unknown and missing columns are errors of every
    row. ``text_booleans`` also takes ``"yes"``/``"no"``-style text for booleans (imports of
    exported files), never at the serving edge."""
    lengths = {name: len(values) for name, values in columns.items()}
    rows = max(lengths.values(), default=0)
    check = ColumnCheck(rows=rows)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    for name in columns:
        if name not in contract.names:
            check.errors += [RowError(r, name, "unknown column") for r in range(rows)]
    for feature in contract.features:
        values = columns.get(feature.name)
        if values is None:
            check.errors += [RowError(r, feature.name, "missing column") for r in range(rows)]
            continue
        column, errors = _check(feature, values, text_booleans)
        check.columns[feature.name] = column
        check.errors += errors
    check.errors.sort(key=lambda e: e.row)
    return check


def _check(
    feature: Feature, values: InputColumn, text_booleans: bool
) -> tuple[CheckedColumn, list[RowError]]:
    if feature.kind in ("integer", "number"):
        # Only an array already of a numeric dtype takes the vector path: a Python list goes
        # element by element (NumPy would turn [True, 12] into integers).
        if hasattr(values, "to_numpy"):  # pandas and Arrow columns
            values = values.to_numpy()
        if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
            return _numeric_array(feature, values)
        return _numeric_objects(feature, values)
    return _labels(feature, values, text_booleans)


def _numeric_array(
    feature: Feature, array: npt.NDArray[Any]
) -> tuple[npt.NDArray[np.float64], list[RowError]]:
    """A column of a numeric dtype: vector checks only."""
    numbers = array.astype(np.float64, copy=False)
    if numbers.size and np.isfinite(numbers).all():  # the common case, in a few array calls
        low, high = numbers.min(), numbers.max()
        if (
            (feature.minimum is None or low >= feature.minimum)
            and (feature.maximum is None or high <= feature.maximum)
            and (feature.kind != "integer" or (numbers == np.floor(numbers)).all())
        ):
            return numbers, []
    reasons = np.full(numbers.shape, None, dtype=object)
    missing = np.isnan(numbers)
    if feature.missing == "reject":
        reasons[missing] = "missing value"
    reasons[np.isinf(numbers)] = "must be a finite number"
    present = ~missing & np.isfinite(numbers)
    if feature.kind == "integer":
        reasons[present & (numbers != np.floor(numbers))] = "must be a whole number"
    if feature.minimum is not None:
        reasons[present & (numbers < feature.minimum)] = f"must be ≥ {feature.minimum:g}"
    if feature.maximum is not None:
        reasons[present & (numbers > feature.maximum)] = f"must be ≤ {feature.maximum:g}"
    bad = np.flatnonzero(reasons != None)  # noqa: E711 - element-wise comparison
    return numbers, [RowError(int(r), feature.name, reasons[r]) for r in bad]


# Up to this many plain numbers (a request's) are checked in Python: a handful of array calls
# on a tiny array cost more than the checks. Any failure goes to the array path for its reasons.
_FEW = 16


def _all_valid(feature: Feature, numbers: list[float]) -> bool:
    """Whether every one of ``numbers`` passes :func:`_numeric_array`'s checks."""
    low = -math.inf if feature.minimum is None else feature.minimum
    high = math.inf if feature.maximum is None else feature.maximum
    whole = feature.kind == "integer"
    for number in numbers:  # NaN fails the comparison, infinities math.isfinite
        if not (low <= number <= high and math.isfinite(number)):
            return False
        if whole and not number.is_integer():
            return False
    return True


def _numeric_objects(
    feature: Feature, values: InputColumn
) -> tuple[npt.NDArray[np.float64], list[RowError]]:
    """JSON values one by one: strict types, then the same checks as a numeric array."""
    if set(map(type, values)) <= {int, float}:  # all plain numbers (no bool, None or text)
        if len(values) <= _FEW:
            few = [float(v) for v in values]
            if _all_valid(feature, few):
                return np.array(few, dtype=np.float64), []
        return _numeric_array(feature, np.array(values, dtype=np.float64))
    numbers = np.empty(len(values), dtype=np.float64)
    errors: list[RowError] = []
    for row, value in enumerate(values):
        if value is None:
            numbers[row] = math.nan
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "a whole number" if feature.kind == "integer" else "a number"
            errors.append(
                RowError(row, feature.name, f"must be {kind}, not {type(value).__name__}")
            )
            numbers[row] = 0.0  # a placeholder the error already covers
            continue
        numbers[row] = value
    checked, more = _numeric_array(feature, numbers)
    seen = {e.row for e in errors}
    return checked, errors + [e for e in more if e.row not in seen]


def _labels(
    feature: Feature, values: InputColumn, text_booleans: bool
) -> tuple[npt.NDArray[np.object_], list[RowError]]:
    """Categories and booleans, element by element (a spelling is a dictionary look-up)."""
    column = np.empty(len(values), dtype=object)
    errors: list[RowError] = []
    for row, value in enumerate(values):
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or (isinstance(value, float) and math.isnan(value)):
            column[row] = None
            if feature.missing == "reject":
                errors.append(RowError(row, feature.name, "missing value"))
            continue
        if feature.kind == "boolean":
            if isinstance(value, bool):
                column[row] = value
            elif text_booleans and isinstance(value, str) and feature.canonical(value):
                column[row] = feature.canonical(value) == "true"
            else:
                errors.append(RowError(row, feature.name, f"must be true or false, not {value!r}"))
            continue
        canonical = feature.canonical(value) if isinstance(value, str) else None
        if canonical is None:
            allowed = ", ".join(feature.categories)
            shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:59]}…"
            errors.append(RowError(row, feature.name, f"unknown category {shown} ({allowed})"))
        column[row] = canonical
    return column, errors
