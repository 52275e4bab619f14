"""The feature contract: the model's input features declared as data (``config/features.yaml``).

Each feature has a name, a kind (``integer``, ``number``, ``category``, ``boolean``), bounds for
numbers, the allowed categories with the spellings each accepts, a description and a policy for
missing values. Categories match case-, space- and punctuation-insensitively (``"Two year"``,
``"two_year"`` and ``"TWO-YEAR"`` are one spelling) plus explicit aliases (``"Bank transfer
(automatic)"``), and are stored under their canonical name.

:func:`load_contract` reads and checks a contract; a bad one raises :class:`ContractError`
naming the feature and the problem, so a start with it stops at once with that message.

Besides the inputs, a contract may declare ``derived`` model features: arithmetic over numeric
and boolean inputs (``+ - * /``, ``min``, ``max``, numbers), computed by the transformer from one
record's own values; and per feature a ``trend`` name, a history feature (latest value minus its
30-day mean) that ``customer_features`` adds.
"""

import ast
import functools
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, overload

import yaml

if TYPE_CHECKING:  # NumPy is imported where an expression is evaluated, not at import time.
    import numpy as np
    import numpy.typing as npt
    from pydantic import BaseModel, JsonValue

__all__ = [
    "CONTRACT_FORMAT",
    "Contract",
    "ContractError",
    "Derived",
    "Feature",
    "evaluate_derived",
    "contract_from_dict",
    "features_model",
    "load_contract",
    "spelling_key",
]

CONTRACT_FORMAT = 1
KINDS = ("integer", "number", "category", "boolean")
MISSING_POLICIES = ("reject", "median", "most_frequent")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
FEATURE_KEYS = {
    "name",
    "kind",
    "min",
    "max",
    "categories",
    "description",
    "missing",
    "trend",
    "example",
}
MATCHED_SPELLINGS = 1024  # exact texts remembered per feature
DERIVED_KEYS = {"name", "expression", "description"}
EXPRESSION_FUNCTIONS = {"max", "min"}

Kind = Literal["integer", "number", "category", "boolean"]


class ContractError(ValueError):
    """The contract cannot be used; the message names the feature and the problem."""


def spelling_key(text: str) -> str:
    """What two spellings of one category share: case, accents' compatibility forms, spaces and
    punctuation dropped (``"Month-to-month"`` and ``"month_to_month"`` -> ``monthtomonth``)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in folded if ch.isalnum())


@dataclass(frozen=True)
class Feature:
    """One input feature of the contract."""

    name: str
    kind: Kind
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    missing: str = "reject"
    trend: str | None = None
    example: Any = None
    _spellings: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # Exact texts already matched (bounded): data repeats a handful of spellings.
    _matched: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def canonical(self, value: str) -> str | None:
        """The canonical category that ``value`` spells, or ``None``."""
        found = self._matched.get(value)
        if found is None:
            found = self._spellings.get(spelling_key(value))
            if found is not None and len(self._matched) < MATCHED_SPELLINGS:
                self._matched[value] = found
        return found

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.description:
            data["description"] = self.description
        if self.minimum is not None:
            data["min"] = self.minimum
        if self.maximum is not None:
            data["max"] = self.maximum
        if self.kind == "category":
            data["categories"] = {k: list(v) for k, v in self.categories.items()}
        data["missing"] = self.missing
        if self.trend:
            data["trend"] = self.trend
        if self.example is not None:
            data["example"] = self.example
        return data


@dataclass(frozen=True)
class Derived:
    """A model feature computed from one record's numeric and boolean inputs."""

    name: str
    expression: str
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "expression": self.expression}
        if self.description:
            data["description"] = self.description
        return data


@dataclass(frozen=True)
class Contract:
    """The features, in order, and the contract's digest (of its canonical JSON form)."""

    features: tuple[Feature, ...]
    derived: tuple[Derived, ...] = ()

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def of_kind(self, *kinds: Kind) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind in kinds)

    def feature(self, name: str) -> Feature:
        for candidate in self.features:
            if candidate.name == name:
                return candidate
        raise KeyError(f"no feature {name!r} in the contract; features: {', '.join(self.names)}")

    @functools.cached_property
    def numeric_names(self) -> tuple[str, ...]:
        """Integer and number features, in contract order."""
        return tuple(f.name for f in self.of_kind("integer", "number"))

    @functools.cached_property
    def boolean_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.of_kind("boolean"))

    @property
    def category_values(self) -> dict[str, tuple[str, ...]]:
        """Each category feature's canonical values, in contract order."""
        return {f.name: tuple(f.categories) for f in self.of_kind("category")}

    @property
    def trends(self) -> dict[str, str]:
        """History feature name -> the feature whose trend it is."""
        return {f.trend: f.name for f in self.features if f.trend}

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": CONTRACT_FORMAT,
            "features": [f.as_dict() for f in self.features],
        }
        if self.derived:
            data["derived"] = [d.as_dict() for d in self.derived]
        return data

    def missing_inputs(self, carried: "Contract") -> list[str]:
        """What this contract needs that requests shaped by ``carried`` cannot give: features it
        lacks, of another kind, or categories it does not accept. Empty when compatible."""
        problems = []
        for feature in self.features:
            try:
                other = carried.feature(feature.name)
            except KeyError:
                problems.append(f"{feature.name} (not in the champion's contract)")
                continue
            if other.kind != feature.kind:
                problems.append(
                    f"{feature.name} (a {feature.kind}; the champion's is {other.kind})"
                )
            elif feature.kind == "category":
                extra = sorted(set(other.categories) - set(feature.categories))
                if extra:
                    problems.append(f"{feature.name} (does not know {', '.join(extra)})")
        return problems

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON form (computed once: messages look schemas up by it)."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_contract(path: Path) -> Contract:
    """Read and check the contract at ``path``."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ContractError(f"feature contract not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ContractError(f"feature contract {path} is not valid YAML: {exc}") from None
    try:
        return contract_from_dict(raw)
    except ContractError as exc:
        raise ContractError(f"feature contract {path}: {exc}") from None


def contract_from_dict(raw: Any) -> Contract:
    """Check a contract given as data (the YAML file's content)."""
    if not isinstance(raw, dict):
        raise ContractError("expected a mapping with 'format' and 'features'")
    unknown = set(raw) - {"format", "features", "derived"}
    if unknown:
        raise ContractError(f"unknown keys {sorted(unknown)} (allowed: format, features, derived)")
    if raw.get("format") != CONTRACT_FORMAT:
        raise ContractError(f"format must be {CONTRACT_FORMAT}, not {raw.get('format')!r}")
    entries = raw.get("features")
    if not isinstance(entries, list) or not entries:
        raise ContractError("'features' must be a non-empty list")
    features: list[Feature] = []
    seen: set[str] = set()
    for position, entry in enumerate(entries):
        feature = _feature(position, entry)
        if feature.name in seen:
            raise ContractError(f"feature {feature.name!r}: the name is declared twice")
        seen.add(feature.name)
        features.append(feature)
    trends = [f.trend for f in features if f.trend]
    for feature in features:
        if feature.trend and (feature.trend in seen or trends.count(feature.trend) > 1):
            raise ContractError(f"feature {feature.name!r}: trend name {feature.trend!r} is taken")
    derived = _derived_list(raw.get("derived", []), features, seen | set(trends))
    return Contract(tuple(features), derived)


def _derived_list(raw: Any, features: list[Feature], taken: set[str]) -> tuple[Derived, ...]:
    if not isinstance(raw, list):
        raise ContractError("'derived' must be a list")
    inputs = {f.name for f in features if f.kind in ("integer", "number", "boolean")}
    derived: list[Derived] = []
    for position, entry in enumerate(raw):
        name = _entry_name(f"derived[{position}]", entry)
        unknown = set(entry) - DERIVED_KEYS
        if unknown:
            raise ContractError(f"derived feature {name!r}: unknown keys {sorted(unknown)}")
        if name in taken:
            raise ContractError(f"derived feature {name!r}: the name is declared twice")
        expression = entry.get("expression")
        if not isinstance(expression, str):
            raise ContractError(f"derived feature {name!r}: expression must be text")
        description = entry.get("description", "")
        if not isinstance(description, str):
            raise ContractError(f"derived feature {name!r}: description must be text")
        try:
            _parse_expression(expression, inputs | {d.name for d in derived})
        except ContractError as exc:
            raise ContractError(f"derived feature {name!r}: {exc}") from None
        taken.add(name)
        derived.append(Derived(name, expression, description))
    return tuple(derived)


def _parse_expression(expression: str, names: set[str]) -> ast.Expression:
    """Parse ``expression``, allowing only arithmetic over ``names`` and numbers."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ContractError(f"expression {expression!r} is not valid: {exc.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in names and node.id not in EXPRESSION_FUNCTIONS:
                raise ContractError(
                    f"expression uses {node.id!r}, which is not a numeric or boolean feature "
                    "declared before it"
                )
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in EXPRESSION_FUNCTIONS:
                raise ContractError("expression may call only max and min")
            if len(node.args) != 2 or node.keywords:
                raise ContractError(f"{node.func.id} takes two arguments")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise ContractError(f"expression constant {node.value!r} is not a number")
        elif not isinstance(
            node,
            ast.Expression
            | ast.BinOp
            | ast.UnaryOp
            | ast.Add
            | ast.Sub
            | ast.Mult
            | ast.Div
            | ast.USub
            | ast.UAdd
            | ast.Load,
        ):
            raise ContractError(
                f"expression {expression!r} may use only + - * /, max, min, numbers and features"
            )
    return tree


def evaluate_derived(
    derived: Derived, columns: Mapping[str, "npt.NDArray[np.float64]"]
) -> "npt.NDArray[np.float64]":
    """``derived``'s values from float arrays of its inputs (non-finite results become NaN,
    which the transformer fills like a missing value)."""
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        result = np.asarray(_compiled(derived.expression)(columns), dtype=np.float64)
    return np.where(np.isfinite(result), result, np.nan)


# A compiled derived expression: input columns (float arrays) to its values, an array or, for an
# expression of constants alone, a number.
_Columns = Mapping[str, "npt.NDArray[np.float64]"]
_Compiled = Callable[[_Columns], "npt.NDArray[np.float64] | float"]


@functools.lru_cache(maxsize=1024)
def _compiled(expression: str) -> _Compiled:
    """``expression`` (already checked by the contract) as a function of the input columns,
    built once per expression: serving evaluates it for every request."""
    import numpy as np

    def build(node: ast.AST) -> _Compiled:
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.Name):
            name = node.id
            return lambda columns: columns[name]
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            constant = float(node.value)
            return lambda columns: constant
        if isinstance(node, ast.UnaryOp):
            operand = build(node.operand)
            if isinstance(node.op, ast.USub):
                return lambda columns: -operand(columns)
            return operand
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            function: np.ufunc = np.maximum if node.func.id == "max" else np.minimum
            first, second = build(node.args[0]), build(node.args[1])
            return lambda columns: function(first(columns), second(columns))
        if not isinstance(node, ast.BinOp):
            raise ContractError(f"cannot evaluate {ast.dump(node)} in {expression!r}")
        left, right = build(node.left), build(node.right)
        operations: dict[type[ast.operator], np.ufunc] = {
            ast.Add: np.add,
            ast.Sub: np.subtract,
            ast.Mult: np.multiply,
        }
        operation = operations.get(type(node.op), np.true_divide)
        return lambda columns: operation(left(columns), right(columns))

    return build(ast.parse(expression, mode="eval"))


def _entry_name(where: str, entry: Any) -> str:
    """The name of a features or derived entry (a mapping with a well-formed ``name``)."""
    if not isinstance(entry, dict):
        raise ContractError(f"{where} must be a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ContractError(
            f"{where}: name {name!r} must be lower-case letters, digits and underscores, "
            "starting with a letter (at most 64)"
        )
    return name


def _feature(position: int, entry: Any) -> Feature:
    name = _entry_name(f"features[{position}]", entry)

    def bad(problem: str) -> ContractError:
        return ContractError(f"feature {name!r}: {problem}")

    unknown = set(entry) - FEATURE_KEYS
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(FEATURE_KEYS))})")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise bad(f"unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise bad("description must be text")
    missing = entry.get("missing", "reject")
    allowed = ("reject", "median") if kind in ("integer", "number") else ("reject", "most_frequent")
    if missing not in allowed:
        raise bad(f"missing must be one of {', '.join(allowed)} for a {kind}, not {missing!r}")
    minimum, maximum = entry.get("min"), entry.get("max")
    if kind in ("integer", "number"):
        minimum, maximum = _bound(bad, "min", minimum, kind), _bound(bad, "max", maximum, kind)
        if minimum is not None and maximum is not None and minimum > maximum:
            raise bad(f"bounds reversed: min {minimum} is above max {maximum}")
    elif minimum is not None or maximum is not None:
        raise bad(f"min and max apply to numbers, not to a {kind}")
    categories: dict[str, tuple[str, ...]] = {}
    spellings: dict[str, str] = {}
    if kind == "category":
        categories, spellings = _categories(bad, entry.get("categories"))
    elif "categories" in entry:
        raise bad(f"categories apply to a category, not to a {kind}")
    elif kind == "boolean":
        spellings = {spelling_key(s): "true" for s in ("true", "yes", "y", "1")}
        spellings |= {spelling_key(s): "false" for s in ("false", "no", "n", "0")}
    trend = entry.get("trend")
    if trend is not None:
        if kind not in ("integer", "number"):
            raise bad(f"a trend applies to numbers, not to a {kind}")
        if not isinstance(trend, str) or not NAME.match(trend):
            raise bad(f"trend name {trend!r} must be lower-case letters, digits and underscores")
    feature = Feature(
        name=name,
        kind=kind,
        description=description,
        minimum=minimum,
        maximum=maximum,
        categories=categories,
        missing=missing,
        trend=trend,
        _spellings=spellings,
    )
    example = entry.get("example")
    if example is not None:
        problem = _example_problem(feature, example)
        if problem:
            raise bad(f"example {example!r} {problem}")
    return replace(feature, example=example)


def _example_problem(feature: Feature, example: Any) -> str | None:
    """Why ``example`` is not a valid request value of ``feature`` (``None`` when it is)."""
    if feature.kind == "boolean":
        return None if isinstance(example, bool) else "is not true or false"
    if feature.kind == "category":
        if not isinstance(example, str) or feature.canonical(example) is None:
            return f"is not a spelling of one of {', '.join(feature.categories)}"
        return None
    if isinstance(example, bool) or not isinstance(example, int | float):
        return "is not a number"
    if feature.kind == "integer" and not float(example).is_integer():
        return "is not a whole number"
    low, high = feature.minimum, feature.maximum
    if (low is not None and example < low) or (high is not None and example > high):
        return f"is outside [{low}, {high}]"
    return None


def _bound(bad: Any, key: str, value: Any, kind: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"{key} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise bad(f"{key} must be finite, not {value!r}")
    if kind == "integer" and not float(value).is_integer():
        raise bad(f"{key} of an integer must be a whole number, not {value!r}")
    return value


def _categories(bad: Any, raw: Any) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """``{canonical: [alias, ...]}`` (a plain list means no aliases) and the spelling index."""
    if isinstance(raw, list):
        raw = {value: [] for value in raw}
    if not isinstance(raw, dict) or not raw:
        raise bad("a category needs 'categories': a list, or a mapping of value to aliases")
    categories: dict[str, tuple[str, ...]] = {}
    spellings: dict[str, str] = {}
    for canonical, aliases in raw.items():
        if not isinstance(canonical, str) or not spelling_key(canonical):
            raise bad(f"category {canonical!r} must be text with a letter or digit")
        if aliases is None:
            aliases = []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise bad(f"aliases of category {canonical!r} must be a list of text")
        for spelling in (canonical, *aliases):
            key = spelling_key(spelling)
            if not key:
                raise bad(f"alias {spelling!r} of {canonical!r} has no letter or digit")
            other = spellings.get(key)
            if other is not None and other != canonical:
                raise bad(
                    f"{spelling!r} would spell both {other!r} and {canonical!r} "
                    "(spellings match without case, spaces and punctuation)"
                )
            spellings[key] = canonical
        categories[canonical] = tuple(aliases)
    return categories, spellings


@overload
def features_model(
    contract: Contract, *, name: str = "CustomerFeatures", base: None = None
) -> type["BaseModel"]: ...


@overload
def features_model[ModelT: BaseModel](
    contract: Contract, *, name: str = "CustomerFeatures", base: type[ModelT]
) -> type[ModelT]: ...


def features_model[ModelT: BaseModel](
    contract: Contract, *, name: str = "CustomerFeatures", base: type[ModelT] | None = None
) -> type["BaseModel"] | type[ModelT]:
    """A pydantic model of ``contract``'s features, with the same strict rules as
    :func:`churn_assets.validation.check_columns`: categories accept their spellings and are
    stored canonically, a bool or a string is never a number, NaN and infinities are refused.
    A feature whose missing values the contract fills is optional (``None``)."""
    from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, create_model

    fields: dict[str, Any] = {}
    for feature in contract.features:
        if feature.kind == "integer":
            # The bounds before the validator: they stay in the JSON schema (minimum/maximum).
            annotation: Any = Annotated[
                int,
                Field(description=feature.description, ge=feature.minimum, le=feature.maximum),
                BeforeValidator(_whole_number),
            ]
        elif feature.kind == "number":
            annotation = Annotated[
                float,
                Field(
                    strict=True,
                    description=feature.description,
                    ge=feature.minimum,
                    le=feature.maximum,
                ),
                AfterValidator(_finite),
            ]
        elif feature.kind == "boolean":
            annotation = Annotated[bool, Field(strict=True, description=feature.description)]
        else:
            spellings: list[JsonValue] = [
                s for c, aliases in feature.categories.items() for s in (c, *aliases)
            ]
            annotation = Annotated[
                str,
                BeforeValidator(_canonical_of(feature)),
                Field(
                    description=(
                        f"{feature.description + '; ' if feature.description else ''}one of "
                        f"{', '.join(feature.categories)} (any case, spacing or punctuation, "
                        "or a listed alias)"
                    ),
                    json_schema_extra={"enum": spellings},
                ),
            ]
        if feature.missing == "reject":
            fields[feature.name] = (annotation, ...)
        else:
            fields[feature.name] = (annotation | None, None)
    config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    if base is None:
        return create_model(name, __config__=config, **fields)
    return create_model(name, __base__=base, **fields)


def _whole_number(value: Any) -> Any:
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"must be a whole number, not {type(value).__name__}")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number (NaN and infinity are rejected)")
    return value


def _canonical_of(feature: Feature) -> Any:
    def canonical(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be text, not {type(value).__name__}")
        found = feature.canonical(value)
        if found is None:
            raise ValueError(
                f"unknown category {value[:60]!r}; one of {', '.join(feature.categories)}"
            )
        return found

    return canonical
