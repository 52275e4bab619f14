"""Customer events decoded a batch at a time: features checked by column with the contract's
compiled validator (:func:`churn_assets.validation.check_columns`), the rest of each event (ids,
time, schema version) by its small model. A message that fails gets its reason from the
row-by-row decoder (:func:`churn_assets.schemas.decode_message`), the same text as ever.

Both validators are compiled from one contract with the same strict rules (no bool or text as a
number, NaN and infinities refused, categories stored canonically); a row the column check
refuses but the message model would take is still refused, with the column check's reason.
"""

from collections.abc import Sequence
from typing import Annotated, Any, NotRequired, TypedDict

import orjson
from pydantic import ConfigDict, TypeAdapter, ValidationError

from churn_assets.contract import Contract
from churn_assets.schemas import (
    CustomerEventEnvelope,
    MessageError,
    Topics,
    decode_message,
)
from churn_assets.validation import RowError, check_columns

__all__ = ["decode_customer_events"]

ENVELOPE_FIELDS = tuple(CustomerEventEnvelope.model_fields)
# The envelope's fields and rules as a TypedDict: validated straight into dicts (no model objects
# to dump), reading a whole message and ignoring its features (checked by column).
_Envelope = TypedDict(  # type: ignore[misc]
    "_Envelope",
    {
        name: NotRequired[Annotated[f.annotation, f]]
        if not f.is_required()
        else Annotated[f.annotation, f]
        for name, f in CustomerEventEnvelope.model_fields.items()
    },
)
_Envelope.__pydantic_config__ = ConfigDict(extra="ignore", allow_inf_nan=False)  # type: ignore[attr-defined]
_ENVELOPES = TypeAdapter(list[_Envelope])
_ENVELOPE = TypeAdapter(_Envelope)


def decode_customer_events(
    values: Sequence[bytes | None], contract: Contract
) -> list[dict[str, Any] | MessageError]:
    """For each raw ``churn.customers`` value: its row (``event_id``, ``customer_id``,
    ``event_time`` and the contract's features, canonical) or the :class:`MessageError` that
    dead-letters it."""
    payloads: list[dict[str, Any] | None] = []
    for raw in values:
        try:
            payload = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            payload = None
        payloads.append(payload if isinstance(payload, dict) else None)
    names = contract.names
    checked = check_columns(
        contract, {name: [p.get(name) if p else None for p in payloads] for name in names}
    )
    problems: dict[int, list[RowError]] = {}
    for error in checked.errors:
        problems.setdefault(error.row, []).append(error)
    known = {*names, *ENVELOPE_FIELDS}
    candidates = [
        row
        for row, payload in enumerate(payloads)
        if payload is not None and row not in problems and known.issuperset(payload)
    ]
    envelopes = _envelopes([payloads[row] for row in candidates])  # type: ignore[misc]
    features = [checked.values(f) for f in contract.features]
    rows = list(zip(*features, strict=True))
    decoded: list[dict[str, Any] | MessageError] = [None] * len(values)  # type: ignore[list-item]
    for row, envelope in zip(candidates, envelopes, strict=True):
        if envelope is not None:
            envelope.pop("schema_version", None)
            envelope.update(zip(names, rows[row], strict=True))
            decoded[row] = envelope
    for row, raw in enumerate(values):
        if decoded[row] is None:
            decoded[row] = _reason(raw, contract, problems.get(row, []))
    return decoded


def _envelopes(payloads: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Each payload's validated envelope fields (``None`` where they are invalid): one
    validation call for a clean batch, one per message only when the batch has a bad one."""
    try:
        return list(_ENVELOPES.validate_python(payloads))
    except ValidationError:
        pass
    envelopes: list[dict[str, Any] | None] = []
    for payload in payloads:
        try:
            envelopes.append(_ENVELOPE.validate_python(payload))
        except ValidationError:
            envelopes.append(None)
    return envelopes


def _reason(raw: bytes | None, contract: Contract, errors: list[RowError]) -> MessageError:
    try:
        decode_message(Topics.CUSTOMERS, raw, contract)
    except MessageError as exc:
        return exc
    shown = "; ".join(f"{e.column}: {e.reason}" for e in errors) or "refused by the column check"
    return MessageError(f"schema CustomerEvent v1: {shown}")
