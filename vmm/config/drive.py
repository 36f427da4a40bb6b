"""Block devices: virtio-block backed by a host file, or vhost-user-block.

Spec: `Drive` (PUT /drives/{drive_id}, ``drives`` in the config file) and
`PartialDrive` (PATCH /drives/{drive_id}, post-boot). The backend is chosen
by which fields are present, as in Firecracker: `path_on_host` without
`socket` is virtio-block; `socket` alone (no `path_on_host`, `is_read_only`,
`rate_limiter` or `io_engine`) is vhost-user-block; anything else is invalid.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import InvalidBlockConfig
from .ids import check_resource_id
from .rate_limiter import RateLimiterConfig
from .schema import ConfigType, Field, Schema, enum_of, nested, read_bool, read_str

__all__ = ["CacheType", "IoEngine", "DriveConfig", "DrivePatch"]


class CacheType(enum.StrEnum):
    """Spec `Drive.cache_type`: whether flushes are advertised to the guest."""

    UNSAFE = "Unsafe"  # no flush feature; guest flushes are not honoured
    WRITEBACK = "Writeback"  # VIRTIO_BLK_F_FLUSH advertised, flush -> fsync


class IoEngine(enum.StrEnum):
    """Spec `Drive.io_engine` (Firecracker's declaration order: Async, Sync)."""

    ASYNC = "Async"  # io_uring
    SYNC = "Sync"  # blocking syscalls


@dataclass(frozen=True)
class DriveConfig(ConfigType):
    """Spec `Drive`. `is_read_only`/`io_engine` stay None when not given."""

    drive_id: str
    path_on_host: str | None = None
    is_root_device: bool = False
    is_read_only: bool | None = None
    partuuid: str | None = None
    cache_type: CacheType = CacheType.UNSAFE
    rate_limiter: RateLimiterConfig | None = None
    io_engine: IoEngine | None = None
    socket: str | None = None

    SCHEMA = Schema(
        "BlockDeviceConfig",
        [
            Field("drive_id", read_str),
            Field.option("partuuid", read_str),
            Field("is_root_device", read_bool),
            Field("cache_type", enum_of(CacheType), default=CacheType.UNSAFE),
            Field.option("is_read_only", read_bool),
            Field.option("path_on_host", read_str),
            Field.option("rate_limiter", nested(RateLimiterConfig)),
            Field.option("io_engine", enum_of(IoEngine)),
            Field.option("socket", read_str),
        ],
    )

    @property
    def is_vhost_user(self) -> bool:
        """True for a vhost-user-block drive (backend behind `socket`)."""
        return self.socket is not None

    @property
    def read_only(self) -> bool:
        """Whether the guest sees the disk read-only (absent means writable)."""
        return bool(self.is_read_only)

    @property
    def effective_io_engine(self) -> IoEngine:
        """The engine a virtio-block drive uses (Sync unless Async was asked for)."""
        return self.io_engine or IoEngine.SYNC

    def validate(self) -> None:
        check_resource_id(self.drive_id)
        virtio_block = self.path_on_host is not None and self.socket is None
        vhost_user = self.socket is not None and all(
            value is None
            for value in (self.path_on_host, self.is_read_only, self.rate_limiter, self.io_engine)
        )
        if not (virtio_block or vhost_user):
            raise InvalidBlockConfig(
                "Unable to create the virtio block device: Invalid block config. "
                "A virtio-block drive needs `path_on_host` and no `socket`; a "
                "vhost-user-block drive needs `socket` and none of `path_on_host`, "
                "`is_read_only`, `rate_limiter`, `io_engine`."
            )


@dataclass(frozen=True)
class DrivePatch(ConfigType):
    """Spec `PartialDrive`: a new backing file and/or rate limiter for a drive."""

    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiterConfig | None = None

    SCHEMA = Schema(
        "BlockDeviceUpdateConfig",
        [
            Field("drive_id", read_str),
            Field.option("path_on_host", read_str, skip_none=True),
            Field.option("rate_limiter", nested(RateLimiterConfig), skip_none=True),
        ],
    )

    def validate(self) -> None:
        check_resource_id(self.drive_id)
