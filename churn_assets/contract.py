"""The feature contract: the model's input features declared as data (``config/features.yaml``).

Each feature has a name, a kind (``integer``, ``number``, ``category``, ``boolean``), bounds for
numbers, the allowed categories with the spellings each accepts, a description and a policy for
missing values. Categories match case-, space- and punctuation-insensitively (``"Two year"``,
``"two_year"`` and ``"TWO-YEAR"`` are one spelling) plus explicit aliases (``"Bank transfer
(automatic)"``), and are stored under their canonical name.

:func:`load_contract` reads and checks a contract; a bad one raises :class:`ContractError`
naming the feature and the problem, so a start with it stops at once with that message.
"""

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

__all__ = [
    "CONTRACT_FORMAT",
    "Contract",
    "ContractError",
    "Feature",
    "contract_from_dict",
    "features_model",
    "load_contract",
    "spelling_key",
]

CONTRACT_FORMAT = 1
KINDS = ("integer", "number", "category", "boolean")
MISSING_POLICIES = ("reject", "median", "most_frequent")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
FEATURE_KEYS = {"name", "kind", "min", "max", "categories", "description", "missing"}

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
    _spellings: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def canonical(self, value: str) -> str | None:
        """The canonical category that ``value`` spells, or ``None``."""
        return self._spellings.get(spelling_key(value))

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
        return data


@dataclass(frozen=True)
class Contract:
    """The features, in order, and the contract's digest (of its canonical JSON form)."""

    features: tuple[Feature, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def of_kind(self, *kinds: Kind) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind in kinds)

    def feature(self, name: str) -> Feature:
        for candidate in self.features:
            if candidate.name == name:
                return candidate
        raise KeyError(f"no feature {name!r} in the contract; features: {', '.join(self.names)}")

    def as_dict(self) -> dict[str, Any]:
        return {"format": CONTRACT_FORMAT, "features": [f.as_dict() for f in self.features]}

    @property
    def digest(self) -> str:
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
    unknown = set(raw) - {"format", "features"}
    if unknown:
        raise ContractError(f"unknown keys {sorted(unknown)} (allowed: format, features)")
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
    return Contract(tuple(features))


def _feature(position: int, entry: Any) -> Feature:
    if not isinstance(entry, dict):
        raise ContractError(f"features[{position}] must be a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ContractError(
            f"features[{position}]: name {name!r} must be lower-case letters, digits and "
            "underscores, starting with a letter (at most 64)"
        )

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
    return Feature(
        name=name,
        kind=kind,
        description=description,
        minimum=minimum,
        maximum=maximum,
        categories=categories,
        missing=missing,
        _spellings=spellings,
    )


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


def features_model(
    contract: Contract, *, name: str = "CustomerFeatures", base: type[Any] | None = None
) -> type[Any]:
    """A pydantic model of ``contract``'s features, with the same strict rules as
    :func:`churn_assets.validation.check_columns`: categories accept their spellings and are
    stored canonically, a bool or a string is never a number, NaN and infinities are refused.
    A feature whose missing values the contract fills is optional (``None``)."""
    from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, create_model

    fields: dict[str, Any] = {}
    for feature in contract.features:
        bounds = {
            key: value
            for key, value in (("ge", feature.minimum), ("le", feature.maximum))
            if value is not None
        }
        if feature.kind == "integer":
            # The bounds before the validator: they stay in the JSON schema (minimum/maximum).
            annotation: Any = Annotated[
                int,
                Field(description=feature.description, **bounds),
                BeforeValidator(_whole_number),
            ]
        elif feature.kind == "number":
            annotation = Annotated[
                float,
                Field(strict=True, description=feature.description, **bounds),
                AfterValidator(_finite),
            ]
        elif feature.kind == "boolean":
            annotation = Annotated[bool, Field(strict=True, description=feature.description)]
        else:
            spellings = [s for c, aliases in feature.categories.items() for s in (c, *aliases)]
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
