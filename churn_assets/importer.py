"""``churn import``: a customer export (CSV, Parquet, JSON lines) into the platform's topics.

A mapping names the export's columns: which one holds the customer id, which the observation
time (or one ``as_of`` time for a whole snapshot), which the label and its positive value, and
which column feeds which feature of the contract. Rows are validated with the contract
(:func:`churn_assets.validation.check_columns`, text booleans allowed); valid rows become
``churn.customers`` events (and ``ml.feedback`` outcomes when a label is mapped), so landing stays
the only write path. Rejected rows go to a rejects file with their row number, column and reason.

Event ids are derived from the row's content (customer, time, values): importing the same file
again produces the same ids, which landing keeps once.
"""

import csv
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import yaml

from churn_assets.contract import Contract, spelling_key
from churn_assets.validation import RowError, check_columns

__all__ = ["ImportError_", "ImportMapping", "ImportPlan", "plan_import", "read_export"]

READERS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".ndjson": "json"}
# A churned label's outcome time, after the observation (docs/YOUR_DATA.md).
CHURN_DELAY = timedelta(days=1)
MAPPING_KEYS = {"customer_id", "observed_at", "as_of", "label", "positive", "negative", "features"}


class ImportError_(ValueError):  # noqa: N801 - ImportError is a builtin
    """The export or its mapping cannot be imported; the message says why."""


@dataclass(frozen=True)
class ImportMapping:
    """Which export column is what. ``features`` maps feature name -> column."""

    customer_id: str
    features: Mapping[str, str]
    observed_at: str | None = None
    as_of: datetime | None = None
    label: str | None = None
    positive: str = "Yes"
    negative: str = "No"

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> "ImportMapping":
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ImportError_(f"mapping {path} cannot be read: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - MAPPING_KEYS:
            unknown = sorted(set(raw) - MAPPING_KEYS) if isinstance(raw, dict) else raw
            raise ImportError_(
                f"mapping {path}: unknown keys {unknown} (keys: {', '.join(sorted(MAPPING_KEYS))})"
            )
        data = {k: v for k, v in raw.items() if v is not None} | {
            k: v for k, v in overrides.items() if v is not None
        }
        if "customer_id" not in data:
            raise ImportError_(f"mapping {path}: 'customer_id' (the id column) is required")
        if isinstance(data.get("as_of"), str):
            data["as_of"] = _aware(data["as_of"], "as_of")
        for key in ("positive", "negative"):
            if key in data:
                data[key] = str(data[key])
        return cls(**data)

    def check(self, contract: Contract, columns: list[str]) -> None:
        """Every mapped column exists, every feature is mapped once, time is given once."""
        missing = [
            f"{what} column {column!r}"
            for what, column in (
                ("customer id", self.customer_id),
                ("observation time", self.observed_at),
                ("label", self.label),
                *((f"feature {f!r}:", c) for f, c in self.features.items()),
            )
            if column is not None and column not in columns
        ]
        if missing:
            raise ImportError_(
                f"the export has no {'; no '.join(missing)} (its columns: {', '.join(columns)})"
            )
        unknown = sorted(set(self.features) - set(contract.names))
        if unknown:
            raise ImportError_(
                f"features {unknown} are not in the contract ({', '.join(contract.names)})"
            )
        unmapped = [name for name in contract.names if name not in self.features]
        if unmapped:
            raise ImportError_(f"no column is mapped to the features {unmapped}")
        if (self.observed_at is None) == (self.as_of is None):
            raise ImportError_("give either an observation time column or one as_of time")


def _aware(text: str, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ImportError_(f"{what} {text!r} is not an ISO 8601 date or date-time") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def read_export(path: Path) -> pd.DataFrame:
    """The export as text and numbers as written: CSV cells stay text (validation types them),
    Parquet and JSON lines keep their own types."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise ImportError_(
            f"{path}: unknown file type {path.suffix!r} (CSV, Parquet or JSON lines: "
            f"{', '.join(READERS)})"
        )
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError) as exc:
        raise ImportError_(f"{path} cannot be read as {kind}: {exc}") from None


@dataclass
class ImportPlan:
    """What an import produces: customer events and outcomes (topic payloads), and rejects."""

    events: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[RowError] = field(default_factory=list)
    rows: int = 0

    def write_rejects(self, path: Path) -> None:
        """``row,column,reason`` per problem; ``row`` counts data rows from 1 (the header is 0)."""
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["row", "column", "reason"])
            writer.writerows((e.row + 1, e.column, e.reason) for e in self.rejects)


def _numbers_from_text(values: pd.Series) -> list[Any]:
    """CSV cells are text: a cell that is a JSON number becomes that number, anything else
    stays text for validation to refuse (``"true"`` is not a number)."""
    parsed: list[Any] = []
    for value in values.tolist():
        if isinstance(value, str):
            try:
                number = orjson.loads(value.strip())
            except orjson.JSONDecodeError:
                parsed.append(value)
                continue
            parsed.append(
                number
                if isinstance(number, int | float) and not isinstance(number, bool)
                else value
            )
        else:
            parsed.append(
                None if value is None or (isinstance(value, float) and np.isnan(value)) else value
            )
    return parsed


def plan_import(
    frame: pd.DataFrame, mapping: ImportMapping, contract: Contract, horizon_days: int = 14
) -> ImportPlan:
    """Validate ``frame`` and build the messages of its valid rows.

    A label says what happened within the training horizon (``horizon_days``) after the row's
    observation: churned gives an outcome one day after it; stayed, a retained outcome one day
    past the horizon (so training labels the row 0, not "unknown")."""
    mapping.check(contract, [str(c) for c in frame.columns])
    if horizon_days < 1:
        raise ImportError_(f"the training horizon must be at least 1 day, not {horizon_days}")
    retained_after = timedelta(days=horizon_days) + CHURN_DELAY
    plan = ImportPlan(rows=len(frame))
    given: dict[str, Any] = {}
    for feature in contract.features:
        values = frame[mapping.features[feature.name]]
        given[feature.name] = (
            _numbers_from_text(values) if feature.kind in ("integer", "number") else values.tolist()
        )
    checked = check_columns(contract, given, text_booleans=True)
    # Rejects name the export's column, the one the user sees in the file.
    errors = [replace(e, column=mapping.features.get(e.column, e.column)) for e in checked.errors]
    ids = frame[mapping.customer_id].astype(str).str.strip().tolist()
    errors += [
        RowError(r, mapping.customer_id, "missing customer id") for r, i in enumerate(ids) if not i
    ]
    times = _times(frame, mapping, errors)
    labels = _labels(frame, mapping, errors)
    plan.rejects = sorted(errors, key=lambda e: (e.row, e.column))
    bad = {e.row for e in errors}
    columns = {f.name: checked.values(f) for f in contract.features}
    for row in range(len(frame)):
        if row in bad:
            continue
        values = {name: column[row] for name, column in columns.items()}
        observed = times[row]
        identity = orjson.dumps(
            [ids[row], observed.isoformat(), values], option=orjson.OPT_SORT_KEYS
        )
        digest = hashlib.sha256(identity).hexdigest()[:32]
        plan.events.append(
            {
                "event_id": f"imp-{digest}",
                "customer_id": ids[row],
                "event_time": observed.isoformat(),
                **values,
            }
        )
        if labels is not None:
            outcome = observed + (CHURN_DELAY if labels[row] else retained_after)
            plan.outcomes.append(
                {
                    "event_id": f"imp-{digest}-outcome",
                    "customer_id": ids[row],
                    "churned": labels[row],
                    "outcome_time": outcome.isoformat(),
                    "observed_at": outcome.isoformat(),
                }
            )
    return plan


def _times(frame: pd.DataFrame, mapping: ImportMapping, errors: list[RowError]) -> list[datetime]:
    if mapping.as_of is not None:
        return [mapping.as_of] * len(frame)
    assert mapping.observed_at is not None
    parsed = pd.to_datetime(frame[mapping.observed_at], errors="coerce", utc=True)
    for row in np.flatnonzero(parsed.isna().to_numpy()):
        errors.append(RowError(int(row), mapping.observed_at, "not a date or date-time"))
    return [
        t.to_pydatetime() if not pd.isna(t) else datetime.min.replace(tzinfo=UTC) for t in parsed
    ]


def _labels(
    frame: pd.DataFrame, mapping: ImportMapping, errors: list[RowError]
) -> list[bool] | None:
    if mapping.label is None:
        return None
    positive, negative = spelling_key(mapping.positive), spelling_key(mapping.negative)
    labels: list[bool] = []
    for row, value in enumerate(frame[mapping.label].tolist()):
        if (
            value is None
            or (isinstance(value, float) and np.isnan(value))
            or str(value).strip() == ""
        ):
            errors.append(RowError(row, mapping.label, "missing label"))
            labels.append(False)
            continue
        key = spelling_key(str(value))
        if key not in (positive, negative):
            errors.append(
                RowError(
                    row,
                    mapping.label,
                    f"label {str(value)[:40]!r} is neither {mapping.positive!r} (churned) "
                    f"nor {mapping.negative!r}",
                )
            )
        labels.append(key == positive)
    return labels


def batches(items: list[dict[str, Any]], size: int = 1000) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def produce_plan(
    producer: Any,
    plan: ImportPlan,
    contract: Contract,
    *,
    on_progress: Any = None,
    timeout_s: float = 60.0,
) -> tuple[int, int]:
    """Produce the plan's events to ``churn.customers`` and outcomes to ``ml.feedback``, keyed
    by customer; returns (events, outcomes) once Kafka acknowledged every one of them."""
    from churn_assets.schemas import Topics, encode_message

    failures: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    for topic, payloads in ((Topics.CUSTOMERS, plan.events), (Topics.FEEDBACK, plan.outcomes)):
        for batch in batches(payloads):
            for payload in batch:
                value = encode_message(topic, payload, contract)
                while True:
                    try:
                        producer.produce(
                            topic,
                            key=payload["customer_id"].encode(),
                            value=value,
                            on_delivery=delivered,
                        )
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.poll(0)
            if on_progress is not None:
                on_progress(len(batch))
    remaining = producer.flush(timeout_s)
    if remaining:
        raise ImportError_(
            f"{remaining} imported messages were not delivered to Kafka within {timeout_s:.0f} s; "
            "import the file again (it lands once)"
        )
    if failures:
        raise ImportError_(
            f"{len(failures)} imported messages failed delivery (first: {failures[0]}); "
            "import the file again (it lands once)"
        )
    return len(plan.events), len(plan.outcomes)
