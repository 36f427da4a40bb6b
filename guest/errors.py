"""The root of every error raised while building or finding guest images."""

from __future__ import annotations

__all__ = ["GuestImageError"]


class GuestImageError(Exception):
    """Ember's guest images could not be built or found."""
