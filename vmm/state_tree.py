"""Component state dataclasses <-> the plain tree a snapshot state file holds.

Each component owns its state as a frozen dataclass (`SerialState`,
`QueueState`, `BlockState`, ...) and validates it when it loads it. The
state file (`snapshot.format`) stores a tree of dicts, lists, ints, bytes,
strs, bools and None. This module is the one generic bridge: `to_tree`
walks a dataclass by its fields; `from_tree` rebuilds one from an
untrusted tree, guided by the field annotations, and refuses anything that
does not have exactly the declared shape (missing or unknown keys, a bool
where an int is due, a list too long) with a `StateTreeError` naming the
path — before the component's own checks run on the values.

Supported annotations: ``int``, ``bool``, ``str``, ``bytes``, ``None``,
``X | None``, ``tuple[X, ...]``, ``list[X]``, enums (stored by value) and
nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar

__all__ = ["StateTreeError", "to_tree", "from_tree", "warm", "MAX_SEQUENCE_LEN"]

T = TypeVar("T")

#: No component state holds a longer sequence (queues, MSRs, CPUID leaves...).
MAX_SEQUENCE_LEN = 4096


class StateTreeError(Exception):
    """A saved component state does not have the shape of the component's state type."""


def to_tree(obj: Any) -> Any:
    """The plain tree of a state dataclass (or of any supported value)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [to_tree(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str, bytes)):
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    raise StateTreeError(f"cannot save a {type(obj).__name__} in a state tree")


def from_tree(cls: type[T], tree: Any, path: str = "") -> T:
    """Rebuild a `cls` dataclass from an untrusted `tree`; `StateTreeError` if the shape is wrong."""
    return _read(cls, tree, path or cls.__name__)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def warm(*classes: type) -> None:
    """Resolve and cache the annotations of `classes` and of every dataclass their fields name.

    `typing.get_type_hints` evaluates each string annotation (``from
    __future__ import annotations``) with `compile`: ~1 ms for a
    microVM's state types, paid by every restore unless the cache is
    already full. The zygote calls this before it forks (`vmm.main.preload`),
    so its children share the filled cache instead.
    """
    seen: set[Any] = set()
    todo: list[Any] = list(classes)
    while todo:
        tp = todo.pop()
        if tp in seen:
            continue
        seen.add(tp)
        todo.extend(typing.get_args(tp))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            todo.extend(_hints(tp).values())


def _read(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            raise StateTreeError(f"{path}: unsupported annotation {tp}")
        return _read(others[0], value, path)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise StateTreeError(f"{path}: unsupported annotation {tp}")
        if not isinstance(value, list):
            raise StateTreeError(f"{path}: expected a list, got {_kind(value)}")
        if len(value) > MAX_SEQUENCE_LEN:
            raise StateTreeError(f"{path}: {len(value)} items, at most {MAX_SEQUENCE_LEN}")
        items = [_read(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is type(None) or tp is None:
        if value is not None:
            raise StateTreeError(f"{path}: expected null, got {_kind(value)}")
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise StateTreeError(f"{path}: expected an object, got {_kind(value)}")
        hints = _hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise StateTreeError(f"{path}: unknown field {unknown[0]!r}")
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise StateTreeError(f"{path}: missing field {name!r}")
                continue
            kwargs[name] = _read(hints[name], value[name], f"{path}.{name}")
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as exc:
            raise StateTreeError(f"{path}: {exc}") from exc
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise StateTreeError(f"{path}: {value!r} is not a {tp.__name__}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise StateTreeError(f"{path}: expected a bool, got {_kind(value)}")
        return value
    if tp is int:
        if type(value) is not int:
            raise StateTreeError(f"{path}: expected an integer, got {_kind(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise StateTreeError(f"{path}: expected a string, got {_kind(value)}")
        return value
    if tp is bytes:
        if not isinstance(value, bytes):
            raise StateTreeError(f"{path}: expected bytes, got {_kind(value)}")
        return value
    if tp is Any:
        return value
    raise StateTreeError(f"{path}: unsupported annotation {tp!r}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a bool", int: "an integer", str: "a string",
            bytes: "bytes"}.get(type(value), type(value).__name__)
