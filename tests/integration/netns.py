"""A throw-away network namespace with a TAP device in it, for tests that run a VMM inside it.

    with TapNamespace.create() as ns:          # ember-lt-<random>, tap0 = 10.200.0.1/24, up
        subprocess.run(ns.exec_prefix + ["python", "-m", "vmm.main", ...])

The namespace holds only its own loopback and the TAP, so nothing the guest
sends can be routed anywhere else. Everything is deleted on exit, also when
the body raises (deleting the namespace deletes the TAP with it).
`missing_requirements()` says why the host cannot do this (not root, no
/dev/net/tun, no `ip`), for a `pytest.skip`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["NamespaceError", "TapNamespace", "missing_requirements"]

HOST_ADDR = "10.200.0.1"
PREFIX_LEN = 24


class NamespaceError(RuntimeError):
    """An `ip` command setting up the test namespace failed."""


def missing_requirements() -> str | None:
    """Why a TAP namespace cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces and TAP devices need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise NamespaceError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'status {proc.returncode}'}")


@dataclass
class TapNamespace:
    """A network namespace `name` holding TAP `tap` with address `host_addr`/24."""

    name: str
    tap: str = "tap0"
    host_addr: str = HOST_ADDR
    deleted: bool = False

    @classmethod
    def create(cls, prefix: str = "ember-lt-", tap: str = "tap0") -> "TapNamespace":
        """Make the namespace and its TAP (up, with the address); on any failure nothing is left behind."""
        ns = cls(name=f"{prefix}{secrets.token_hex(4)}", tap=tap)
        _ip("netns", "add", ns.name)
        try:
            _ip("-n", ns.name, "link", "set", "lo", "up")
            _ip("-n", ns.name, "tuntap", "add", "dev", ns.tap, "mode", "tap")
            _ip("-n", ns.name, "addr", "add", f"{ns.host_addr}/{PREFIX_LEN}", "dev", ns.tap)
            _ip("-n", ns.name, "link", "set", ns.tap, "up")
            # No IPv6 router solicitations or MLD reports towards the guest.
            subprocess.run(ns.exec_prefix + ["sysctl", "-qw", f"net.ipv6.conf.{ns.tap}.disable_ipv6=1"],
                           capture_output=True)
        except BaseException:
            ns.delete()
            raise
        return ns

    @property
    def exec_prefix(self) -> list[str]:
        """Prefix for a command that must run inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def delete(self) -> None:
        """Delete the namespace (and the TAP in it); idempotent, never raises."""
        if not self.deleted:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.deleted = True

    def exists(self) -> bool:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return any(line.split()[0] == self.name for line in out.splitlines() if line.strip())

    def __enter__(self) -> "TapNamespace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def __repr__(self) -> str:
        state = " deleted" if self.deleted else ""
        return f"<TapNamespace {self.name} {self.tap}={self.host_addr}/{PREFIX_LEN}{state}>"
