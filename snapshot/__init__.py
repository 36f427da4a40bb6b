"""Ember snapshots: the storage half.

* `auth` — snapshot signatures: an HMAC-SHA256 over the state file and a
  per-chunk digest of the memory file, checked before anything is parsed;
* `format` — the VM state file (magic, version, SHA-256, a canonical tagged
  encoding of plain data) and the memory file layout;
* `memfile` — sparse full and diff memory files, merging a diff onto a base;
* `chunkstore` — content-addressed, zstd-compressed, deduplicated chunks
  with an LMDB catalog of snapshots (put, read, materialize, remove, gc, verify);
* `uffd` — the pure page-server core: handshake parsing, fault resolution,
  working-set recording and prefetch plans;
* `uffd_server` — the userfaultfd ioctls (cffi), the SCM_RIGHTS handshake
  and the serving loop.

This package imports neither `vmm` nor `poolsvc`: the VMM calls it with
plain data (trees, buffers, paths, addresses).
"""

from .auth import (
    KEY_SIZE,
    KeyFileError,
    MemoryDigest,
    MemoryMismatch,
    SignatureInvalid,
    SignatureMissing,
    SnapshotAuthError,
    SnapshotKey,
    SnapshotSignature,
    StateMismatch,
    VerifiedSource,
    ensure_key_file,
    load_key_file,
    read_signature,
    sign_snapshot,
    signature_path,
    verify_signature,
)
from .chunkstore import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ZERO_CHUNK,
    BadSnapshotInput,
    CatalogCorrupt,
    ChunkCorrupt,
    ChunkMissing,
    ChunkRef,
    ChunkStore,
    ChunkStoreError,
    GcStats,
    InvalidSnapshotId,
    PutStats,
    SnapshotExists,
    SnapshotInfo,
    SnapshotNotFound,
    SnapshotView,
    StoreConfigMismatch,
    StoreStats,
    VerifyReport,
)
from .format import (
    DEFAULT_MAX_STATE_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    BadHeader,
    BadMagic,
    ChecksumMismatch,
    InvalidMemoryLayout,
    MalformedPayload,
    MemoryFileLayout,
    MemoryFileRegion,
    NestingTooDeep,
    SnapshotFormatError,
    StateFileTooLarge,
    StateFileTruncated,
    StateFileUnreadable,
    UnencodableValue,
    UnsupportedFormatVersion,
    decode_state,
    decode_value,
    encode_state,
    encode_value,
    read_state,
    write_state,
)
from .memfile import (
    BadDirtyBitmap,
    MemoryBufferMismatch,
    MemoryFileError,
    MemoryFileStats,
    MemoryFileUnusable,
    dirty_runs,
    merge_diff,
    write_diff_memory_file,
    write_memory_file,
)
from .uffd import (
    ChunkStoreSource,
    FaultOutsideMappings,
    FaultResolver,
    HandshakeError,
    Install,
    MemoryFileSource,
    PageSource,
    SourceMismatch,
    UffdError,
    UffdMapping,
    Wake,
    WorkingSetRecorder,
    encode_handshake,
    parse_handshake,
    prefetch_plan,
    resolve_fault,
)
from .uffd_server import (
    PageServer,
    UffdSyscallError,
    Userfaultfd,
    receive_handshake,
    send_handshake,
)

__all__ = [
    # auth
    "KEY_SIZE", "SnapshotAuthError", "KeyFileError", "SignatureMissing", "SignatureInvalid", "StateMismatch",
    "MemoryMismatch", "SnapshotKey", "MemoryDigest", "SnapshotSignature", "VerifiedSource",
    "sign_snapshot", "verify_signature", "read_signature", "signature_path", "load_key_file", "ensure_key_file",
    # format
    "MAGIC", "FORMAT_VERSION", "HEADER_SIZE", "DEFAULT_MAX_STATE_SIZE",
    "SnapshotFormatError", "StateFileUnreadable", "StateFileTooLarge", "StateFileTruncated", "BadMagic",
    "UnsupportedFormatVersion", "BadHeader", "ChecksumMismatch", "MalformedPayload", "NestingTooDeep",
    "UnencodableValue", "InvalidMemoryLayout",
    "encode_value", "decode_value", "encode_state", "decode_state", "write_state", "read_state",
    "MemoryFileRegion", "MemoryFileLayout",
    # memfile
    "MemoryFileError", "MemoryBufferMismatch", "BadDirtyBitmap", "MemoryFileUnusable", "MemoryFileStats",
    "write_memory_file", "write_diff_memory_file", "merge_diff", "dirty_runs",
    # chunkstore
    "ChunkStoreError", "InvalidSnapshotId", "SnapshotExists", "SnapshotNotFound", "StoreConfigMismatch",
    "BadSnapshotInput", "ChunkMissing", "ChunkCorrupt", "CatalogCorrupt",
    "ZERO_CHUNK", "DEFAULT_CHUNK_SIZE", "DEFAULT_ZSTD_LEVEL",
    "ChunkRef", "PutStats", "GcStats", "StoreStats", "VerifyReport", "SnapshotInfo", "SnapshotView", "ChunkStore",
    # uffd
    "UffdError", "HandshakeError", "FaultOutsideMappings", "SourceMismatch",
    "UffdMapping", "parse_handshake", "encode_handshake", "Install", "Wake",
    "PageSource", "MemoryFileSource", "ChunkStoreSource", "resolve_fault", "FaultResolver",
    "WorkingSetRecorder", "prefetch_plan",
    # uffd_server
    "UffdSyscallError", "Userfaultfd", "PageServer", "send_handshake", "receive_handshake",
]
