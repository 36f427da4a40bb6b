"""The shape shared by the error families of `snapshot` (one per module).

An error's class docstring, first line, is what went wrong; an optional
detail says where or how much; an optional path says which file. So
``str(exc)`` reads ``/snap/vm.state: Checksum mismatch: stored 1f.., computed 9a..``.
"""

from __future__ import annotations

import os


class DocumentedError(Exception):
    """Snapshot operation failed."""

    def __init__(self, detail: str = "", *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path = os.fspath(path) if path is not None else None

    @property
    def summary(self) -> str:
        """The first line of the class docstring: what went wrong."""
        doc = type(self).__doc__ or type(self).__name__
        return doc.strip().splitlines()[0].rstrip(".")

    def __str__(self) -> str:
        text = self.summary
        if self.detail:
            text = f"{text}: {self.detail}"
        if self.path is not None:
            text = f"{self.path}: {text}"
        return " ".join(text.split())
