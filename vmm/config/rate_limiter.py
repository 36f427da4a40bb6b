"""Rate limiter configuration: two token buckets (bytes and operations).

Spec: `RateLimiter` and `TokenBucket` definitions. A bucket holds `size`
tokens, refills completely every `refill_time` milliseconds, and may grant an
extra `one_time_burst` of tokens once at the start. A bucket with `size` 0 or
`refill_time` 0 limits nothing (Firecracker builds no bucket for it); a
limiter with neither bucket limits nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import U64, ConfigType, Field, Schema, nested

__all__ = ["TokenBucketConfig", "RateLimiterConfig"]


@dataclass(frozen=True)
class TokenBucketConfig(ConfigType):
    """Spec `TokenBucket`: `size` tokens per `refill_time` ms, plus a one-time burst."""

    size: int
    refill_time: int
    one_time_burst: int | None = None

    SCHEMA = Schema(
        "TokenBucketConfig",
        [
            Field("size", U64),
            Field.option("one_time_burst", U64),
            Field("refill_time", U64),
        ],
    )

    @property
    def enabled(self) -> bool:
        """False when the bucket limits nothing (size or refill time is 0)."""
        return self.size > 0 and self.refill_time > 0


@dataclass(frozen=True)
class RateLimiterConfig(ConfigType):
    """Spec `RateLimiter`: an optional bandwidth (bytes) and ops bucket."""

    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None

    SCHEMA = Schema(
        "RateLimiterConfig",
        [
            Field.option("bandwidth", nested(TokenBucketConfig)),
            Field.option("ops", nested(TokenBucketConfig)),
        ],
    )

    @property
    def enabled(self) -> bool:
        """False when neither bucket limits anything."""
        return any(b is not None and b.enabled for b in (self.bandwidth, self.ops))
