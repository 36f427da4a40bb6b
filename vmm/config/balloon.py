"""Balloon device configuration.

Spec: `Balloon` (PUT /balloon, ``balloon`` in the config file),
`BalloonUpdate` (PATCH /balloon) and `BalloonStatsUpdate`
(PATCH /balloon/statistics). That the balloon's target fits in guest memory
is checked where both are known (`VmConfig.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import U16, U32, ConfigType, Field, Schema, read_bool

__all__ = [
    "BalloonConfig",
    "BalloonUpdateConfig",
    "BalloonStatsUpdateConfig",
]


@dataclass(frozen=True)
class BalloonConfig(ConfigType):
    """Spec `Balloon`: target size, deflate-on-OOM, statistics and page hinting/reporting.

    A non-zero `stats_polling_interval_s` enables the statistics queue.
    """

    amount_mib: int
    deflate_on_oom: bool
    stats_polling_interval_s: int = 0
    free_page_hinting: bool = False
    free_page_reporting: bool = False

    SCHEMA = Schema(
        "BalloonDeviceConfig",
        [
            Field("amount_mib", U32),
            Field("deflate_on_oom", read_bool),
            Field("stats_polling_interval_s", U16, default=0),
            Field("free_page_hinting", read_bool, default=False),
            Field("free_page_reporting", read_bool, default=False),
        ],
    )

    @property
    def stats_enabled(self) -> bool:
        return self.stats_polling_interval_s > 0


@dataclass(frozen=True)
class BalloonUpdateConfig(ConfigType):
    """Spec `BalloonUpdate`: a new target size (post-boot)."""

    amount_mib: int

    SCHEMA = Schema("BalloonUpdateConfig", [Field("amount_mib", U32)])


@dataclass(frozen=True)
class BalloonStatsUpdateConfig(ConfigType):
    """Spec `BalloonStatsUpdate`: a new statistics polling interval (post-boot)."""

    stats_polling_interval_s: int

    SCHEMA = Schema(
        "BalloonUpdateStatsConfig", [Field("stats_polling_interval_s", U16)]
    )
