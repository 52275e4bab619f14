"""Point-in-time customer features and the one feature transformer shared by training and serving.

:func:`customer_features_as_of` turns landed customer events into one row per customer as of a
time ``t`` using only events at or before ``t``. :class:`FeatureTransformer` turns the contract's
features (plus the derived features it declares) into the model's numeric matrix; it is fitted on
training data, stored with each model version as JSON (never pickle) and applied unchanged by
serving. Nothing here names a feature: the contract (``config/features.yaml``) does.

Missing-value policy: a missing or NaN number or boolean is replaced by its training median (for
a boolean, the more frequent value); a missing category by its most frequent training value when
the contract says ``most_frequent``. Unknown-category policy: a category not seen in the contract
encodes as all-zero one-hot columns (the "other" bucket); input validation rejects unknown
categories before they get here.
"""

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from churn_assets.contract import Contract, Derived, evaluate_derived
from churn_assets.schemas import DEFAULT_CONTRACT

__all__ = [
    "FeatureTransformer",
    "TransformerError",
    "customer_features_as_of",
    "derive_features",
    "history_features",
]

TRANSFORMER_FORMAT = 2


class TransformerError(ValueError):
    """The transformer cannot be built from the stored data, or the input lacks columns."""


def history_features(contract: Contract = DEFAULT_CONTRACT) -> tuple[str, ...]:
    """The history columns :func:`customer_features_as_of` adds for ``contract``."""
    return ("events_30d", *contract.trends, "days_since_last_event")


def derive_features(frame: pd.DataFrame, contract: Contract = DEFAULT_CONTRACT) -> pd.DataFrame:
    """The contract's derived model features, computed from each record's own values only."""
    columns = {
        name: _float_column(frame[name])
        for name in (*contract.numeric_names, *contract.boolean_names)
    }
    out = _derive(contract.derived, columns)
    return pd.DataFrame({d.name: out[d.name] for d in contract.derived}, index=frame.index)


def _derive(
    derived: Iterable[Derived], columns: dict[str, npt.NDArray[np.float64]]
) -> dict[str, npt.NDArray[np.float64]]:
    for item in derived:
        columns[item.name] = evaluate_derived(item, columns)
    return columns


def _float_column(series: pd.Series) -> npt.NDArray[np.float64]:
    """A number or boolean column as floats, missing values as NaN."""
    if series.dtype == object:
        return np.array([_as_float(v) for v in series], dtype=np.float64)
    numbers: npt.NDArray[np.float64] = pd.to_numeric(series, errors="raise").to_numpy(
        dtype=float, na_value=np.nan
    )
    return numbers


def customer_features_as_of(
    events: pd.DataFrame,
    as_of: datetime,
    history_days: int = 30,
    contract: Contract = DEFAULT_CONTRACT,
) -> pd.DataFrame:
    """One row per customer: its latest state at or before ``as_of`` plus history features.

    ``events`` has ``customer_id``, ``event_time`` and the contract's features. Only rows with
    ``event_time <= as_of`` are read, so the result is point-in-time correct by construction.
    History features: events in the last ``history_days``, each declared trend (latest value
    minus the window mean) and days since the last event.
    """
    as_of_ts = pd.Timestamp(as_of)
    past = events.loc[events["event_time"] <= as_of_ts]
    history = history_features(contract)
    if past.empty:
        return pd.DataFrame(columns=["customer_id", *contract.names, *history, "last_event_time"])
    ordered = past.sort_values(["customer_id", "event_time"], kind="stable")
    latest = ordered.groupby("customer_id", sort=True).tail(1).set_index("customer_id")
    window = ordered.loc[ordered["event_time"] > as_of_ts - timedelta(days=history_days)]
    stats = window.groupby("customer_id").agg(
        events_30d=("event_time", "size"),
        **{f"{trend}__mean": (source, "mean") for trend, source in contract.trends.items()},
    )
    out = latest[list(contract.names)].copy()
    out["events_30d"] = stats["events_30d"].reindex(out.index).fillna(0).astype(int)
    for trend, source in contract.trends.items():
        mean = stats[f"{trend}__mean"].reindex(out.index)
        out[trend] = (out[source].astype(float) - mean).fillna(0.0)
    out["days_since_last_event"] = (as_of_ts - latest["event_time"]).dt.total_seconds() / 86_400
    out["last_event_time"] = latest["event_time"]
    return out.reset_index()


@dataclass(frozen=True)
class _Plan:
    """A transformer's parameters as arrays, built once per transformer."""

    derived: tuple[Derived, ...]
    medians: npt.NDArray[np.float64]
    means: npt.NDArray[np.float64]
    scales: npt.NDArray[np.float64]
    categories: tuple[tuple[str, npt.NDArray[np.object_], str | None], ...]
    width: int


@dataclass(frozen=True)
class FeatureTransformer:
    """Encoding, imputation and scaling of the model inputs, stored as plain data.

    ``numeric`` lists the scaled columns: the contract's numbers and booleans, then its derived
    features (``derived``: name -> expression). ``categories`` one-hot encodes each category
    feature; ``category_fill`` names the value a missing category takes (``most_frequent``).
    """

    numeric: tuple[str, ...]
    medians: Mapping[str, float]
    means: Mapping[str, float]
    scales: Mapping[str, float]
    categories: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: DEFAULT_CONTRACT.category_values
    )
    derived: Mapping[str, str] = field(
        default_factory=lambda: {d.name: d.expression for d in DEFAULT_CONTRACT.derived}
    )
    category_fill: Mapping[str, str] = field(default_factory=dict)
    format_version: int = TRANSFORMER_FORMAT

    @classmethod
    def fit(
        cls, frame: pd.DataFrame, contract: Contract = DEFAULT_CONTRACT
    ) -> "FeatureTransformer":
        """Learn medians, means and scales from training rows holding ``contract``'s features."""
        _require_columns(frame, contract.names)
        numeric_frame = pd.concat(
            [
                pd.DataFrame(
                    {
                        name: _float_column(frame[name])
                        for name in (*contract.numeric_names, *contract.boolean_names)
                    },
                    index=frame.index,
                ),
                derive_features(frame, contract),
            ],
            axis=1,
        )
        medians = numeric_frame.median()
        if medians.isna().any():
            empty = ", ".join(medians.index[medians.isna()])
            raise TransformerError(f"no training values at all for {empty}")
        filled = numeric_frame.fillna(medians)
        stds = filled.std(ddof=0).replace(0.0, 1.0)
        fill = {}
        for feature in contract.of_kind("category"):
            if feature.missing == "most_frequent":
                counts = frame[feature.name].dropna().value_counts()
                if counts.empty:
                    raise TransformerError(f"no training values at all for {feature.name}")
                fill[feature.name] = str(counts.index[0])
        return cls(
            numeric=tuple(numeric_frame.columns),
            medians={k: float(v) for k, v in medians.items()},
            means={k: float(v) for k, v in filled.mean().items()},
            scales={k: float(v) for k, v in stds.items()},
            categories=contract.category_values,
            derived={d.name: d.expression for d in contract.derived},
            category_fill=fill,
        )

    @property
    def inputs(self) -> tuple[str, ...]:
        """The raw input columns the transform reads."""
        return (*(n for n in self.numeric if n not in self.derived), *self.categories)

    @property
    def feature_names_out(self) -> list[str]:
        names = list(self.numeric)
        for column, values in self.categories.items():
            names += [f"{column}={value}" for value in values]
        return names

    def source_features(self) -> list[str]:
        """For each output column, the model input it comes from (one-hot groups collapse)."""
        return [name.split("=", 1)[0] for name in self.feature_names_out]

    def transform(self, frame: pd.DataFrame) -> npt.NDArray[np.float32]:
        """The model matrix (float32, ``len(feature_names_out)`` columns) for ``frame``'s rows."""
        _require_columns(frame, self.inputs)
        numeric = {
            name: _float_column(frame[name]) for name in self.numeric if name not in self.derived
        }
        categorical = {name: frame[name].astype(object).to_numpy() for name in self.categories}
        return self._matrix(numeric, categorical, len(frame))

    def transform_records(self, records: Iterable[Mapping[str, Any]]) -> npt.NDArray[np.float32]:
        """Serving's entry point: the same transform for a list of feature dicts, without pandas
        (a DataFrame costs milliseconds per request)."""
        rows = list(records)
        numeric = {
            name: np.array([_as_float(row.get(name)) for row in rows], dtype=float)
            for name in self.numeric
            if name not in self.derived
        }
        categorical = {
            name: np.array([row.get(name) for row in rows], dtype=object)
            for name in self.categories
        }
        return self._matrix(numeric, categorical, len(rows))

    def transform_columns(
        self, columns: Mapping[str, Sequence[Any]], rows: int
    ) -> npt.NDArray[np.float32]:
        """The same transform for validated columns (canonical values, ``None`` when missing),
        as serving's V2 inputs and landed batches arrive: no per-record dicts."""
        numeric = {
            name: np.array(columns[name], dtype=float)  # None becomes NaN
            for name in self.numeric
            if name not in self.derived
        }
        categorical = {name: np.array(columns[name], dtype=object) for name in self.categories}
        return self._matrix(numeric, categorical, rows)

    @functools.cached_property
    def _plan(self) -> "_Plan":
        return _Plan(
            derived=tuple(Derived(name, expression) for name, expression in self.derived.items()),
            medians=np.array([self.medians[name] for name in self.numeric], dtype=np.float64),
            means=np.array([self.means[name] for name in self.numeric], dtype=np.float64),
            scales=np.array([self.scales[name] for name in self.numeric], dtype=np.float64),
            categories=tuple(
                (name, np.array(values, dtype=object), self.category_fill.get(name))
                for name, values in self.categories.items()
            ),
            width=len(self.feature_names_out),
        )

    def _matrix(
        self,
        numeric: dict[str, npt.NDArray[np.float64]],
        categorical: dict[str, npt.NDArray[np.object_]],
        rows: int,
    ) -> npt.NDArray[np.float32]:
        plan = self._plan
        columns = _derive(plan.derived, numeric)
        out = np.empty((rows, plan.width), dtype=np.float64)
        block = out[:, : len(self.numeric)]
        for i, name in enumerate(self.numeric):
            block[:, i] = columns[name]
        np.copyto(block, plan.medians, where=np.isnan(block))
        block -= plan.means
        block /= plan.scales
        position = len(self.numeric)
        for name, values, fill in plan.categories:
            column = categorical[name]
            if fill is not None:
                column = np.where(pd.isna(column), fill, column)
            out[:, position : position + len(values)] = column[:, None] == values[None, :]
            position += len(values)
        return out.astype(np.float32)

    def to_json(self) -> str:
        data = {
            "format_version": self.format_version,
            "numeric": list(self.numeric),
            "medians": dict(self.medians),
            "means": dict(self.means),
            "scales": dict(self.scales),
            # A list of pairs: the one-hot column order is the categories' order.
            "categories": [[k, list(v)] for k, v in self.categories.items()],
            "derived": [[k, v] for k, v in self.derived.items()],
            "category_fill": dict(self.category_fill),
        }
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "FeatureTransformer":
        try:
            data = json.loads(text)
            version = data.get("format_version")
            if version not in (1, TRANSFORMER_FORMAT):
                raise TransformerError(
                    f"transformer format {version!r} is not supported "
                    f"(expected 1 or {TRANSFORMER_FORMAT})"
                )
            if version == 1:
                # Before the contract: the default contract's derived features, and its
                # category order (the one-hot column order then; the file's keys are sorted).
                stored = data["categories"]
                categories = {k: tuple(stored[k]) for k in DEFAULT_CONTRACT.category_values}
                derived = {d.name: d.expression for d in DEFAULT_CONTRACT.derived}
                fill: dict[str, str] = {}
            else:
                categories = {k: tuple(v) for k, v in data["categories"]}
                derived = {k: v for k, v in data["derived"]}
                fill = {k: str(v) for k, v in data["category_fill"].items()}
            numeric = tuple(data["numeric"])
            missing = [name for name in derived if name not in numeric]
            if missing:
                raise TransformerError(f"derived features {missing} are not among the columns")
            return cls(
                numeric=numeric,
                medians={k: float(v) for k, v in data["medians"].items()},
                means={k: float(v) for k, v in data["means"].items()},
                scales={k: float(v) for k, v in data["scales"].items()},
                categories=categories,
                derived=derived,
                category_fill=fill,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, TransformerError):
                raise
            raise TransformerError(f"stored transformer is malformed: {exc}") from exc


def _require_columns(frame: pd.DataFrame, names: Iterable[str]) -> None:
    missing = [name for name in names if name not in frame.columns]
    if missing:
        raise TransformerError(f"input lacks the model features {missing}")


def _as_float(value: Any) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
