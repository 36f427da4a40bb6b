"""Strict JSON <-> frozen-dataclass mapping, with serde's error messages.

Firecracker's configuration types are Rust structs deserialized by serde with
`#[serde(deny_unknown_fields)]`. This module reproduces that behaviour for
already-decoded JSON (what `json.loads` returns):

* an object is read key by key in document order: an unknown key fails at
  once (``unknown field `foo`, expected one of `a`, `b```), a known key's
  value is read by the field's reader; afterwards the first absent required
  field fails (``missing field `a```);
* readers are strict about JSON types: a boolean is not an integer, a float
  is not an integer (even ``2.0``), integers are range-checked against their
  Rust type (``u8``, ``u32``, ...), a string is a string;
* optional fields (Rust ``Option<T>``) accept ``null`` and absence as None;
  fields with a serde default accept absence but not ``null``.

`Schema.dump` goes the other way, writing Firecracker's field names in
Firecracker's order; a None optional is written as ``null`` unless the field
is marked ``skip_none`` (serde's ``skip_serializing_if = "Option::is_none"``),
exactly as Firecracker's ``GET /vm/config`` does.

`loads` decodes JSON text the way serde_json does: duplicate keys, NaN and
Infinity are errors, not silently accepted.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

from .errors import (
    ConfigError,
    DuplicateField,
    InvalidJson,
    InvalidType,
    InvalidValue,
    MissingField,
    UnknownField,
    UnknownVariant,
    join_path,
)

__all__ = [
    "Json",
    "Reader",
    "Field",
    "Schema",
    "ConfigType",
    "loads",
    "describe",
    "one_of",
    "read_bool",
    "read_str",
    "unsigned",
    "U8",
    "U16",
    "U32",
    "U64",
    "USIZE",
    "enum_of",
    "optional",
    "sequence_of",
    "nested",
    "str_map",
    "to_json_value",
]

Json = None | bool | int | float | str | list["Json"] | dict[str, "Json"]

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

#: ``reader(value, path)`` parses one decoded JSON value found at ``path``.
Reader = Callable[[object, str], T]

# How much of an offending string or number an error message quotes.
_QUOTE_LIMIT = 80


# --- messages ----------------------------------------------------------------


def describe(value: object) -> str:
    """How serde_json names an unexpected value: ``integer `5```, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        if value.bit_length() > 4 * _QUOTE_LIMIT:
            # Too long to quote (and str() refuses beyond 4300 digits).
            return f"integer of {value.bit_length()} bits"
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value!r}`"
    if isinstance(value, str):
        shown = value if len(value) <= _QUOTE_LIMIT else value[:_QUOTE_LIMIT] + "..."
        return f"string {json.dumps(shown, ensure_ascii=False)}"
    if isinstance(value, (list, tuple)):
        return "sequence"
    if isinstance(value, dict):
        return "map"
    return f"value of Python type {type(value).__name__}"


def one_of(names: Sequence[str]) -> str:
    """serde's list of alternatives: ``expected `a` or `b```, ``expected one of ...``."""
    quoted = [f"`{name}`" for name in names]
    if not quoted:
        return "there are no alternatives"
    if len(quoted) == 1:
        return f"expected {quoted[0]}"
    if len(quoted) == 2:
        return f"expected {quoted[0]} or {quoted[1]}"
    return "expected one of " + ", ".join(quoted)


def _key_text(key: object) -> str:
    text = key if isinstance(key, str) else describe(key)
    return text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."


# --- JSON text ---------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateField(f"duplicate field `{_key_text(key)}`")
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise InvalidJson(f"Invalid JSON: {name} is not a valid JSON value")


def loads(text: str | bytes) -> Json:
    """Decode JSON strictly: bad UTF-8, duplicate keys, NaN/Infinity are errors.

    Raises `InvalidJson` (or `DuplicateField`), never `json.JSONDecodeError`.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJson(
                f"Invalid JSON: invalid UTF-8 at byte {exc.start}"
            ) from exc
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except ConfigError:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidJson(
            f"Invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except ValueError as exc:  # e.g. an integer literal beyond int's digit limit
        raise InvalidJson(f"Invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidJson("Invalid JSON: recursion limit exceeded") from exc


# --- readers -------------------------------------------------------------------


def read_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidType(f"invalid type: {describe(value)}, expected a boolean", path=path)
    return value


def read_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise InvalidType(f"invalid type: {describe(value)}, expected a string", path=path)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # json.loads lets "\ud800" through; serde_json (and the OS) do not.
        raise InvalidValue(
            f"invalid value: string with a lone surrogate at index {exc.start}, "
            "expected valid UTF-8",
            path=path,
        ) from None
    return value


def unsigned(rust_name: str, bits: int) -> Reader[int]:
    """A reader for a Rust unsigned integer type (``u8`` ... ``u64``)."""
    limit = (1 << bits) - 1

    def read(value: object, path: str) -> int:
        # bool is a subclass of int in Python; JSON true is not a number.
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidType(
                f"invalid type: {describe(value)}, expected {rust_name}", path=path
            )
        if not 0 <= value <= limit:
            raise InvalidValue(
                f"invalid value: {describe(value)}, expected {rust_name}", path=path
            )
        return value

    read.__name__ = f"read_{rust_name}"
    return read


U8 = unsigned("u8", 8)
U16 = unsigned("u16", 16)
U32 = unsigned("u32", 32)
U64 = unsigned("u64", 64)
# Firecracker runs on 64-bit hosts only.
USIZE = unsigned("usize", 64)


def enum_of(
    cls: type[E],
    *,
    accepted: Sequence[E] | None = None,
) -> Reader[E]:
    """A reader for a string enumeration (members' values are the JSON strings).

    `accepted` restricts the members a JSON value may name (others are
    reported as unknown variants), e.g. CPU templates of another architecture.
    """
    members = list(accepted) if accepted is not None else list(cls)
    by_value = {member.value: member for member in members}
    alternatives = one_of([str(member.value) for member in members])

    def read(value: object, path: str) -> E:
        if not isinstance(value, str):
            raise InvalidType(
                f"invalid type: {describe(value)}, {alternatives}", path=path
            )
        try:
            return by_value[value]
        except KeyError:
            raise UnknownVariant(
                f"unknown variant `{_key_text(value)}`, {alternatives}", path=path
            ) from None

    read.__name__ = f"read_{cls.__name__}"
    return read


def optional(reader: Reader[T]) -> Reader[T | None]:
    """Rust ``Option<T>``: ``null`` reads as None."""

    def read(value: object, path: str) -> T | None:
        return None if value is None else reader(value, path)

    read.__name__ = f"optional_{getattr(reader, '__name__', 'value')}"
    return read


def sequence_of(reader: Reader[T]) -> Reader[tuple[T, ...]]:
    """Rust ``Vec<T>``, read into a tuple (frozen dataclasses stay hashable)."""

    def read(value: object, path: str) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise InvalidType(
                f"invalid type: {describe(value)}, expected a sequence", path=path
            )
        return tuple(reader(item, f"{path}[{index}]") for index, item in enumerate(value))

    read.__name__ = f"sequence_of_{getattr(reader, '__name__', 'value')}"
    return read


def str_map(value: object, path: str) -> tuple[tuple[str, str], ...]:
    """Rust ``BTreeMap<String, String>``: a tuple of pairs sorted by key."""
    if not isinstance(value, dict):
        raise InvalidType(f"invalid type: {describe(value)}, expected a map", path=path)
    pairs = []
    for key, item in value.items():
        if not isinstance(key, str):
            raise InvalidType(
                f"invalid type: {describe(key)}, expected a string key", path=path
            )
        pairs.append((key, read_str(item, join_path(path, key))))
    return tuple(sorted(pairs))


def nested(cls: Any) -> Reader[Any]:
    """A reader for another config type (anything with ``from_json``)."""

    def read(value: object, path: str) -> Any:
        return cls.from_json(value, path=path)

    read.__name__ = f"read_{cls.__name__}"
    return read


# --- writing -------------------------------------------------------------------


def to_json_value(value: object) -> Json:
    """Turn a parsed config value back into plain JSON data."""
    # Enum first: a StrEnum member is also a str.
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    if isinstance(value, (tuple, list)):
        return [to_json_value(item) for item in value]
    if isinstance(value, ipaddress.IPv4Address):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): to_json_value(item) for key, item in value.items()}
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# --- objects -------------------------------------------------------------------

_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One JSON key of an object and the dataclass attribute it fills.

    A field is required unless it has a `default`. `skip_none` omits the key
    from `Schema.dump` when the value is None. `write` overrides how the
    value is written (default: `to_json_value`). A field that is not `stored`
    is read (so its value is checked) but not kept.
    """

    key: str
    read: Reader[Any]
    default: object = _REQUIRED
    skip_none: bool = False
    write: Callable[[Any], Json] | None = None
    attr: str = ""
    # False for a key that is checked on input but not kept: `dump` always
    # writes its default (e.g. a Firecracker feature Ember only accepts empty).
    stored: bool = True

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    @property
    def attribute(self) -> str:
        return self.attr or self.key.replace("-", "_")

    @classmethod
    def option(
        cls,
        key: str,
        read: Reader[Any],
        *,
        skip_none: bool = False,
        write: Callable[[Any], Json] | None = None,
    ) -> Field:
        """A Rust ``Option<T>`` field: absent or ``null`` reads as None."""
        return cls(key, optional(read), default=None, skip_none=skip_none, write=write)


class Schema:
    """The fields of one JSON object type, in Firecracker's declaration order."""

    def __init__(self, name: str, fields: Sequence[Field]) -> None:
        self.name = name
        self.fields = tuple(fields)
        self._by_key = {field.key: field for field in self.fields}
        if len(self._by_key) != len(self.fields):
            raise ValueError(f"schema {name} declares a key twice")
        self._expected = one_of([field.key for field in self.fields])

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(field.key for field in self.fields)

    @property
    def required_keys(self) -> tuple[str, ...]:
        return tuple(field.key for field in self.fields if field.required)

    def parse(self, value: object, path: str = "") -> dict[str, Any]:
        """Read a decoded JSON object into ``{attribute: parsed value}``."""
        if not isinstance(value, dict):
            raise InvalidType(
                f"invalid type: {describe(value)}, expected struct {self.name}", path=path
            )
        out: dict[str, Any] = {}
        for key, raw in value.items():
            field = self._by_key.get(key) if isinstance(key, str) else None
            if field is None:
                raise UnknownField(
                    f"unknown field `{_key_text(key)}`, {self._expected}", path=path
                )
            parsed = field.read(raw, join_path(path, key))
            if field.stored:
                out[field.attribute] = parsed
        for field in self.fields:
            if field.key not in value:
                if field.required:
                    raise MissingField(f"missing field `{field.key}`", path=path)
                if field.stored:
                    out[field.attribute] = field.default
        return out

    def dump(self, obj: object) -> dict[str, Json]:
        """Write `obj`'s attributes as a JSON object, Firecracker's way."""
        out: dict[str, Json] = {}
        for field in self.fields:
            value = getattr(obj, field.attribute) if field.stored else field.default
            if value is None and field.skip_none:
                continue
            if value is not None and field.write is not None:
                out[field.key] = field.write(value)
            else:
                out[field.key] = to_json_value(value)
        return out

    def __repr__(self) -> str:
        return f"<Schema {self.name} keys={list(self.keys)}>"


class ConfigType:
    """Mixin for frozen dataclasses described by a class attribute `SCHEMA`.

    Gives `from_json` (strict parse, no semantic checks), `to_json` and a
    default `validate` that checks nothing; types with semantic rules
    override `validate`.
    """

    SCHEMA: ClassVar[Schema]

    @classmethod
    def from_json(cls, obj: object, *, path: str = "") -> Self:
        """Parse decoded JSON; raises `ConfigParseError` on a shape mismatch."""
        return cls(**cls.SCHEMA.parse(obj, path))

    def to_json(self) -> dict[str, Json]:
        """The JSON object Firecracker's API would return for this value."""
        return self.SCHEMA.dump(self)

    def validate(self) -> None:
        """Check semantic rules; raises a `ConfigError` subclass. Pure (no I/O)."""
