"""Entropy device configuration.

Spec: `EntropyDevice` (PUT /entropy, ``entropy`` in the config file): a
virtio-rng device feeding the guest host randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rate_limiter import RateLimiterConfig
from .schema import ConfigType, Field, Schema, nested

__all__ = ["EntropyConfig"]


@dataclass(frozen=True)
class EntropyConfig(ConfigType):
    """Spec `EntropyDevice`: optionally rate limited (bytes and requests)."""

    rate_limiter: RateLimiterConfig | None = None

    SCHEMA = Schema(
        "EntropyDeviceConfig",
        [Field.option("rate_limiter", nested(RateLimiterConfig))],
    )
