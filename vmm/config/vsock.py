"""Vsock: a virtio-vsock device proxied to Unix domain sockets on the host.

Spec: `Vsock` (PUT /vsock, ``vsock`` in the config file). Host-initiated
connections go through the socket Ember listens on at `uds_path` (``CONNECT
<port>\\n``); guest-initiated connections to port P go to ``<uds_path>_P``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidGuestCid, InvalidUdsPath
from .schema import U32, ConfigType, Field, Schema, read_str

__all__ = ["VsockConfig", "VMADDR_CID_HOST", "VMADDR_CID_ANY", "UNIX_PATH_MAX"]

# linux/vm_sockets.h: CIDs 0 (hypervisor), 1 (local) and 2 (host) are
# reserved, and VMADDR_CID_ANY means "any"; a guest gets a CID above 2.
VMADDR_CID_HOST = 2
VMADDR_CID_ANY = 0xFFFF_FFFF
# linux/un.h: sizeof(sockaddr_un.sun_path), terminating NUL included.
UNIX_PATH_MAX = 108


@dataclass(frozen=True)
class VsockConfig(ConfigType):
    """Spec `Vsock`: the guest's CID and the host-side socket path.

    `vsock_id` is deprecated in the spec; it is accepted and written back only
    when given.
    """

    guest_cid: int
    uds_path: str
    vsock_id: str | None = None

    SCHEMA = Schema(
        "VsockDeviceConfig",
        [
            Field.option("vsock_id", read_str, skip_none=True),
            Field("guest_cid", U32),
            Field("uds_path", read_str),
        ],
    )

    def validate(self) -> None:
        if not VMADDR_CID_HOST < self.guest_cid < VMADDR_CID_ANY:
            raise InvalidGuestCid(
                f"Invalid guest CID {self.guest_cid}: it must be at least 3 "
                f"(0, 1 and 2 are reserved) and below {VMADDR_CID_ANY}."
            )
        if not self.uds_path:
            raise InvalidUdsPath()
        size = len(self.uds_path.encode("utf-8", "surrogatepass"))
        if size >= UNIX_PATH_MAX:
            raise InvalidUdsPath(
                f"The vsock Unix domain socket path is too long: {size} bytes, "
                f"at most {UNIX_PATH_MAX - 1}."
            )
