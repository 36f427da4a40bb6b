"""The host side of a virtio-net device: an existing TAP interface, opened by name.

Primer. A TAP is a virtual Ethernet interface whose "wire" is a file
descriptor: a frame the host stack sends out of the interface is read from
the fd, and a frame written to the fd arrives at the host as if received.
It is attached by opening /dev/net/tun and naming the interface with the
TUNSETIFF ioctl (linux/if_tun.h, Documentation/networking/tuntap.rst):

    IFF_TAP        Ethernet frames (not bare IP packets, IFF_TUN)
    IFF_NO_PI      no 4-byte packet-information prefix
    IFF_VNET_HDR   every frame is preceded by a virtio-net header, whose
                   size is set with TUNSETVNETHDRSZ (12 bytes: the VERSION_1
                   header) and whose byte order with TUNSETVNETLE

TUNSETOFFLOAD tells the kernel which offloads the reader accepts (partial
checksums, TSO, UFO): set to what the guest negotiated, so the kernel never
hands the device a packet the guest could not take. Each read returns one
whole frame; the fd is non-blocking (BlockingIOError when nothing is queued).

The VMM never creates a TAP (as Firecracker): the operator does, with
`ip tuntap add dev NAME mode tap`. TUNSETIFF on a name that does not exist
would create a throw-away interface, so `Tap.open` first checks the name
exists in this network namespace and afterwards that the interface is
persistent (what `ip tuntap add` makes); otherwise it gives the interface
up and fails.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Protocol, Sequence

__all__ = [
    "TUN_DEVICE",
    "IFNAMSIZ",
    "IFF_TAP",
    "IFF_NO_PI",
    "IFF_VNET_HDR",
    "IFF_PERSIST",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TUN_F_UFO",
    "TUNSETIFF",
    "TUNGETIFF",
    "TUNSETOFFLOAD",
    "TUNSETVNETHDRSZ",
    "TUNSETVNETLE",
    "TapError",
    "InvalidTapName",
    "TunUnavailable",
    "TapNotFound",
    "TapBusy",
    "TapPermissionDenied",
    "NotATap",
    "TapConfigError",
    "TapBackend",
    "Tap",
]

TUN_DEVICE = "/dev/net/tun"

# linux/if.h: interface names are at most IFNAMSIZ bytes including the NUL.
IFNAMSIZ = 16

# linux/if_tun.h: TUNSETIFF flags.
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_PERSIST = 0x0800

# linux/if_tun.h: TUNSETOFFLOAD flags (what the reader of the fd can take).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10


def _ioc(direction: int, type_: str, nr: int, size: int) -> int:
    """asm-generic/ioctl.h _IOC: dir(2) size(14) type(8) nr(8)."""
    return direction << 30 | size << 16 | ord(type_) << 8 | nr


_IOC_WRITE = 1
_IOC_READ = 2
_INT_SIZE = 4

# linux/if_tun.h ioctl numbers.
TUNSETIFF = _ioc(_IOC_WRITE, "T", 202, _INT_SIZE)
TUNGETIFF = _ioc(_IOC_READ, "T", 210, _INT_SIZE)
TUNSETOFFLOAD = _ioc(_IOC_WRITE, "T", 208, _INT_SIZE)
TUNSETVNETHDRSZ = _ioc(_IOC_WRITE, "T", 216, _INT_SIZE)
TUNSETVNETLE = _ioc(_IOC_WRITE, "T", 220, _INT_SIZE)

# linux/if.h struct ifreq on 64-bit Linux: char ifr_name[16]; then a 24-byte union
# whose first member used here is `short ifr_flags`. 40 bytes in all.
_IFREQ = struct.Struct("=16sh22x")
_INT = struct.Struct("=i")

# virtio 1.1 §5.1.6: the VERSION_1 header (num_buffers included).
DEFAULT_VNET_HDR_LEN = 12


class TapError(Exception):
    """The TAP interface could not be opened or configured."""


class InvalidTapName(TapError):
    """A TAP name has 1 to 15 bytes, no '/', ':', whitespace or NUL."""


class TunUnavailable(TapError):
    """/dev/net/tun could not be opened."""


class TapNotFound(TapError):
    """No TAP interface of that name exists in this network namespace (the VMM never creates one)."""


class TapBusy(TapError):
    """The TAP is already attached to another file descriptor (another VMM?)."""


class TapPermissionDenied(TapError):
    """The TAP belongs to another user or group, or CAP_NET_ADMIN is missing."""


class NotATap(TapError):
    """The interface is not a (single-queue) TAP device."""


class TapConfigError(TapError):
    """A TUNSET* ioctl that configures the attached TAP failed."""


class TapBackend(Protocol):
    """What the virtio-net device needs of its host side (`Tap`, or a test double).

    `read_frame` reads one frame (vnet header included) into `buf` and
    returns its length, raising BlockingIOError when none is queued;
    `write_frame` writes one frame given as parts (vnet header first).
    """

    @property
    def name(self) -> str: ...

    def fileno(self) -> int: ...

    def read_frame(self, buf: bytearray | memoryview) -> int: ...

    def write_frame(self, parts: Sequence[bytes | bytearray | memoryview]) -> int: ...

    def set_offload(self, flags: int) -> None: ...

    def close(self) -> None: ...


def _encode_name(name: str) -> bytes:
    try:
        encoded = name.encode("ascii")
    except UnicodeEncodeError:
        encoded = b""
    if (not encoded or len(encoded) >= IFNAMSIZ or name in (".", "..")
            or any(c in name for c in "/:\0") or any(c.isspace() for c in name)):
        raise InvalidTapName(f"cannot open TAP {name!r}: {InvalidTapName.__doc__}")
    return encoded


class Tap:
    """An attached TAP: a non-blocking, close-on-exec fd in IFF_TAP | IFF_NO_PI | IFF_VNET_HDR mode."""

    def __init__(self, fd: int, name: str, vnet_hdr_len: int):
        """Wrap an fd that is already attached and configured (use `Tap.open`)."""
        self._fd = fd
        self._name = name
        self.vnet_hdr_len = vnet_hdr_len
        self.offload_flags = 0

    @classmethod
    def open(cls, name: str, *, vnet_hdr_len: int = DEFAULT_VNET_HDR_LEN) -> Tap:
        """Attach to the existing TAP `name`, vnet header of `vnet_hdr_len` bytes, no offloads yet.

        Raises a `TapError` whose message starts "cannot open TAP <name>:".
        """
        encoded = _encode_name(name)
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise TapNotFound(f"cannot open TAP {name}: no such network interface in this network namespace "
                              f"(the VMM does not create TAPs; e.g. `ip tuntap add dev {name} mode tap`)") from None
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunUnavailable(f"cannot open TAP {name}: {TUN_DEVICE}: {exc.strerror}") from exc
        try:
            attached = cls._attach(fd, name, encoded)
            tap = cls(fd, attached, vnet_hdr_len)
            tap._configure(vnet_hdr_len)
        except BaseException:
            os.close(fd)
            raise
        return tap

    @staticmethod
    def _attach(fd: int, name: str, encoded: bytes) -> str:
        ifreq = bytearray(_IFREQ.pack(encoded, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        try:
            # SAFETY: `ifreq` is a 40-byte struct ifreq (name, flags, zeroed union tail); fcntl
            # copies it to a buffer of its own for the call and back into `ifreq` afterwards.
            fcntl.ioctl(fd, TUNSETIFF, ifreq)
        except OSError as exc:
            raise _attach_error(name, exc) from exc
        attached = _IFREQ.unpack(ifreq)[0].rstrip(b"\0").decode("ascii", "replace")
        flags = bytearray(_IFREQ.size)
        try:
            # SAFETY: TUNGETIFF writes one struct ifreq (40 bytes) into the buffer fcntl lends
            # it, which is then copied into `flags`, exactly that size.
            fcntl.ioctl(fd, TUNGETIFF, flags)
        except OSError as exc:
            raise TapConfigError(f"cannot open TAP {name}: TUNGETIFF: {exc.strerror}") from exc
        if not _IFREQ.unpack(flags)[1] & IFF_PERSIST:
            # The interface went away between the name check and TUNSETIFF, and the kernel
            # made a fresh one; it disappears when `fd` closes.
            raise TapNotFound(f"cannot open TAP {name}: no such persistent TAP interface "
                              f"(the VMM does not create TAPs; e.g. `ip tuntap add dev {name} mode tap`)")
        return attached

    def _configure(self, vnet_hdr_len: int) -> None:
        try:
            # SAFETY: TUNSETVNETHDRSZ reads one int through the pointer; fcntl passes a
            # pointer to its copy of this 4-byte buffer, alive for the call.
            fcntl.ioctl(self._fd, TUNSETVNETHDRSZ, _INT.pack(vnet_hdr_len))
            # SAFETY: as above, one int (1: the header's fields are little-endian, as
            # VERSION_1 requires, whatever the host's byte order).
            fcntl.ioctl(self._fd, TUNSETVNETLE, _INT.pack(1))
        except OSError as exc:
            raise TapConfigError(f"cannot open TAP {self._name}: cannot set the vnet header: {exc.strerror}") from exc
        self.set_offload(0)

    # --- the TapBackend interface -----------------------------------------------------------

    @property
    def name(self) -> str:
        """The interface name the kernel attached to."""
        return self._name

    def fileno(self) -> int:
        if self._fd < 0:
            raise TapError(f"TAP {self._name} is closed")
        return self._fd

    def read_frame(self, buf: bytearray | memoryview) -> int:
        """Read one frame (vnet header first) into `buf`; BlockingIOError if none is queued.

        A frame longer than `buf` is truncated by the kernel.
        """
        return os.readv(self.fileno(), [buf])

    def write_frame(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """Write one frame (vnet header first) given as consecutive parts; returns the bytes written."""
        return os.writev(self.fileno(), parts)

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: the TUN_F_* offloads the reader (the guest) accepts."""
        try:
            # SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int in the
            # pointer-sized slot); no memory is passed.
            fcntl.ioctl(self.fileno(), TUNSETOFFLOAD, flags)
        except OSError as exc:
            raise TapConfigError(f"TAP {self._name}: cannot set offloads {flags:#x}: {exc.strerror}") from exc
        self.offload_flags = flags

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        state = f"fd={self._fd}" if self._fd >= 0 else "closed"
        return f"<Tap {self._name} {state} vnet_hdr={self.vnet_hdr_len} offload={self.offload_flags:#x}>"


def _attach_error(name: str, exc: OSError) -> TapError:
    code = exc.errno
    if code == errno.EBUSY:
        return TapBusy(f"cannot open TAP {name}: it is attached to another file descriptor "
                       f"(another VMM?): {exc.strerror}")
    if code == errno.EPERM:
        return TapPermissionDenied(f"cannot open TAP {name}: {exc.strerror} (the TAP belongs to another "
                                   "user or group, or CAP_NET_ADMIN is missing)")
    if code == errno.EINVAL:
        return NotATap(f"cannot open TAP {name}: {exc.strerror} (not a TAP, or a multi-queue one)")
    return TapError(f"cannot open TAP {name}: TUNSETIFF: {exc.strerror}")
