"""`JailSpec`: everything that defines one jail, as frozen plain data with a validated JSON form.

The spec travels from the process that prepares the jail (root, outside)
to the process that enters it (the VMM), as a JSON file (``ember-jailer``
-> ``ember-vmm --jail FILE``) or inside a zygote request; `from_json`
treats it as untrusted input.
"""

from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "SpecError", "JailSpec", "CgroupSpec", "BindMount", "HardLink",
    "DEFAULT_DEVICES", "RLIMITS", "DEFAULT_RLIMITS", "chroot_dir", "SPEC_FORMAT",
]

SPEC_FORMAT = 1
#: Device nodes a VMM needs, created in the jail with the host's major/minor (absent ones are skipped).
DEFAULT_DEVICES = ("/dev/kvm", "/dev/net/tun", "/dev/userfaultfd")
#: Firecracker's `--resource-limit` names -> setrlimit resources.
RLIMITS = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}
#: Firecracker's jailer default: 2048 open files.
DEFAULT_RLIMITS = (("no-file", 2048),)

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_ID = 1 << 31


class SpecError(ValueError):
    """A jail specification is invalid."""


def chroot_dir(base: str, exec_file: str, jail_id: str) -> str:
    """Firecracker's layout: ``<chroot-base>/<exec file name>/<id>/root``."""
    return os.path.join(base, os.path.basename(exec_file), jail_id, "root")


def _jail_path(path: Any, what: str) -> str:
    """A path inside the jail: absolute, normalised, no '..' (returned without the leading '/')."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise SpecError(f"{what} {path!r} must be an absolute path inside the jail")
    norm = os.path.normpath(path)
    if norm == "/" or ".." in path.split("/"):
        raise SpecError(f"{what} {path!r} must name a file inside the jail")
    return norm


def _host_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise SpecError(f"{what} {path!r} must be an absolute host path")
    return path


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SpecError(f"{what} must be an integer in [{lo}, {hi}], not {value!r}")
    return value


@dataclass(frozen=True)
class HardLink:
    """Host file `source` hard-linked at `target` in the jail (same filesystem; keeps owner and mode)."""

    source: str
    target: str

    def __post_init__(self) -> None:
        _host_path(self.source, "hard link source")
        object.__setattr__(self, "target", _jail_path(self.target, "hard link target"))


@dataclass(frozen=True)
class BindMount:
    """Host file or directory `source` bind-mounted at `target`, in the jail's own mount namespace only."""

    source: str
    target: str
    read_only: bool = True

    def __post_init__(self) -> None:
        _host_path(self.source, "bind mount source")
        object.__setattr__(self, "target", _jail_path(self.target, "bind mount target"))


@dataclass(frozen=True)
class CgroupSpec:
    """The jail's cgroup: `version` 1 or 2 (0: detect), its path under each hierarchy, control-file settings."""

    path: str
    settings: tuple[tuple[str, str], ...] = ()
    version: int = 0

    def __post_init__(self) -> None:
        if self.version not in (0, 1, 2):
            raise SpecError(f"cgroup version must be 1, 2 or 0 (detect), not {self.version!r}")
        parts = self.path.split("/") if isinstance(self.path, str) else [""]
        if any(p in ("", ".", "..") for p in parts):
            raise SpecError(f"invalid cgroup path {self.path!r}")
        for item in self.settings:
            if (not isinstance(item, tuple) or len(item) != 2 or not all(isinstance(x, str) for x in item)
                    or "/" in item[0] or "." not in item[0]):
                raise SpecError(f"invalid cgroup setting {item!r}: expected (\"<controller>.<file>\", value)")


@dataclass(frozen=True)
class JailSpec:
    """One jail. `chroot` is the directory that becomes the jailed process's ``/``."""

    id: str
    chroot: str
    uid: int
    gid: int
    netns: str | None = None
    cgroup: CgroupSpec | None = None
    rlimits: tuple[tuple[str, int], ...] = DEFAULT_RLIMITS
    #: Set by whoever forks the jailed process into a new PID namespace (the jailer, the zygote);
    #: `enter` checks that it runs as pid 1 then.
    new_pid_ns: bool = False
    devices: tuple[str, ...] = DEFAULT_DEVICES
    links: tuple[HardLink, ...] = ()
    binds: tuple[BindMount, ...] = ()
    hostname: str = field(default="")

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise SpecError(f"invalid jail id {self.id!r}: letters, digits, '_', '.', '-' (not first), at most 64")
        if not isinstance(self.chroot, str) or not os.path.isabs(self.chroot) or os.path.normpath(self.chroot) == "/":
            raise SpecError(f"the chroot {self.chroot!r} must be an absolute path other than /")
        object.__setattr__(self, "chroot", os.path.normpath(self.chroot))
        _int(self.uid, "uid", 1, _MAX_ID - 1)
        _int(self.gid, "gid", 1, _MAX_ID - 1)
        if self.netns is not None:
            _host_path(self.netns, "netns")
        for item in self.rlimits:
            if not isinstance(item, tuple) or len(item) != 2 or item[0] not in RLIMITS:
                raise SpecError(f"invalid resource limit {item!r}: expected ({'|'.join(RLIMITS)}, value)")
            _int(item[1], f"resource limit {item[0]}", 0, (1 << 63) - 1)
        for dev in self.devices:
            _jail_path(dev, "device")
        if not self.hostname:
            object.__setattr__(self, "hostname", self.id)

    def __repr__(self) -> str:
        return f"<JailSpec {self.id} {self.chroot} uid={self.uid} gid={self.gid}>"

    def with_(self, **changes: Any) -> JailSpec:
        """A copy with `changes` (validated again)."""
        return replace(self, **changes)

    def host_path(self, jail_path: str) -> str:
        """Where the jail's `jail_path` is on the host."""
        return os.path.join(self.chroot, _jail_path(jail_path, "path").lstrip("/"))

    # --- JSON --------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT, "id": self.id, "chroot": self.chroot, "uid": self.uid, "gid": self.gid,
            "netns": self.netns,
            "cgroup": None if self.cgroup is None else {
                "path": self.cgroup.path, "version": self.cgroup.version,
                "settings": [list(s) for s in self.cgroup.settings]},
            "rlimits": [list(r) for r in self.rlimits], "new_pid_ns": self.new_pid_ns,
            "devices": list(self.devices),
            "links": [{"source": ln.source, "target": ln.target} for ln in self.links],
            "binds": [{"source": b.source, "target": b.target, "read_only": b.read_only} for b in self.binds],
            "hostname": self.hostname,
        }

    @classmethod
    def from_json(cls, doc: Any) -> JailSpec:
        """Validate untrusted `doc` (unknown keys are refused)."""
        if not isinstance(doc, dict):
            raise SpecError("a jail spec is a JSON object")
        known = {"format", "id", "chroot", "uid", "gid", "netns", "cgroup", "rlimits", "new_pid_ns", "devices",
                 "links", "binds", "hostname"}
        unknown = set(doc) - known
        if unknown:
            raise SpecError(f"unknown fields in jail spec: {', '.join(sorted(unknown))}")
        if doc.get("format") != SPEC_FORMAT:
            raise SpecError(f"jail spec format {doc.get('format')!r} is not {SPEC_FORMAT}")
        try:
            cg = doc.get("cgroup")
            cgroup = None
            if cg is not None:
                if not isinstance(cg, dict) or set(cg) - {"path", "version", "settings"}:
                    raise SpecError(f"invalid cgroup {cg!r}")
                cgroup = CgroupSpec(path=cg["path"], version=cg.get("version", 0),
                                    settings=tuple(tuple(s) for s in cg.get("settings", ())))
            return cls(
                id=doc["id"], chroot=doc["chroot"], uid=doc["uid"], gid=doc["gid"], netns=doc.get("netns"),
                cgroup=cgroup,
                rlimits=tuple(tuple(r) for r in doc.get("rlimits", DEFAULT_RLIMITS)),  # type: ignore[misc]
                new_pid_ns=bool(doc.get("new_pid_ns", False)),
                devices=tuple(doc.get("devices", DEFAULT_DEVICES)),
                links=tuple(HardLink(**ln) for ln in doc.get("links", ())),
                binds=tuple(BindMount(**b) for b in doc.get("binds", ())),
                hostname=doc.get("hostname", "") or "")
        except SpecError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"invalid jail spec: {exc!r}") from exc
