"""Landing batches decoded at once.

:func:`decode_batch` (every data topic) parses a whole batch with Arrow's JSON reader and checks
it by column; the messages it does not take go to the row decoders below, which name a bad
message's reason (see the comment above :func:`decode_batch`).

Customer events decoded a batch at a time: features checked by column with the contract's
compiled validator (:func:`churn_assets.validation.check_columns`), the rest of each event (ids,
time, schema version) by its small model. A message that fails gets its reason from the
row-by-row decoder (:func:`churn_assets.schemas.decode_message`), the same text as ever.

Both validators are compiled from one contract with the same strict rules (no bool or text as a
number, NaN and infinities refused, categories stored canonically); a row the column check
refuses but the message model would take is still refused, with the column check's reason.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NotRequired, TypedDict, cast

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from pydantic import ConfigDict, TypeAdapter, ValidationError

from churn_assets.contract import Contract, Feature
from churn_assets.schemas import (
    CustomerEventEnvelope,
    MessageError,
    Topics,
    decode_message,
)
from churn_assets.validation import RowError, check_columns

__all__ = ["DecodedBatch", "decode_batch", "decode_customer_events", "message_schema", "row_schema"]

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
        # Validated TypedDicts are plain dicts.
        return list(cast(list[dict[str, Any]], _ENVELOPES.validate_python(payloads)))
    except ValidationError:
        pass
    envelopes: list[dict[str, Any] | None] = []
    for payload in payloads:
        try:
            envelopes.append(cast(dict[str, Any], _ENVELOPE.validate_python(payload)))
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


# ---------------------------------------------------------------------------------------------
# Whole batches of every data topic, parsed at once.
#
# The batch's values, newline-joined, are parsed by Arrow's JSON reader against an explicit
# schema (strict: a number where text belongs, a float where a count belongs, an unknown field or
# a key given twice is an error), then checked by column. This fast path is conservative: it
# accepts a message only where the message model would take it with the same values, and hands
# every other message to the row decoders above (its row, or its exact dead-letter reason). A
# parse error of a slice of the batch splits the slice in halves, so one poison message sends
# only a small slice down the slow path. Each value must be one JSON object (``{...}``) for its
# row to line up; line breaks inside one are only looked for once a parse is refused (a value
# over several lines parses as one object unless a parse block boundary cuts it, and one holding
# two objects gives an extra row), so a clean batch goes from the consumer's bytes to Arrow with
# one join and no scan of its own.
# ---------------------------------------------------------------------------------------------

# A slice this small whose parse fails goes row by row.
_SPLIT_BELOW = 64
# Arrow parses a batch in blocks of this size, on the calling thread: landing decodes on a
# thread of its own while its landing thread writes to DuckDB, and on two cores a parse spread
# over Arrow's pool took CPU from the writer (1M messages landed 5% slower).
_PARSE_BLOCK = 256 * 1024
# Ids the fast path takes: printable ASCII, 1 to 128 characters (a subset of ``Identifier``;
# any other id, valid or not, is judged by the message model).
_ID_PATTERN = r"^[\x20-\x7e]{1,128}$"
# Date-times the fast path takes: ISO 8601 with a 'T', at most microseconds and a zone (a subset
# of what ``Timestamp`` takes; Arrow's cast then refuses impossible dates such as 02-30).
_TIME_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
_VALID_TIME = "1970-01-01T00:00:00Z"
_TIMESTAMP = pa.timestamp("us", tz="UTC")
# Floats beyond this are not taken by the fast path (JSON integers there round differently).
_EXACT_FLOAT = 2.0**53


@dataclass(frozen=True)
class _Field:
    """One top-level message field: its JSON type for the parser and the fast path's rule."""

    name: str
    rule: str  # id | text | literal | finite | boolean | time | features
    required: bool = True
    max_length: int | None = None
    allowed: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


# Mirrors of the message models in :mod:`churn_assets.schemas` (the unit tests compare the two on
# every kind of good and bad message).
_TOPIC_FIELDS: dict[str, tuple[_Field, ...]] = {
    Topics.CUSTOMERS: (
        _Field("event_id", "id"),
        _Field("customer_id", "id"),
        _Field("event_time", "time"),
    ),
    Topics.PREDICTIONS: (
        _Field("request_id", "id"),
        _Field("customer_id", "id", required=False),
        _Field("model_name", "text", max_length=128),
        _Field("model_version", "text", max_length=64),
        _Field("arm", "literal", allowed=("primary", "shadow", "canary")),
        _Field("score", "finite", required=False, minimum=0.0, maximum=1.0),
        _Field("latency_ms", "finite", minimum=0.0),
        _Field("status", "literal", allowed=("ok", "error")),
        _Field("error", "text", required=False, max_length=2_000),
        _Field("features", "features", required=False),
        _Field("predicted_at", "time"),
    ),
    Topics.FEEDBACK: (
        _Field("event_id", "id"),
        _Field("customer_id", "id"),
        _Field("request_id", "id", required=False),
        _Field("churned", "boolean"),
        _Field("outcome_time", "time"),
        _Field("observed_at", "time"),
    ),
}
_JSON_TYPES = {
    "id": pa.string(),
    "text": pa.string(),
    "literal": pa.string(),
    "finite": pa.float64(),
    "boolean": pa.bool_(),
    "time": pa.string(),
}
_ROW_TYPES = _JSON_TYPES | {"time": _TIMESTAMP, "features": pa.string()}
_FEATURE_JSON_TYPES = {
    "integer": pa.int64(),
    "number": pa.float64(),
    "category": pa.string(),
    "boolean": pa.bool_(),
}


def _feature_struct(contract: Contract) -> pa.DataType:
    return pa.struct([(f.name, _FEATURE_JSON_TYPES[f.kind]) for f in contract.features])


def message_schema(topic: str, contract: Contract) -> pa.Schema:
    """The Arrow schema the batch parser reads ``topic``'s messages with."""
    fields = [pa.field("schema_version", pa.int64())]
    for spec in _TOPIC_FIELDS[topic]:
        if spec.rule == "features":
            fields.append(pa.field(spec.name, _feature_struct(contract)))
        else:
            fields.append(pa.field(spec.name, _JSON_TYPES[spec.rule]))
    if topic == Topics.CUSTOMERS:
        fields += [pa.field(f.name, _FEATURE_JSON_TYPES[f.kind]) for f in contract.features]
    return pa.schema(fields)


def row_schema(topic: str, contract: Contract) -> pa.Schema:
    """The Arrow schema of a decoded row: the landing table's message columns."""
    fields = [pa.field(spec.name, _ROW_TYPES[spec.rule]) for spec in _TOPIC_FIELDS[topic]]
    if topic == Topics.CUSTOMERS:
        fields += [pa.field(f.name, _FEATURE_JSON_TYPES[f.kind]) for f in contract.features]
    return pa.schema(fields)


@dataclass
class DecodedBatch:
    """A batch's valid messages as one Arrow table (``rows``, in :func:`row_schema`'s columns),
    each row's position in the batch (``positions``, ascending), and the reason of every
    message that is dead-lettered (position -> error)."""

    rows: pa.Table
    positions: np.ndarray
    errors: dict[int, MessageError]
    # Messages the fast path did not take (judged row by row): for tests and metrics.
    slow: int = 0


def decode_batch(topic: str, values: Sequence[bytes | None], contract: Contract) -> DecodedBatch:
    """Decode one batch of raw ``topic`` values: valid rows as Arrow, invalid ones with the
    reason :func:`churn_assets.schemas.decode_message` gives (customer events: as
    :func:`decode_customer_events`)."""
    schema = message_schema(topic, contract)
    out_schema = row_schema(topic, contract)
    count = len(values)
    joined, ends, shaped = _lines(values)
    candidates = np.flatnonzero(shaped)
    tables: list[pa.Table] = []
    taken: list[np.ndarray] = []
    slow: list[np.ndarray] = [np.setdiff1d(np.arange(count), candidates, assume_unique=True)]
    pending = [candidates]
    lines_checked = False

    def split(chunk: np.ndarray) -> None:
        """A slice Arrow refuses: its halves are tried again, a small one goes row by row."""
        if len(chunk) < _SPLIT_BELOW:
            slow.append(chunk)
        else:
            half = len(chunk) // 2
            pending.extend((chunk[half:], chunk[:half]))

    while pending:
        chunk = pending.pop()
        if not len(chunk):
            continue
        table = _parse(values, chunk, schema, joined)
        if table is None and not lines_checked:
            # The first refusal is when values over several lines are looked for (a clean batch
            # never pays for the scan): they go row by row, the rest is tried again.
            lines_checked = True
            inside = _broken(joined, ends)
            if inside.any():
                slow.append(chunk[inside[chunk]])
                pending[:] = [c[~inside[c]] for c in pending]
                pending.append(chunk[~inside[chunk]])
                continue
        if table is None:
            split(chunk)
            continue
        try:
            rows, ok = _check(topic, table, contract, out_schema)
        except (pa.ArrowInvalid, ValueError):  # a date Arrow refuses (02-30)
            split(chunk)
            continue
        tables.append(rows.filter(pa.array(ok)))
        taken.append(chunk[ok])
        slow.append(chunk[~ok])
    slow_positions = np.sort(np.concatenate(slow)) if slow else np.empty(0, np.int64)
    errors: dict[int, MessageError] = {}
    if len(slow_positions):
        decoded = _decode_rows(topic, [values[i] for i in slow_positions], contract)
        good_rows: list[dict[str, Any]] = []
        good_positions: list[int] = []
        for position, result in zip(slow_positions.tolist(), decoded, strict=True):
            if isinstance(result, MessageError):
                errors[position] = result
            else:
                good_rows.append(result)
                good_positions.append(position)
        if good_rows:
            tables.append(pa.Table.from_pylist(good_rows, schema=out_schema))
            taken.append(np.array(good_positions, dtype=np.int64))
    if not tables:
        return DecodedBatch(
            out_schema.empty_table(), np.empty(0, np.int64), errors, len(slow_positions)
        )
    positions = np.concatenate(taken).astype(np.int64)
    rows = pa.concat_tables(tables)
    order = np.argsort(positions, kind="stable")
    if len(tables) > 1:
        rows = rows.take(pa.array(order))
        positions = positions[order]
    return DecodedBatch(rows, positions, errors, len(slow_positions))


def _lines(values: Sequence[bytes | None]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The values newline-joined (the parser's input when the chunk is the whole batch), each
    value's end in the joined bytes (where its separator is), and which values are shaped like
    one JSON object: ``{...}`` by their first and last bytes. Arrow parses a line per message,
    so the rows line up with the batch; a value over several lines makes its slice's parse fail
    or give more rows, and :func:`_broken` finds it."""
    count = len(values)
    present = values if None not in values else [b"" if v is None else v for v in values]
    joined = b"\n".join(present)  # type: ignore[arg-type]
    lengths = np.fromiter(map(len, present), np.int64, count)  # type: ignore[arg-type]
    ends = np.cumsum(lengths + 1) - 1
    starts = ends - lengths
    data = np.frombuffer(joined, np.uint8)
    shaped = lengths > 0
    shaped[shaped] &= (data[starts[shaped]] == ord("{")) & (data[ends[shaped] - 1] == ord("}"))
    return joined, ends, shaped


def _broken(joined: bytes, ends: np.ndarray) -> np.ndarray:
    """Which values hold a line feed or a carriage return: every one in ``joined`` that is not
    a separator (at ``ends``) lies inside the value that ends after it."""
    inside = np.zeros(len(ends), dtype=bool)
    data = np.frombuffer(joined, np.uint8)
    breaks = np.flatnonzero((data == ord("\n")) | (data == ord("\r")))
    breaks = breaks[~np.isin(breaks, ends[:-1])]
    inside[np.searchsorted(ends, breaks, side="right")] = True
    return inside


def _parse(
    values: Sequence[bytes | None], chunk: np.ndarray, schema: pa.Schema, joined: bytes
) -> pa.Table | None:
    """The chunk's messages parsed by Arrow, or None when Arrow refuses one of them (or a line
    held more than one object). ``joined`` is the whole batch joined, the input when the chunk is
    the whole batch."""
    if len(chunk) != len(values):
        joined = b"\n".join([values[i] for i in chunk.tolist()])
    try:
        table = pj.read_json(
            pa.BufferReader(joined),
            read_options=pj.ReadOptions(block_size=_PARSE_BLOCK, use_threads=False),
            parse_options=pj.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="error"
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    if table.num_rows != len(chunk):
        return None
    return table.combine_chunks()


def _check(
    topic: str, table: pa.Table, contract: Contract, out_schema: pa.Schema
) -> tuple[pa.Table, np.ndarray]:
    """The chunk's rows in the landed columns, and which of them the fast path takes."""
    ok = _true(pc.equal(table["schema_version"], 1))
    columns: dict[str, pa.Array] = {}
    for spec in _TOPIC_FIELDS[topic]:
        column = table[spec.name].chunk(0) if table[spec.name].num_chunks else pa.nulls(0)
        if spec.rule == "features":
            text, fine = _features_json(column, contract)
            columns[spec.name] = text
            ok &= fine
            continue
        present = _true(pc.is_valid(column))
        if spec.rule == "id":
            fine = _ids_fine(column)
        elif spec.rule == "text":
            length = pc.utf8_length(column)
            fine = _true(
                pc.and_(pc.greater_equal(length, 1), pc.less_equal(length, spec.max_length))
            )
        elif spec.rule == "literal":
            fine = _true(pc.is_in(column, pa.array(spec.allowed)))
        elif spec.rule == "finite":
            fine = _finite_within(column, spec.minimum, spec.maximum)
        elif spec.rule == "boolean":
            fine = present
        else:  # time
            fine = _true(pc.match_substring_regex(column, _TIME_PATTERN))
            column = pc.if_else(pa.array(fine), column, _VALID_TIME).cast(_TIMESTAMP)
        ok &= fine if spec.required else (fine | ~present)
        columns[spec.name] = column
    if topic == Topics.CUSTOMERS:
        for feature in contract.features:
            column, fine = _feature_column(feature, table[feature.name].chunk(0))
            columns[feature.name] = column
            ok &= fine
    return pa.table(columns, schema=out_schema), ok


def _ids_fine(column: pa.Array) -> np.ndarray:
    """The ids that match ``_ID_PATTERN``. When every byte in the column's data is printable
    ASCII, that is the ids of 1 to 128 bytes (read off the buffers); otherwise the regex."""
    length = pc.binary_length(column)
    fine = _true(pc.and_(pc.greater_equal(length, 1), pc.less_equal(length, 128)))
    _, offsets, data = column.buffers()
    if data is None or column.type != pa.string():
        return fine if data is None else _true(pc.match_substring_regex(column, _ID_PATTERN))
    bounds = np.frombuffer(offsets, np.int32)[[column.offset, column.offset + len(column)]]
    text = np.frombuffer(data, np.uint8)[bounds[0] : bounds[1]]
    if np.all((text >= 0x20) & (text <= 0x7E)):
        return fine
    return _true(pc.match_substring_regex(column, _ID_PATTERN))


def _true(mask: pa.Array) -> np.ndarray:
    return mask.fill_null(False).to_numpy(zero_copy_only=False)


def _finite_within(column: pa.Array, minimum: float | None, maximum: float | None) -> np.ndarray:
    numbers = column.to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(invalid="ignore"):
        fine = np.isfinite(numbers) & (np.abs(numbers) <= _EXACT_FLOAT)
        if minimum is not None:
            fine &= numbers >= minimum
        if maximum is not None:
            fine &= numbers <= maximum
    return fine


def _feature_column(feature: Feature, column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A parsed feature column in its landed form, and the rows the fast path takes (missing
    values only where the contract fills them; categories canonical)."""
    present = _true(pc.is_valid(column))
    if feature.kind in ("integer", "number"):
        fine = _finite_within(column, feature.minimum, feature.maximum)
    elif feature.kind == "boolean":
        fine = present
    else:
        encoded = pc.dictionary_encode(column)
        spelled = encoded.dictionary.to_pylist()
        canonical = pa.array([feature.canonical(s) for s in spelled], pa.string())
        column = canonical.take(encoded.indices)
        fine = _true(pc.is_valid(column))
    if feature.missing != "reject":
        fine = fine | ~present
    return column, fine


def _features_json(column: pa.Array, contract: Contract) -> tuple[pa.Array, np.ndarray]:
    """Predictions' ``features`` objects as the JSON text landing stores (the message model's
    dump: every feature in contract order, categories canonical), and the rows taken."""
    present = _true(pc.is_valid(column))
    fine = np.ones(len(column), dtype=bool)
    values: list[list[Any]] = []
    for index, feature in enumerate(contract.features):
        checked, feature_fine = _feature_column(feature, column.field(index))
        fine &= feature_fine | ~present
        if feature.kind == "integer":
            values.append(checked.cast(pa.int64(), safe=False).to_pylist())
        else:
            values.append(checked.to_pylist())
    names = contract.names
    texts = [
        orjson.dumps(dict(zip(names, row, strict=True))).decode() if has else None
        for has, row in zip(present.tolist(), zip(*values, strict=True), strict=True)
    ]
    return pa.array(texts, pa.string()), fine


def _decode_rows(
    topic: str, values: Sequence[bytes | None], contract: Contract
) -> list[dict[str, Any] | MessageError]:
    """The row decoders: each message's row (as landed) or its dead-letter reason."""
    if topic == Topics.CUSTOMERS:
        return decode_customer_events(values, contract)
    decoded: list[dict[str, Any] | MessageError] = []
    for raw in values:
        try:
            message = decode_message(topic, raw, contract)
        except MessageError as exc:
            decoded.append(exc)
            continue
        row = message.model_dump()
        row.pop("schema_version", None)
        if row.get("features") is not None:
            row["features"] = orjson.dumps(row["features"]).decode()
        decoded.append(row)
    return decoded
