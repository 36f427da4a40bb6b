"""Resource IDs (drive_id, iface_id, ...): the rule Firecracker's API applies.

An ID appears in API paths (``/drives/{drive_id}``), so it must be non-empty
and made only of alphanumeric characters and underscores.
"""

from __future__ import annotations

from .errors import InvalidResourceId

__all__ = ["check_resource_id"]


def check_resource_id(resource_id: str) -> None:
    """Raise `InvalidResourceId` unless `resource_id` is usable in an API path."""
    if not resource_id:
        raise InvalidResourceId("The ID cannot be empty.")
    if not all(ch == "_" or ch.isalnum() for ch in resource_id):
        raise InvalidResourceId()
