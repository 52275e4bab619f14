"""Versioned message schemas for every Kafka topic, validated when produced and when landed.

Each message is a JSON object with ``schema_version``; :data:`TOPIC_SCHEMAS` maps a topic to the
model that validates it. Models forbid unknown fields and reject NaN/inf, so a message that
validates here can be trusted by every consumer.
"""

import math
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
)
from pydantic.fields import FieldInfo
from typing_extensions import TypeForm

from churn_assets.config import DEFAULT_CONTRACT as DEFAULT_CONTRACT_PATH
from churn_assets.contract import Contract, features_model, load_contract

__all__ = [
    "FEATURE_NAMES",
    "NUMERIC_FEATURES",
    "CATEGORICAL_FEATURES",
    "CATEGORY_VALUES",
    "CustomerFeatures",
    "CustomerEvent",
    "CustomerEventEnvelope",
    "PredictionEvent",
    "FeedbackEvent",
    "DriftAlert",
    "OutlierEvent",
    "DeadLetter",
    "Identifier",
    "Timestamp",
    "Topics",
    "TOPIC_SCHEMAS",
    "DATA_TOPICS",
    "ALL_TOPICS",
    "MessageError",
    "decode_message",
    "encode_message",
    "features_schema",
    "topic_schemas",
]

# The default feature contract (config/features.yaml) names the features; nothing here
# repeats them.
DEFAULT_CONTRACT = load_contract(DEFAULT_CONTRACT_PATH)
FEATURE_NAMES = DEFAULT_CONTRACT.names
NUMERIC_FEATURES = tuple(f.name for f in DEFAULT_CONTRACT.of_kind("integer", "number"))
CATEGORICAL_FEATURES = tuple(f.name for f in DEFAULT_CONTRACT.of_kind("category"))
CATEGORY_VALUES: dict[str, tuple[str, ...]] = {
    f.name: tuple(f.categories) for f in DEFAULT_CONTRACT.of_kind("category")
}


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number (NaN and infinity are rejected)")
    return value


def _count(value: Any) -> Any:
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"must be a whole number, not {type(value).__name__}")
    return value


# Strict numbers: a JSON number only; ``true`` or ``"50"`` is rejected, never coerced, on every
# path (serving's input, landing's messages). A count takes a whole number: ``12`` or ``12.0``
# (one JSON number, as JSON Schema's ``integer`` reads it), never ``12.5``.
Finite = Annotated[float, Field(strict=True), AfterValidator(_finite)]
Count = Annotated[int, BeforeValidator(_count)]


def _timestamp_text(value: Any) -> Any:
    if isinstance(value, str | datetime):
        return value
    raise ValueError(
        "must be an ISO 8601 date-time string with a time zone, e.g. 2026-01-31T12:00:00Z "
        f"(got {type(value).__name__})"
    )


# An ISO 8601 string with a time zone (or a datetime in Python): a number is not a date-time.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_timestamp_text)]

# Ids: printable text, at most 128 characters; control, format (zero-width, bidirectional
# overrides), surrogate, private-use and line/paragraph separator characters are refused, so an
# id can be logged, shown and keyed on safely.
IDENTIFIER_PATTERN = (
    # Written with escapes both Python's ``re`` (OpenAPI clients, fuzzers) and pydantic's Rust
    # engine read: C0/C1 controls, soft hyphen, Arabic/Syriac/Mongolian format characters,
    # zero-width and bidirectional marks, line/paragraph separators, invisible operators, BOM,
    # interlinear annotations, private use, tags.
    r"^[^\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f"
    r"\u0890\u0891\u08e2\u2028-\u202e\u2060-\u206f\ue000-\uf8ff\ufeff\ufff9-\ufffb"
    r"\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    r"\U000e0000-\U000e007f\U000f0000-\U0010ffff]+$"
)
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN)]


class Topics:
    """Topic names. One home for them: producers, landing and monitoring import these."""

    CUSTOMERS = "churn.customers"
    PREDICTIONS = "ml.predictions"
    FEEDBACK = "ml.feedback"
    DRIFT_ALERTS = "ml.drift-alerts"
    OUTLIERS = "ml.outliers"
    DEAD_LETTER = "churn.dead-letter"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


if TYPE_CHECKING:
    # Built from the contract at import time: to mypy, a message whose fields it cannot list.
    class CustomerFeatures(_Message): ...
else:
    CustomerFeatures = features_model(DEFAULT_CONTRACT, name="CustomerFeatures", base=_Message)
CustomerFeatures.__doc__ = (
    "The model's features as the contract declares them: category spellings are stored "
    "canonically, numbers are strict and within the contract's bounds."
)


class CustomerEventEnvelope(_Message):
    """A customer event's fields besides its features (landing checks features by column)."""

    schema_version: Literal[1] = 1
    event_id: Identifier
    customer_id: Identifier
    event_time: Timestamp


def _customer_event(features: type[_Message]) -> type[_Message]:
    """``churn.customers`` v1 for a contract's features model: the envelope's fields added."""
    # mypy matches a ``**dict``'s values against every keyword parameter of create_model
    # (``__config__``, ``__module__``...), which field definitions never are.
    event: type[_Message] = create_model(  # type: ignore[call-overload]
        "CustomerEvent",
        __base__=features,
        __doc__="``churn.customers`` v1: a customer's state as observed at ``event_time``.",
        **_field_definitions(CustomerEventEnvelope),
    )
    return event


def _field_definitions(model: type[BaseModel]) -> dict[str, tuple[TypeForm[Any], FieldInfo]]:
    """``model``'s fields as ``create_model`` takes them: (annotation, field) by name."""
    definitions = {}
    for name, info in model.model_fields.items():
        if info.annotation is None:
            raise TypeError(f"{model.__name__}.{name} has no annotation")
        definitions[name] = (info.annotation, info)
    return definitions


CustomerEvent = _customer_event(CustomerFeatures)


class PredictionEvent(_Message):
    """``ml.predictions`` v1: one scored request, mirrored by serving (primary and shadow)."""

    schema_version: Literal[1] = 1
    request_id: Identifier
    customer_id: Identifier | None = None
    model_name: str = Field(min_length=1, max_length=128)
    model_version: str = Field(min_length=1, max_length=64)
    arm: Literal["primary", "shadow", "canary"]
    score: Finite | None = Field(default=None, ge=0, le=1)
    latency_ms: Finite = Field(ge=0)
    status: Literal["ok", "error"]
    error: str | None = Field(default=None, max_length=2_000)
    features: CustomerFeatures | None = None
    predicted_at: Timestamp


class FeedbackEvent(_Message):
    """``ml.feedback`` v1: a ground-truth outcome for a customer (and optionally a request)."""

    schema_version: Literal[1] = 1
    event_id: Identifier
    customer_id: Identifier
    request_id: Identifier | None = None
    churned: bool = Field(strict=True)
    outcome_time: Timestamp = Field(description="when the outcome happened")
    observed_at: Timestamp = Field(description="when the platform learned of it")


class DriftAlert(_Message):
    """``ml.drift-alerts`` v1."""

    schema_version: Literal[1] = 1
    alert_id: str = Field(min_length=1, max_length=128)
    model_version: str
    detector: str
    features: list[str]
    p_values: dict[str, Finite]
    threshold: Finite
    window_start: AwareDatetime
    window_end: AwareDatetime
    raised_at: AwareDatetime


class OutlierEvent(_Message):
    """``ml.outliers`` v1."""

    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=128)
    request_id: str | None = None
    customer_id: str | None = None
    detector: str
    score: Finite
    threshold: Finite
    detected_at: AwareDatetime


class DeadLetter(_Message):
    """``churn.dead-letter`` v1: a message that landing refused, with the reason."""

    schema_version: Literal[1] = 1
    source_topic: str
    source_partition: int
    source_offset: int
    reason: str
    raw_value: str | None
    dead_lettered_at: AwareDatetime


TOPIC_SCHEMAS: dict[str, type[_Message]] = {
    Topics.CUSTOMERS: CustomerEvent,
    Topics.PREDICTIONS: PredictionEvent,
    Topics.FEEDBACK: FeedbackEvent,
    Topics.DRIFT_ALERTS: DriftAlert,
    Topics.OUTLIERS: OutlierEvent,
    Topics.DEAD_LETTER: DeadLetter,
}
_SCHEMAS_BY_DIGEST: dict[str, dict[str, type[_Message]]] = {DEFAULT_CONTRACT.digest: TOPIC_SCHEMAS}


def topic_schemas(contract: Contract | None = None) -> dict[str, type[_Message]]:
    """The topic schemas for ``contract`` (default: the default contract's): customer events and
    the features of predictions carry that contract's features; built once per contract."""
    if contract is None:
        return TOPIC_SCHEMAS
    found = _SCHEMAS_BY_DIGEST.get(contract.digest)
    if found is None:
        features = features_model(contract, name="CustomerFeatures", base=_Message)
        event = _customer_event(features)
        prediction = create_model(
            "PredictionEvent",
            __base__=PredictionEvent,
            # A union of a model built at run time: a type form mypy cannot follow.
            features=(features | None, None),  # type: ignore[arg-type]
        )
        found = TOPIC_SCHEMAS | {Topics.CUSTOMERS: event, Topics.PREDICTIONS: prediction}
        _SCHEMAS_BY_DIGEST[contract.digest] = found
    return found


def features_schema(contract: Contract | None = None) -> type[_Message]:
    """The pydantic model of ``contract``'s features (the base of its customer events)."""
    event = topic_schemas(contract)[Topics.CUSTOMERS]
    return event.__mro__[1]


DATA_TOPICS = (Topics.CUSTOMERS, Topics.PREDICTIONS, Topics.FEEDBACK)
ALL_TOPICS = tuple(TOPIC_SCHEMAS)


class MessageError(ValueError):
    """A message could not be decoded or does not match its topic's schema."""


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        loc = ".".join(str(p) for p in error["loc"]) or "<message>"
        parts.append(f"{loc}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def decode_message(topic: str, value: bytes | None, contract: Contract | None = None) -> _Message:
    """Parse and validate a raw Kafka value for ``topic`` (customer events and prediction
    features against ``contract``, default the default contract); raises :class:`MessageError`."""
    schema = topic_schemas(contract).get(topic)
    if schema is None:
        raise MessageError(f"no schema registered for topic {topic!r}")
    if value is None:
        raise MessageError("empty message (null value)")
    try:
        return schema.model_validate_json(value)
    except ValidationError as exc:
        fast_error = exc
    # The message is bad: take the slower path that names the reason precisely.
    try:
        payload: Any = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise MessageError(f"expected a JSON object, got {type(payload).__name__}")
    version = payload.get("schema_version", 1)
    if version != 1:
        raise MessageError(f"unsupported schema_version {version!r} for {topic} (supported: 1)")
    try:
        schema.model_validate(payload)
    except ValidationError as exc:
        raise MessageError(f"schema {schema.__name__} v1: {_short_errors(exc)}") from None
    raise MessageError(f"schema {schema.__name__} v1: {_short_errors(fast_error)}")


def encode_message(
    topic: str, message: BaseModel | dict[str, Any], contract: Contract | None = None
) -> bytes:
    """Serialise ``message`` to JSON bytes and validate exactly those bytes against ``topic``
    (and ``contract``, as :func:`decode_message`)."""
    schema = topic_schemas(contract).get(topic)
    if schema is None:
        raise MessageError(f"no schema registered for topic {topic!r}")
    if isinstance(message, BaseModel):
        if not isinstance(message, schema):
            raise MessageError(
                f"{type(message).__name__} cannot be sent to {topic} (expects {schema.__name__})"
            )
        return message.model_dump_json().encode()
    payload = orjson.dumps(message)
    try:
        schema.model_validate_json(payload)
    except ValidationError as exc:
        raise MessageError(f"schema {schema.__name__} v1: {_short_errors(exc)}") from None
    return payload
