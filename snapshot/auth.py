"""Snapshot authentication: a keyed MAC over the state file and a digest of the memory file.

Snapshot files are untrusted input: a state file and its memory file may
sit on shared storage, come from a tenant, or be rewritten by a process
that escaped a guest. A checksum (`format`) catches accidents; this module
catches forgeries. Whoever holds the 32-byte snapshot key signs a snapshot
by writing a *signature file* beside the state file (``vm.state.sig``); a
VMM or page server holding the same key refuses any snapshot whose state
bytes, memory bytes or signature do not match — before the state is parsed.

Signature file (all integers little-endian)::

    offset  size  field
    0       8     magic          b"EMBERSIG"
    8       2     major          1
    10      2     minor          0
    12      4     body_length
    16      8     key_id         names the key (derived from it), for the error message
    24      ...   body           format.encode_value of the tree below
    24+n    32    mac            HMAC-SHA256(mac_key, bytes 0 .. 24+n)

    body = {"state": {"sha256": 32 bytes, "size": int},
            "memory": {"size": int, "chunk_size": int, "chunks": 32 bytes per chunk}}

The MAC is checked (in constant time) before the body is decoded; the body
is decoded only once authentic, and the state file is decoded only once its
SHA-256 equals the signed one. So a tampered file never reaches a parser
beyond the fixed 24-byte prefix.

The memory digest is a table of SHA-256 digests of fixed-size chunks of
the memory file (64 KiB: the chunk store's chunk, so a page server checks
each chunk it installs, lazily; chunk ``i`` is bytes
``i*chunk_size .. min((i+1)*chunk_size, size)``). An all-zero chunk has the
digest of zeros like any other, so a hole needs no reading to be checked.

Keys. ``mac_key``, ``seal_key`` and the key id are derived from the secret
with HMAC (distinct labels), so a seal can never be replayed as a
signature and the key id reveals nothing about the secret. HMAC is
symmetric: every process that verifies can also sign (docs/snapshots.md,
threat model).

This module is pure (bytes in, bytes out) except for the key-file and
signature-file helpers at the end, which are its I/O edge.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import DocumentedError
from .format import SnapshotFormatError, decode_value, encode_value, read_bounded

__all__ = [
    "KEY_SIZE",
    "SIG_MAGIC",
    "SIG_VERSION",
    "SIG_SUFFIX",
    "DEFAULT_SIGN_CHUNK_SIZE",
    "MAX_SIGNATURE_SIZE",
    "KEY_FILE_ENV",
    "SnapshotAuthError",
    "KeyFileError",
    "SignatureMissing",
    "MalformedSignature",
    "SignatureInvalid",
    "WrongKey",
    "StateMismatch",
    "MemoryMismatch",
    "SnapshotKey",
    "MemoryDigest",
    "SnapshotSignature",
    "zero_chunk_digest",
    "memory_digest_of_buffers",
    "sign_snapshot",
    "verify_signature",
    "signature_path",
    "read_signature",
    "write_signature",
    "load_key_file",
    "ensure_key_file",
    "VerifiedSource",
]

KEY_SIZE = 32
SIG_MAGIC = b"EMBERSIG"
SIG_VERSION = (1, 0)
SIG_SUFFIX = ".sig"
#: The chunk the memory digest is cut in: the chunk store's default, so a
#: page server serving from the store checks one signed digest per chunk.
DEFAULT_SIGN_CHUNK_SIZE = 64 << 10
#: Largest signature file read: 32 bytes per 64 KiB chunk is 8 MiB for 16 GiB.
MAX_SIGNATURE_SIZE = 16 << 20
#: Environment variable naming the key file (the VMM's --snapshot-key-file).
KEY_FILE_ENV = "EMBER_SNAPSHOT_KEY_FILE"

_PREFIX = struct.Struct("<8sHHI8s")
_MAC_SIZE = 32
_DIGEST = 32
_MIN_CHUNK = 4096
_MAX_CHUNK = 1 << 30

_LABEL_MAC = b"ember snapshot signature v1"
_LABEL_SEAL = b"ember memory seal v1"
_LABEL_ID = b"ember snapshot key id v1"


# --- errors ------------------------------------------------------------------


class SnapshotAuthError(DocumentedError):
    """Snapshot authentication failed."""


class KeyFileError(SnapshotAuthError):
    """Snapshot key file is unusable."""


class SignatureMissing(SnapshotAuthError):
    """Snapshot is not signed (no signature file) and a snapshot key is configured."""


class MalformedSignature(SnapshotAuthError):
    """Snapshot signature file is malformed."""


class SignatureInvalid(SnapshotAuthError):
    """Snapshot signature does not verify (the signature file was altered or made with another key)."""


class WrongKey(SignatureInvalid):
    """Snapshot was signed with another key."""


class StateMismatch(SnapshotAuthError):
    """State file does not match its signature (altered, truncated, or another snapshot's)."""


class MemoryMismatch(SnapshotAuthError):
    """Memory does not match the snapshot's signature (altered, truncated, or another snapshot's)."""


# --- keys --------------------------------------------------------------------


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, label, hashlib.sha256).digest()


@dataclass(frozen=True)
class SnapshotKey:
    """A 32-byte snapshot secret and the keys derived from it. `repr` never shows the secret."""

    secret: bytes = field(repr=False)
    mac_key: bytes = field(init=False, repr=False)
    seal_key: bytes = field(init=False, repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_SIZE:
            raise KeyFileError(f"a snapshot key is {KEY_SIZE} bytes")
        object.__setattr__(self, "mac_key", _derive(self.secret, _LABEL_MAC))
        object.__setattr__(self, "seal_key", _derive(self.secret, _LABEL_SEAL))
        object.__setattr__(self, "key_id", _derive(self.secret, _LABEL_ID)[:8])

    @classmethod
    def generate(cls) -> "SnapshotKey":
        return cls(os.urandom(KEY_SIZE))

    def mac(self, data: bytes | memoryview) -> bytes:
        return hmac.new(self.mac_key, data, hashlib.sha256).digest()

    def seal(self, signature: "SnapshotSignature") -> bytes:
        """The value a trusted verifier attaches to a memory file it checked against `signature`."""
        return hmac.new(self.seal_key, signature.mac + signature.memory.size.to_bytes(8, "little"),
                        hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"<SnapshotKey id={self.key_id.hex()}>"


# --- the memory digest -------------------------------------------------------

_ZERO_DIGESTS: dict[int, bytes] = {}


def zero_chunk_digest(length: int) -> bytes:
    """SHA-256 of `length` zero bytes (cached: holes are checked without hashing)."""
    digest = _ZERO_DIGESTS.get(length)
    if digest is None:
        digest = _ZERO_DIGESTS[length] = hashlib.sha256(bytes(length)).digest()
    return digest


@dataclass(frozen=True)
class MemoryDigest:
    """Per-chunk SHA-256 of a memory file of `size` bytes."""

    size: int
    chunk_size: int
    chunks: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.size) is not int or not 0 < self.size < 1 << 64:
            raise MalformedSignature(f"memory size {self.size!r} is not a positive u64")
        cs = self.chunk_size
        if type(cs) is not int or not _MIN_CHUNK <= cs <= _MAX_CHUNK or cs % _MIN_CHUNK:
            raise MalformedSignature(f"chunk size {cs!r} is not a multiple of {_MIN_CHUNK} up to {_MAX_CHUNK}")
        if not isinstance(self.chunks, bytes) or len(self.chunks) != self.count * _DIGEST:
            raise MalformedSignature(f"chunk table has {len(self.chunks)} bytes, {self.count} chunks need "
                                     f"{self.count * _DIGEST}")

    @property
    def count(self) -> int:
        return -(-self.size // self.chunk_size)

    def bounds(self, index: int) -> tuple[int, int]:
        """[start, end) of chunk `index` in the memory file."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    def digest(self, index: int) -> bytes:
        return self.chunks[index * _DIGEST:(index + 1) * _DIGEST]

    def check_chunk(self, index: int, data: bytes | memoryview | None) -> None:
        """Raise `MemoryMismatch` unless `data` (None: all zeros) is chunk `index` exactly."""
        start, end = self.bounds(index)
        if data is None:
            actual = zero_chunk_digest(end - start)
        elif len(data) != end - start:
            raise MemoryMismatch(f"chunk {index} at {start:#x}: {len(data)} bytes, expected {end - start}")
        else:
            actual = hashlib.sha256(data).digest()
        if not hmac.compare_digest(actual, self.digest(index)):
            raise MemoryMismatch(f"chunk {index} at offset {start:#x}")

    def to_tree(self) -> dict[str, Any]:
        return {"size": self.size, "chunk_size": self.chunk_size, "chunks": self.chunks}

    @classmethod
    def from_tree(cls, tree: Any) -> "MemoryDigest":
        if not isinstance(tree, dict) or set(tree) != {"size", "chunk_size", "chunks"}:
            raise MalformedSignature("memory: expected size, chunk_size and chunks")
        return cls(tree["size"], tree["chunk_size"], tree["chunks"])


def memory_digest_of_buffers(buffers: Sequence[Any], *, chunk_size: int = DEFAULT_SIGN_CHUNK_SIZE) -> MemoryDigest:
    """The digest of the memory file made of `buffers` back to back (guest regions in file order).

    Zero chunks are recognised with a memcmp-speed compare and get the
    cached zero digest, so an idle guest's memory costs little to sign.
    """
    views = [memoryview(b).cast("B") for b in buffers]
    size = sum(len(v) for v in views)
    table = bytearray()
    zero = bytes(chunk_size)
    pending = bytearray()  # a chunk straddling two buffers (regions not chunk-aligned)
    for view in views:
        pos = 0
        if pending:
            take = min(chunk_size - len(pending), len(view))
            pending += view[:take]
            pos = take
            if len(pending) == chunk_size:
                table += _chunk_digest(bytes(pending), zero)
                pending.clear()
        while pos + chunk_size <= len(view):
            table += _chunk_digest(view[pos:pos + chunk_size], zero)
            pos += chunk_size
        if pos < len(view):
            pending += view[pos:]
    if pending:
        table += _chunk_digest(bytes(pending), zero[:len(pending)])
    return MemoryDigest(size, chunk_size, bytes(table))


def _chunk_digest(chunk: bytes | memoryview, zero: bytes) -> bytes:
    # A bytes copy compares with memcmp (a memoryview compares per element).
    data = chunk if isinstance(chunk, bytes) else chunk.tobytes()
    if data == zero[:len(data)]:
        return zero_chunk_digest(len(data))
    return hashlib.sha256(data).digest()


# --- the signature -----------------------------------------------------------


@dataclass(frozen=True)
class SnapshotSignature:
    """An authentic signature file's contents (only `verify_signature` makes one from bytes)."""

    key_id: bytes
    state_sha256: bytes
    state_size: int
    memory: MemoryDigest
    mac: bytes

    def check_state(self, state: bytes | memoryview) -> None:
        """Raise `StateMismatch` unless `state` is the signed state file, byte for byte."""
        if len(state) != self.state_size:
            raise StateMismatch(f"{len(state)} bytes, the signature says {self.state_size}")
        if not hmac.compare_digest(hashlib.sha256(state).digest(), self.state_sha256):
            raise StateMismatch("SHA-256 differs from the signed one")

    def check_memory_size(self, size: int) -> None:
        if size != self.memory.size:
            raise MemoryMismatch(f"{size} bytes, the signature says {self.memory.size}")

    def __repr__(self) -> str:
        return (f"<SnapshotSignature key={self.key_id.hex()} state={self.state_size} B "
                f"memory={self.memory.size >> 20} MiB chunks={self.memory.count}>")


def sign_snapshot(key: SnapshotKey, state: bytes | memoryview, memory: MemoryDigest) -> bytes:
    """The signature file for state bytes `state` and memory digest `memory`."""
    body = encode_value({"state": {"sha256": hashlib.sha256(state).digest(), "size": len(state)},
                         "memory": memory.to_tree()})
    signed = _PREFIX.pack(SIG_MAGIC, *SIG_VERSION, len(body), key.key_id) + body
    return signed + key.mac(signed)


def verify_signature(key: SnapshotKey, data: bytes | memoryview) -> SnapshotSignature:
    """Authenticate a signature file's bytes, then decode them.

    Only the 24-byte prefix (magic, version, length, key id) is read before
    the MAC is checked; a bad MAC is reported as `WrongKey` when the prefix
    names another key, else as `SignatureInvalid`.
    """
    view = memoryview(data)
    if len(view) > MAX_SIGNATURE_SIZE:
        raise MalformedSignature(f"{len(view)} bytes, limit {MAX_SIGNATURE_SIZE}")
    if len(view) < _PREFIX.size + _MAC_SIZE:
        raise MalformedSignature(f"{len(view)} bytes, shorter than the smallest signature")
    magic, major, minor, body_length, key_id = _PREFIX.unpack_from(view)
    if magic != SIG_MAGIC:
        raise MalformedSignature(f"bad magic {bytes(magic)!r}")
    if major != SIG_VERSION[0] or minor > SIG_VERSION[1]:
        raise MalformedSignature(f"signature format {major}.{minor} is not supported "
                                 f"(this Ember reads {SIG_VERSION[0]}.0 to {SIG_VERSION[0]}.{SIG_VERSION[1]})")
    if _PREFIX.size + body_length + _MAC_SIZE != len(view):
        raise MalformedSignature(f"header says {body_length} body bytes, the file has "
                                 f"{len(view) - _PREFIX.size - _MAC_SIZE}")
    signed, mac = view[:-_MAC_SIZE], bytes(view[-_MAC_SIZE:])
    if not hmac.compare_digest(key.mac(signed), mac):
        if key_id != key.key_id:
            raise WrongKey(f"signed with key {key_id.hex()}, this key is {key.key_id.hex()}")
        raise SignatureInvalid()
    # Authentic from here on: written by a holder of the key.
    try:
        body = decode_value(view[_PREFIX.size:-_MAC_SIZE])
    except SnapshotFormatError as exc:
        raise MalformedSignature(f"body: {exc}") from exc
    if not isinstance(body, dict) or set(body) != {"state", "memory"}:
        raise MalformedSignature("body: expected state and memory")
    state = body["state"]
    if (not isinstance(state, dict) or set(state) != {"sha256", "size"} or not isinstance(state["sha256"], bytes)
            or len(state["sha256"]) != _DIGEST or type(state["size"]) is not int or state["size"] < 0):
        raise MalformedSignature("body: state must be {sha256, size}")
    return SnapshotSignature(key_id=key_id, state_sha256=state["sha256"], state_size=state["size"],
                             memory=MemoryDigest.from_tree(body["memory"]), mac=mac)


# --- the page server's check -------------------------------------------------


class VerifiedSource:
    """A `snapshot.uffd.PageSource` whose every byte is checked against a signed memory digest.

    The unit is the signed chunk: a fault installs a whole chunk, read from
    `inner` and hashed before it is returned, so what the guest gets is
    exactly what was signed. A mismatch raises `MemoryMismatch`, which ends
    the page server's service of that VM (it must not run on wrong memory).
    """

    def __init__(self, inner: Any, memory: MemoryDigest) -> None:
        if inner.size != memory.size:
            raise MemoryMismatch(f"the source holds {inner.size} bytes, the signature says {memory.size}")
        self.inner = inner
        self.memory = memory
        self.verified_chunks = 0

    @property
    def size(self) -> int:
        return self.memory.size

    def unit(self, offset: int) -> tuple[int, int]:
        return self.memory.bounds(offset // self.memory.chunk_size)

    def read(self, offset: int, length: int) -> bytes | None:
        if offset < 0 or length <= 0 or offset + length > self.memory.size:
            raise MemoryMismatch(f"range {offset:#x}+{length:#x} is outside the signed memory")
        cs = self.memory.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        parts: list[bytes | None] = []
        for index in range(first, last + 1):
            start, end = self.memory.bounds(index)
            data = self.inner.read(start, end - start)
            self.memory.check_chunk(index, data)
            self.verified_chunks += 1
            parts.append(data)
        if all(p is None for p in parts):
            return None
        lo = first * cs
        if len(parts) == 1 and offset == lo and parts[0] is not None and length == len(parts[0]):
            return parts[0]  # the common case: exactly one chunk, no copy
        whole = b"".join(p if p is not None else bytes(min(cs, self.memory.size - (first + i) * cs))
                         for i, p in enumerate(parts))
        return whole[offset - lo:offset - lo + length]

    def __repr__(self) -> str:
        return f"<VerifiedSource {self.inner!r} verified={self.verified_chunks} chunks>"


# --- I/O edge: key and signature files ---------------------------------------


def signature_path(state_path: str | os.PathLike[str]) -> str:
    """Where the signature of the state file `state_path` lives: ``<state_path>.sig``."""
    return os.fspath(state_path) + SIG_SUFFIX


def read_signature(key: SnapshotKey, path: str | os.PathLike[str]) -> SnapshotSignature:
    """Read and authenticate the signature file `path`; `SignatureMissing` if there is none."""
    if not os.path.lexists(path):
        raise SignatureMissing(path=path)
    try:
        data = read_bounded(path, MAX_SIGNATURE_SIZE)
    except SnapshotFormatError as exc:
        raise MalformedSignature(exc.detail or exc.summary, path=path) from exc
    try:
        return verify_signature(key, data)
    except SnapshotAuthError as exc:
        exc.path = os.fspath(path)
        raise


def write_signature(path: str | os.PathLike[str], data: bytes) -> None:
    from .format import atomic_write
    atomic_write(path, [data])


def load_key_file(path: str | os.PathLike[str]) -> SnapshotKey:
    """The key in `path`: 32 raw bytes, or 64 hex digits (a trailing newline allowed).

    The file must be a regular file neither group- nor world-accessible:
    a key others can read is no secret, one they can write is theirs.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyFileError(exc.strerror or str(exc), path=path) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError("not a regular file", path=path)
        if st.st_mode & 0o077:
            raise KeyFileError(f"mode {stat.S_IMODE(st.st_mode):04o}: group and others must have no access "
                               "(chmod 600)", path=path)
        raw = os.read(fd, 2 * KEY_SIZE + 2)
    finally:
        os.close(fd)
    if len(raw) == KEY_SIZE:
        return SnapshotKey(raw)
    text = raw.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return SnapshotKey(bytes.fromhex(text.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            pass
    raise KeyFileError(f"expected {KEY_SIZE} raw bytes or {2 * KEY_SIZE} hex digits", path=path)


def ensure_key_file(path: str | os.PathLike[str]) -> SnapshotKey:
    """The key in `path`, creating it (32 random bytes, mode 0600, atomically) if there is none."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-key-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return load_key_file(path)
