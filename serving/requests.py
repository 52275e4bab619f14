"""What a request may carry, checked: the served contract's request models (REST), the V2
protocol's columns (REST and gRPC), and :class:`Batch`, the validated records by column that
scoring, shadowing and mirroring read. Errors are :class:`~serving.errors.InvalidInput` with
every field's reason, row-indexed."""

import functools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
)

from churn_assets.contract import Contract, features_model
from churn_assets.schemas import Identifier
from churn_assets.validation import check_columns
from serving.errors import InvalidInput

__all__ = [
    "ID_FIELDS",
    "MAX_BATCH",
    "Batch",
    "RequestModels",
    "request_example",
    "request_models",
    "validate_columns",
    "validate_records",
]

MAX_BATCH = 1000
ID_FIELDS = ("customer_id", "request_id")


class _RequestIds(BaseModel):
    """What every request may carry besides the contract's features."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    customer_id: Identifier | None = None
    request_id: Identifier | None = None


def _batch_size(value: Any) -> Any:
    """The batch limit, checked before any record is validated."""
    if isinstance(value, list) and len(value) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} records per request, got {len(value)}")
    return value


@dataclass(frozen=True)
class RequestModels:
    """The request models of one contract: a record (its features, an optional customer and
    request id; unknown fields, NaN/inf, out-of-range values and unknown categories are
    rejected) and a batch of records, with an example record for the docs."""

    contract: Contract
    single: type[_RequestIds]
    batch: type[BaseModel]
    example: dict[str, Any]


_REQUEST_MODELS: dict[str, RequestModels] = {}
_REQUEST_MODELS_LOCK = threading.Lock()


def request_models(contract: Contract) -> RequestModels:
    """The request models for ``contract``, built once per contract digest."""
    with _REQUEST_MODELS_LOCK:
        found = _REQUEST_MODELS.get(contract.digest)
        if found is None:
            single = features_model(contract, name="PredictRequest", base=_RequestIds)
            single.__doc__ = (
                "One record to score: the served contract's features, an optional customer and "
                "request id. Unknown fields, NaN/inf, out-of-range values and unknown categories "
                "are rejected; categories take any case, spacing or punctuation, or an alias."
            )
            batch = create_model(
                "BatchPredictRequest",
                __config__=ConfigDict(extra="forbid"),
                instances=(  # type: ignore[arg-type]  # the record model is built at run time
                    Annotated[
                        list[single],  # type: ignore[valid-type]
                        BeforeValidator(_batch_size),
                        Field(min_length=1, max_length=MAX_BATCH),
                    ],
                    ...,
                ),
            )
            found = RequestModels(contract, single, batch, request_example(contract))
            _REQUEST_MODELS[contract.digest] = found
        return found


def request_example(contract: Contract) -> dict[str, Any]:
    """A valid record for ``contract``: each feature's declared ``example``; for a feature
    without one, a number within its bounds, ``false``, or a category's first alias (else its
    name in words)."""
    example: dict[str, Any] = {}
    for feature in contract.features:
        if feature.example is not None:
            example[feature.name] = feature.example
        elif feature.kind in ("integer", "number"):
            low = feature.minimum if feature.minimum is not None else 0.0
            high = feature.maximum if feature.maximum is not None else low + 48
            value = low + min((high - low) / 2, 24.0)
            example[feature.name] = int(value) if feature.kind == "integer" else value
        elif feature.kind == "boolean":
            example[feature.name] = False
        else:
            canonical, aliases = next(iter(feature.categories.items()))
            example[feature.name] = (
                aliases[0] if aliases else canonical.replace("_", " ").capitalize()
            )
    return example


@dataclass(frozen=True)
class Batch:
    """Validated records, by column: one list per contract feature of canonical values (a
    missing value the contract fills is ``None``), and each record's optional customer and
    request id. Validation fills the columns once; scoring, shadowing and mirroring read them."""

    columns: dict[str, list[Any]]
    customer_ids: list[str | None]
    request_ids: list[str | None]

    def __len__(self) -> int:
        return len(self.customer_ids)

    @classmethod
    def from_records(
        cls,
        features: Sequence[Mapping[str, Any]],
        names: Sequence[str],
        customer_ids: list[str | None],
        request_ids: list[str | None],
    ) -> "Batch":
        columns = {name: [record[name] for record in features] for name in names}
        return cls(columns, customer_ids, request_ids)

    @functools.cached_property
    def features(self) -> list[dict[str, Any]]:
        """Each record's features as a dict (explanations, the mirror's events)."""
        names = list(self.columns)
        rows = zip(*self.columns.values(), strict=True)
        return [dict(zip(names, row, strict=True)) for row in rows]

    def take(self, indices: Sequence[int]) -> "Batch":
        """The records at ``indices``, in that order."""
        if len(indices) == len(self) and all(i == n for n, i in enumerate(indices)):
            return self
        return Batch(
            {name: [values[i] for i in indices] for name, values in self.columns.items()},
            [self.customer_ids[i] for i in indices],
            [self.request_ids[i] for i in indices],
        )

    def rows(self) -> list[dict[str, Any]]:
        """The records as request rows again (features and the ids given)."""
        return [
            {
                **{k: v for k, v in features.items() if v is not None},
                **({"customer_id": c} if c is not None else {}),
                **({"request_id": r} if r is not None else {}),
            }
            for features, c, r in zip(
                self.features, self.customer_ids, self.request_ids, strict=True
            )
        ]


def _check_batch_size(rows: int) -> None:
    if not rows:
        raise InvalidInput([{"loc": ["instances"], "msg": "at least one record is required"}])
    if rows > MAX_BATCH:
        raise InvalidInput(
            [{"loc": ["instances"], "msg": f"at most {MAX_BATCH} records per request, got {rows}"}]
        )


def validate_records(rows: Sequence[Mapping[str, Any]], contract: Contract) -> Batch:
    """Validate raw rows against ``contract``; raises :class:`InvalidInput` with every field
    error, row-indexed."""
    _check_batch_size(len(rows))
    model = request_models(contract).single
    valid, errors = [], []
    for index, row in enumerate(rows):
        try:
            valid.append(model.model_validate(row))
        except ValidationError as exc:
            for error in exc.errors():
                errors.append(
                    {"loc": [index, *error["loc"]], "msg": error["msg"], "type": error["type"]}
                )
    if errors:
        raise InvalidInput(errors)
    return Batch(
        {name: [getattr(r, name) for r in valid] for name in contract.names},
        [r.customer_id for r in valid],
        [r.request_id for r in valid],
    )


_IDS: TypeAdapter[str | None] = TypeAdapter(Identifier | None)


def validate_columns(columns: Mapping[str, Sequence[Any]], contract: Contract) -> Batch:
    """Validate whole columns (the V2 protocol's one input per feature, plus optional
    ``customer_id`` and ``request_id``) against ``contract`` with
    :func:`~churn_assets.validation.check_columns`; raises :class:`InvalidInput`: a missing or
    unknown column once, a bad value with its row."""
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise InvalidInput(
            [{"loc": ["inputs"], "msg": f"inputs have different lengths: {lengths}"}]
        )
    rows = max(lengths.values(), default=0)
    _check_batch_size(rows)
    features = {k: v for k, v in columns.items() if k not in ID_FIELDS}
    check = check_columns(contract, features)
    errors: list[dict[str, Any]] = []
    whole = {"missing column", "unknown column"}
    for name in sorted({e.column for e in check.errors if e.reason in whole}):
        reason = "missing column" if name in contract.names else "unknown column"
        msg = (
            f"missing input; the served contract's features: {', '.join(contract.names)}"
            if reason == "missing column"
            else f"unknown input; the served contract's features: {', '.join(contract.names)}"
        )
        errors.append({"loc": ["inputs", name], "msg": msg})
    errors += [
        {"loc": [e.row, e.column], "msg": e.reason} for e in check.errors if e.reason not in whole
    ]
    ids: dict[str, list[str | None]] = {}
    for name in ID_FIELDS:
        values = columns.get(name)
        ids[name] = [None] * rows
        for row, value in enumerate(values or ()):
            try:
                ids[name][row] = _IDS.validate_python(value)
            except ValidationError as exc:
                errors.append({"loc": [row, name], "msg": exc.errors()[0]["msg"]})
    if errors:
        raise InvalidInput(errors)
    return Batch(
        {feature.name: check.values(feature) for feature in contract.features},
        ids["customer_id"],
        ids["request_id"],
    )
