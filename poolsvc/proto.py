"""The generated gRPC modules for ``proto/ember/pool/v1/pool.proto``, built on first use.

Generated code is never committed (it would go stale): `load()` compiles the
.proto with grpc_tools' protoc into a cache directory keyed by what decides
the output —

    $EMBER_HOME/gen/<sha256(proto text, grpcio-tools version, protobuf version)>/
        ember/pool/v1/pool_pb2.py, pool_pb2_grpc.py

— and imports ``ember.pool.v1.pool_pb2`` / ``pool_pb2_grpc`` from there.
Changing the .proto (or upgrading the code generator) changes the key, so
the next process regenerates. Compilation happens in a temporary directory
next to the final one and is published with one ``rename``: concurrent first
users (several processes starting at once) each compile, one rename wins,
the others discard their copy and use the winner's. A directory that exists
is therefore complete.

Within a process the modules are imported once: protobuf's default
descriptor pool refuses a second, different definition of the same file, so
a changed .proto needs a new process (`generate` alone has no such limit).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.resources
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

#: The .proto, relative to the proto root (it is also its import name).
PROTO_NAME = "ember/pool/v1/pool.proto"
#: Where the repository keeps its .proto files.
PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"

_MODULE = "ember.pool.v1.pool_pb2"
_GRPC_MODULE = "ember.pool.v1.pool_pb2_grpc"


class ProtoError(Exception):
    """Could not generate or import the gRPC modules."""


class ProtoCompileError(ProtoError):
    """protoc rejected the .proto."""


class ProtoConflict(ProtoError):
    """This process already imported a different version of the generated modules."""


_lock = threading.Lock()
_loaded: tuple[str, ModuleType, ModuleType] | None = None  # (key, pool_pb2, pool_pb2_grpc)


def ember_home() -> Path:
    """$EMBER_HOME, or ~/.cache/ember (as guest.images)."""
    env = os.environ.get("EMBER_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "ember"


def _versions() -> str:
    try:
        tools = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ProtoError(f"{ProtoError.__doc__} (grpcio-tools is not installed)") from exc
    import google.protobuf
    return f"grpcio-tools {tools}\nprotobuf {google.protobuf.__version__}\n"


def cache_key(proto_text: bytes) -> str:
    """The cache directory name for this .proto text and these code generators."""
    h = hashlib.sha256()
    h.update(proto_text)
    h.update(b"\0")
    h.update(_versions().encode())
    return h.hexdigest()


def _well_known_include() -> Path:
    """grpc_tools' bundled google/protobuf/*.proto (Duration, Timestamp, ...)."""
    return Path(str(importlib.resources.files("grpc_tools") / "_proto"))


def generate(proto_root: Path = PROTO_ROOT, home: Path | None = None) -> Path:
    """Compile ``proto_root/PROTO_NAME`` unless cached; the directory to put on sys.path."""
    source = proto_root / PROTO_NAME
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise ProtoError(f"{ProtoError.__doc__} ({source}: {exc.strerror})") from exc
    gen = (home or ember_home()) / "gen"
    final = gen / cache_key(text)
    if final.is_dir():
        return final
    gen.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=gen))
    try:
        # Compile a copy of the text that was hashed, so the key names exactly
        # what is inside even if the source changes meanwhile.
        src_root = tmp / "src"
        (src_root / PROTO_NAME).parent.mkdir(parents=True)
        (src_root / PROTO_NAME).write_bytes(text)
        out = tmp / "out"
        out.mkdir()
        cmd = [sys.executable, "-m", "grpc_tools.protoc",
               f"-I{src_root}", f"-I{_well_known_include()}",
               f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
               PROTO_NAME]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            detail = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
            raise ProtoCompileError(f"{ProtoCompileError.__doc__} ({source}: {detail})")
        try:
            os.rename(out, final)  # atomic publish; fails if another process won
        except OSError:
            if not final.is_dir():
                raise
    except OSError as exc:
        raise ProtoError(f"{ProtoError.__doc__} ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load(proto_root: Path = PROTO_ROOT, home: Path | None = None) -> tuple[ModuleType, ModuleType]:
    """``(pool_pb2, pool_pb2_grpc)``, generated if needed, imported once per process."""
    global _loaded
    with _lock:
        out = generate(proto_root, home)
        if _loaded is not None:
            if _loaded[0] != out.name:
                raise ProtoConflict(f"{ProtoConflict.__doc__} (loaded {_loaded[0][:12]}, "
                                    f"asked for {out.name[:12]}: restart the process)")
            return _loaded[1], _loaded[2]
        if str(out) not in sys.path:
            sys.path.insert(0, str(out))
        try:
            pb2 = importlib.import_module(_MODULE)
            pb2_grpc = importlib.import_module(_GRPC_MODULE)
        except ImportError as exc:
            raise ProtoError(f"{ProtoError.__doc__} ({exc})") from exc
        if not str(getattr(pb2, "__file__", "")).startswith(str(out)):
            raise ProtoConflict(f"{ProtoConflict.__doc__} ({_MODULE} came from {pb2.__file__})")
        _loaded = (out.name, pb2, pb2_grpc)
        return pb2, pb2_grpc
