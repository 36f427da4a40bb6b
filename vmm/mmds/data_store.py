"""The MMDS data store: one JSON object per microVM, plus its session tokens.

The host fills the store through the REST API (``PUT /mmds`` replaces it,
``PATCH /mmds`` merges into it per RFC 7396); the guest reads it over HTTP
through the MMDS network stack. Both sides call this one object, from
different threads, so every method takes the store's lock.

Firecracker's rules kept here:

* The size limit applies to the compact JSON serialization of the whole
  store (keys sorted, no whitespace, UTF-8), checked before a change is
  committed: a rejected ``put``/``patch`` leaves the store untouched.
* ``patch`` before the first ``put`` fails ("not initialized").
* Paths are JSON pointers (RFC 6901) after Firecracker's URI clean-up: runs
  of ``/`` collapse to one and one trailing ``/`` is dropped, so
  ``/latest//meta-data/`` means ``/latest/meta-data``.
* Output is JSON, or the EC2 IMDS text format: an object lists its keys one
  per line (sorted, no trailing newline), a key whose value is an object gets
  a ``/`` suffix; a string is returned as is; any other type (number, bool,
  null, array) cannot be rendered and is `UnsupportedValueType` (HTTP 501).
  With ``imds_compat`` the IMDS format is used whatever the client asked for.
* The data is not part of a snapshot by default (Firecracker: "in order to
  avoid leaking vm-specific information"); version and ``imds_compat`` are.

Deviation from Firecracker, deliberate: the store only holds a JSON object
(Firecracker's swagger says so; its code accepts any JSON value).
"""

from __future__ import annotations

import copy
import enum
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from vmm.config.mmds import MmdsVersion

from .token import TokenAuthority

__all__ = [
    "DEFAULT_DATA_STORE_LIMIT",
    "MAX_DEPTH",
    "JsonValue",
    "OutputFormat",
    "MmdsStore",
    "MmdsState",
    "MmdsError",
    "DataStoreLimitExceeded",
    "NotFound",
    "NotInitialized",
    "UnsupportedValueType",
    "NotAJsonObject",
    "InvalidJsonData",
    "InvalidMmdsState",
    "json_merge_patch",
    "format_imds",
    "sanitize_path",
    "serialize",
]

JsonValue: TypeAlias = Any
"""A JSON tree as `json.loads` builds it: dict, list, str, int, float, bool, None."""

# Firecracker `--mmds-size-limit` default (= `--http-api-max-payload-size`).
DEFAULT_DATA_STORE_LIMIT = 51200

# Deepest nesting of arrays/objects stored: serde_json's recursion limit, so
# nothing Firecracker's API could parse is refused.
MAX_DEPTH = 128


class MmdsError(Exception):
    """MMDS data store error."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else _docstring(type(self))
        super().__init__(self.message)


class DataStoreLimitExceeded(MmdsError):
    """The MMDS patch request doesn't fit."""


class NotFound(MmdsError):
    """The MMDS resource does not exist."""


class NotInitialized(MmdsError):
    """The MMDS data store is not initialized."""


class UnsupportedValueType(MmdsError):
    """Cannot retrieve value. The value has an unsupported type."""


class NotAJsonObject(MmdsError):
    """The MMDS data store contents must be a JSON object."""


class InvalidJsonData(MmdsError):
    """The MMDS data store contents are not valid JSON (or nest more than 128 levels deep)."""


class InvalidMmdsState(MmdsError):
    """The saved MMDS state is invalid."""


def _docstring(cls: type) -> str:
    return " ".join((cls.__doc__ or cls.__name__).split())


class OutputFormat(enum.Enum):
    """How a GET answer is rendered."""

    JSON = "application/json"
    IMDS = "text/plain"


def serialize(value: JsonValue) -> str:
    """Compact JSON with sorted keys: the text whose UTF-8 size is limited.

    This is also the JSON output format (serde_json's `to_string` on a
    `BTreeMap`-backed value gives the same text).
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _is_json_tree(value: object) -> bool:
    """Objects keyed by strings, nested at most `MAX_DEPTH` deep? (Iterative; cycles fail.)"""
    work: list[tuple[object, int]] = [(value, 1)]
    while work:
        node, depth = work.pop()
        if isinstance(node, dict):
            if not all(isinstance(key, str) for key in node):
                return False
            children: Iterable[object] = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > MAX_DEPTH:
            return False
        work.extend((child, depth + 1) for child in children)
    return True


def _normalized(value: object) -> tuple[JsonValue, int]:
    """A private deep copy of `value` as plain JSON, and its serialized size.

    Round-tripping through text rejects what JSON cannot carry (NaN,
    non-string keys, sets) and copies, so a caller keeping a reference
    cannot change the store. The depth bound keeps every later recursive
    walk (copies, serialization) far from Python's recursion limit.
    """
    if not _is_json_tree(value):
        raise InvalidJsonData()
    try:
        text = serialize(value)
        return json.loads(text), len(text.encode())
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidJsonData() from exc


def json_merge_patch(target: JsonValue, patch: JsonValue) -> JsonValue:
    """RFC 7396 §2 MergePatch(target, patch); returns the result.

    `target` may be modified in place (pass a copy). Iterative, so a deep
    patch cannot exhaust the Python stack.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    root: dict[str, JsonValue] = target if isinstance(target, dict) else {}
    work: list[tuple[dict[str, JsonValue], dict[str, JsonValue]]] = [(root, patch)]
    while work:
        doc, pat = work.pop()
        for key, value in pat.items():
            if value is None:
                doc.pop(key, None)
            elif isinstance(value, dict):
                child = doc.get(key)
                if not isinstance(child, dict):
                    child = doc[key] = {}
                work.append((child, value))
            else:
                doc[key] = copy.deepcopy(value)
    return root


def sanitize_path(path: str) -> str:
    """Firecracker's `sanitize_uri`: collapse every run of ``/`` into one."""
    while "//" in path:
        path = path.replace("//", "/")
    return path


def _pointer(root: JsonValue, pointer: str) -> JsonValue:
    """RFC 6901 JSON pointer lookup; `NotFound` if any step is missing."""
    if pointer == "":
        return root
    if not pointer.startswith("/"):
        raise NotFound()
    node = root
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            if token not in node:
                raise NotFound()
            node = node[token]
        elif isinstance(node, list):
            # RFC 6901 §4: array indices are decimal, no leading zeros.
            if not token.isascii() or not token.isdigit() or (token.startswith("0") and token != "0"):
                raise NotFound()
            index = int(token)
            if index >= len(node):
                raise NotFound()
            node = node[index]
        else:
            raise NotFound()
    return node


def format_imds(value: JsonValue) -> str:
    """The EC2 IMDS text rendering of `value` (see the module docstring)."""
    if isinstance(value, dict):
        return "\n".join(f"{key}/" if isinstance(value[key], dict) else key for key in sorted(value))
    if isinstance(value, str):
        return value
    raise UnsupportedValueType()


@dataclass(frozen=True)
class MmdsState:
    """Persisted MMDS settings; `data` is the serialized store, or None if not saved."""

    version: MmdsVersion
    imds_compat: bool
    data: str | None = None


class MmdsStore:
    """The metadata of one microVM, shared by the API and every MMDS network stack.

    `clock` is a monotonic clock in seconds; it decides when session tokens
    expire (inject a fake one in tests).
    """

    def __init__(
        self,
        size_limit: int = DEFAULT_DATA_STORE_LIMIT,
        *,
        version: MmdsVersion = MmdsVersion.V1,
        imds_compat: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size_limit < 0:
            raise ValueError(f"size_limit must be >= 0, got {size_limit}")
        self._lock = threading.Lock()
        self._size_limit = size_limit
        self._version = MmdsVersion(version)
        self._imds_compat = bool(imds_compat)
        self._data: dict[str, JsonValue] | None = None
        self._size = 0
        self._tokens = TokenAuthority(clock)

    def __repr__(self) -> str:
        state = f"{self._size}/{self._size_limit}B" if self._data is not None else "uninitialized"
        compat = " imds_compat" if self._imds_compat else ""
        return f"<MmdsStore {self._version.value}{compat} {state}>"

    # --- settings --------------------------------------------------------------------

    @property
    def version(self) -> MmdsVersion:
        return self._version

    @version.setter
    def version(self, version: MmdsVersion) -> None:
        self._version = MmdsVersion(version)

    @property
    def imds_compat(self) -> bool:
        """Always answer in IMDS format, ignoring the client's ``Accept`` (EC2 IMDS behaviour)."""
        return self._imds_compat

    @imds_compat.setter
    def imds_compat(self, value: bool) -> None:
        self._imds_compat = bool(value)

    @property
    def size_limit(self) -> int:
        return self._size_limit

    @size_limit.setter
    def size_limit(self, limit: int) -> None:
        """A new limit applies to the next put/patch; present data is kept."""
        if limit < 0:
            raise ValueError(f"size_limit must be >= 0, got {limit}")
        self._size_limit = limit

    @property
    def initialized(self) -> bool:
        """True once a `put` succeeded."""
        return self._data is not None

    @property
    def size(self) -> int:
        """Bytes of the serialized store (0 before the first put)."""
        return self._size

    def set_aad(self, instance_id: str) -> None:
        """Bind tokens to this microVM id (Firecracker's AES-GCM AAD ``microvmid=<id>``)."""
        self._tokens.set_aad(instance_id)

    # --- data ------------------------------------------------------------------------

    def put(self, obj: dict[str, JsonValue]) -> None:
        """Replace the whole store with `obj` (a JSON object)."""
        if not isinstance(obj, dict):
            raise NotAJsonObject()
        data, size = _normalized(obj)
        if size > self._size_limit:
            raise DataStoreLimitExceeded()
        with self._lock:
            self._data, self._size = data, size

    def patch(self, obj: dict[str, JsonValue]) -> None:
        """Merge `obj` into the store (RFC 7396); nothing changes if the result does not fit."""
        if not isinstance(obj, dict):
            raise NotAJsonObject()
        patch, _ = _normalized(obj)
        with self._lock:
            if self._data is None:
                raise NotInitialized()
            merged, size = _normalized(json_merge_patch(copy.deepcopy(self._data), patch))
            if size > self._size_limit:
                raise DataStoreLimitExceeded()
            self._data, self._size = merged, size

    def get(self) -> dict[str, JsonValue]:
        """A copy of the whole store; ``{}`` before the first put (as Firecracker's API shows it)."""
        with self._lock:
            return copy.deepcopy(self._data) if self._data is not None else {}

    def get_path(self, path: str) -> JsonValue:
        """A copy of the value at `path` (``/latest/meta-data/foo``); `NotFound` if absent.

        ``""`` and ``"/"`` name the root, which is None (JSON null) before the first put.
        """
        with self._lock:
            return copy.deepcopy(self._lookup(path))

    def render(self, path: str, fmt: OutputFormat) -> tuple[str, OutputFormat]:
        """The text served for a guest GET of `path`, and the format actually used.

        `fmt` is what the client asked for; ``imds_compat`` overrides it.
        Raises `NotFound` or `UnsupportedValueType`.
        """
        with self._lock:
            value = self._lookup(path)
            used = OutputFormat.IMDS if self._imds_compat else fmt
            if used is OutputFormat.JSON:
                return serialize(value), used
            return format_imds(value), used

    def _lookup(self, path: str) -> JsonValue:
        pointer = sanitize_path(path)
        if pointer.endswith("/"):
            pointer = pointer[:-1]
        return _pointer(self._data, pointer)

    # --- tokens ----------------------------------------------------------------------

    def generate_token(self, ttl_seconds: int) -> str:
        """A session token valid for `ttl_seconds` (1..21600); `InvalidTtlValue` otherwise."""
        with self._lock:
            return self._tokens.generate(ttl_seconds)

    def is_valid_token(self, token: str) -> bool:
        """True if `token` came from this store and has not expired."""
        with self._lock:
            return self._tokens.is_valid(token)

    # --- persistence -----------------------------------------------------------------

    def state(self, *, include_data: bool = False) -> MmdsState:
        """The persisted settings; the data only if asked (Firecracker never saves it).

        Tokens are never saved: the restored store has a fresh key, so tokens
        handed out before the snapshot are invalid in every clone.
        """
        with self._lock:
            data = serialize(self._data) if include_data and self._data is not None else None
            return MmdsState(version=self._version, imds_compat=self._imds_compat, data=data)

    @classmethod
    def from_state(
        cls,
        state: MmdsState,
        *,
        size_limit: int = DEFAULT_DATA_STORE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> MmdsStore:
        """A store from (untrusted) saved state; `InvalidMmdsState` if it does not validate."""
        try:
            version = MmdsVersion(state.version)
        except ValueError:
            raise InvalidMmdsState(f"The saved MMDS state is invalid: unknown version {state.version!r}.") from None
        if not isinstance(state.imds_compat, bool):
            raise InvalidMmdsState("The saved MMDS state is invalid: imds_compat is not a boolean.")
        store = cls(size_limit, version=version, imds_compat=state.imds_compat, clock=clock)
        if state.data is not None:
            try:
                store.put(json.loads(state.data))
            except (ValueError, TypeError, RecursionError, MmdsError) as exc:
                raise InvalidMmdsState(f"The saved MMDS state is invalid: {exc}") from exc
        return store
