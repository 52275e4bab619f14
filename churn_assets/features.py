"""Point-in-time customer features and the one feature transformer shared by training and serving.

:func:`customer_features_as_of` turns landed customer events into one row per customer as of a
time ``t`` using only events at or before ``t``. :class:`FeatureTransformer` turns the eight model
features (plus three derived from them) into the model's numeric matrix; it is fitted on training
data, stored with each model version as JSON (never pickle) and applied unchanged by serving.

Missing-value policy: a missing or NaN numeric input is replaced by the training median.
Unknown-category policy: a category not seen in the schema encodes as all-zero one-hot columns
(the "other" bucket); serving's input validation rejects unknown categories before they get here.
"""

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from churn_assets.schemas import (
    CATEGORICAL_FEATURES,
    CATEGORY_VALUES,
    FEATURE_NAMES,
    NUMERIC_FEATURES,
)

__all__ = [
    "DERIVED_FEATURES",
    "HISTORY_FEATURES",
    "FeatureTransformer",
    "TransformerError",
    "customer_features_as_of",
    "derive_features",
]

DERIVED_FEATURES = ("charges_per_tenure_month", "charge_ratio", "tickets_per_login")
HISTORY_FEATURES = ("events_30d", "login_trend", "ticket_trend", "days_since_last_event")
TRANSFORMER_FORMAT = 1


class TransformerError(ValueError):
    """The transformer cannot be built from the stored data, or the input lacks columns."""


def _derive(
    tenure: np.ndarray,
    total: np.ndarray,
    monthly: np.ndarray,
    tickets: np.ndarray,
    logins: np.ndarray,
) -> dict[str, np.ndarray]:
    per_month = total / np.maximum(tenure, 1.0)
    return {
        "charges_per_tenure_month": per_month,
        "charge_ratio": monthly / (per_month + 1.0),
        "tickets_per_login": tickets / (logins + 1.0),
    }


def derive_features(frame: pd.DataFrame) -> pd.DataFrame:
    """The derived model features, computed from one record's own values only.

    * ``charges_per_tenure_month``: lifetime billing per tenure month, ``total / max(tenure, 1)``
    * ``charge_ratio``: current bill over the lifetime monthly average (> 1 after a price rise)
    * ``tickets_per_login``: support tickets per login in the last 30 days
    """
    columns = _derive(
        *(
            frame[name].to_numpy(dtype=float)
            for name in (
                "customer_tenure",
                "total_charges",
                "monthly_charges",
                "support_tickets",
                "login_frequency",
            )
        )
    )
    return pd.DataFrame(columns, index=frame.index)


def customer_features_as_of(
    events: pd.DataFrame, as_of: datetime, history_days: int = 30
) -> pd.DataFrame:
    """One row per customer: its latest state at or before ``as_of`` plus history features.

    ``events`` has ``customer_id``, ``event_time`` and the eight features. Only rows with
    ``event_time <= as_of`` are read, so the result is point-in-time correct by construction.
    History features: events in the last ``history_days``, login and ticket trends (latest value
    minus the window mean) and days since the last event.
    """
    as_of_ts = pd.Timestamp(as_of)
    past = events.loc[events["event_time"] <= as_of_ts]
    if past.empty:
        return pd.DataFrame(
            columns=["customer_id", *FEATURE_NAMES, *HISTORY_FEATURES, "last_event_time"]
        )
    ordered = past.sort_values(["customer_id", "event_time"], kind="stable")
    latest = ordered.groupby("customer_id", sort=True).tail(1).set_index("customer_id")
    window = ordered.loc[ordered["event_time"] > as_of_ts - timedelta(days=history_days)]
    stats = window.groupby("customer_id").agg(
        events_30d=("event_time", "size"),
        login_mean=("login_frequency", "mean"),
        ticket_mean=("support_tickets", "mean"),
    )
    out = latest[list(FEATURE_NAMES)].copy()
    out["events_30d"] = stats["events_30d"].reindex(out.index).fillna(0).astype(int)
    out["login_trend"] = (out["login_frequency"] - stats["login_mean"].reindex(out.index)).fillna(
        0.0
    )
    out["ticket_trend"] = (out["support_tickets"] - stats["ticket_mean"].reindex(out.index)).fillna(
        0.0
    )
    out["days_since_last_event"] = (as_of_ts - latest["event_time"]).dt.total_seconds() / 86_400
    out["last_event_time"] = latest["event_time"]
    return out.reset_index()


@dataclass(frozen=True)
class FeatureTransformer:
    """Encoding, imputation and scaling of the model inputs, stored as plain data."""

    numeric: tuple[str, ...]
    medians: Mapping[str, float]
    means: Mapping[str, float]
    scales: Mapping[str, float]
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(CATEGORY_VALUES))
    format_version: int = TRANSFORMER_FORMAT

    @classmethod
    def fit(cls, frame: pd.DataFrame) -> "FeatureTransformer":
        """Learn medians, means and scales from training rows holding the eight features."""
        _require_columns(frame)
        numeric_frame = _numeric_frame(frame)
        medians = numeric_frame.median()
        filled = numeric_frame.fillna(medians)
        stds = filled.std(ddof=0).replace(0.0, 1.0)
        return cls(
            numeric=tuple(numeric_frame.columns),
            medians={k: float(v) for k, v in medians.items()},
            means={k: float(v) for k, v in filled.mean().items()},
            scales={k: float(v) for k, v in stds.items()},
        )

    @property
    def feature_names_out(self) -> list[str]:
        names = list(self.numeric)
        for column in CATEGORICAL_FEATURES:
            names += [f"{column}={value}" for value in self.categories[column]]
        return names

    def source_features(self) -> list[str]:
        """For each output column, the model input it comes from (one-hot groups collapse)."""
        return [name.split("=", 1)[0] for name in self.feature_names_out]

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """The model matrix (float32, ``len(feature_names_out)`` columns) for ``frame``'s rows."""
        _require_columns(frame)
        numeric = {name: frame[name].to_numpy(dtype=float) for name in NUMERIC_FEATURES}
        categorical = {name: frame[name].astype(object).to_numpy() for name in CATEGORICAL_FEATURES}
        return self._matrix(numeric, categorical, len(frame))

    def transform_records(self, records: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Serving's entry point: the same transform for a list of feature dicts, without pandas
        (a DataFrame costs milliseconds per request)."""
        rows = list(records)
        numeric = {
            name: np.array([_as_float(row.get(name)) for row in rows], dtype=float)
            for name in NUMERIC_FEATURES
        }
        categorical = {
            name: np.array([row.get(name) for row in rows], dtype=object)
            for name in CATEGORICAL_FEATURES
        }
        return self._matrix(numeric, categorical, len(rows))

    def _matrix(
        self, numeric: dict[str, np.ndarray], categorical: dict[str, np.ndarray], rows: int
    ) -> np.ndarray:
        columns = {
            **numeric,
            **_derive(
                numeric["customer_tenure"],
                numeric["total_charges"],
                numeric["monthly_charges"],
                numeric["support_tickets"],
                numeric["login_frequency"],
            ),
        }
        out = np.empty((rows, len(self.feature_names_out)), dtype=np.float64)
        for i, name in enumerate(self.numeric):
            values = np.where(np.isnan(columns[name]), self.medians[name], columns[name])
            out[:, i] = (values - self.means[name]) / self.scales[name]
        position = len(self.numeric)
        for name in CATEGORICAL_FEATURES:
            for value in self.categories[name]:
                out[:, position] = categorical[name] == value
                position += 1
        return out.astype(np.float32)

    def to_json(self) -> str:
        data = asdict(self)
        data["numeric"] = list(self.numeric)
        data["categories"] = {k: list(v) for k, v in self.categories.items()}
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "FeatureTransformer":
        try:
            data = json.loads(text)
            if data.get("format_version") != TRANSFORMER_FORMAT:
                raise TransformerError(
                    f"transformer format {data.get('format_version')!r} is not supported "
                    f"(expected {TRANSFORMER_FORMAT})"
                )
            return cls(
                numeric=tuple(data["numeric"]),
                medians={k: float(v) for k, v in data["medians"].items()},
                means={k: float(v) for k, v in data["means"].items()},
                scales={k: float(v) for k, v in data["scales"].items()},
                categories={k: tuple(v) for k, v in data["categories"].items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, TransformerError):
                raise
            raise TransformerError(f"stored transformer is malformed: {exc}") from exc


def _require_columns(frame: pd.DataFrame) -> None:
    missing = [name for name in FEATURE_NAMES if name not in frame.columns]
    if missing:
        raise TransformerError(f"input lacks the model features {missing}")


def _as_float(value: Any) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _numeric_frame(frame: pd.DataFrame) -> pd.DataFrame:
    base = frame[list(NUMERIC_FEATURES)].astype(float)
    return pd.concat([base, derive_features(frame)], axis=1)
