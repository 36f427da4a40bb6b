"""Watching for imports after a Python process entered its jail.

Inside the jail the interpreter's library directories do not exist, so a
module imported late (a lazy ``import`` inside a function) fails with
ImportError at whatever moment it is first needed. `ImportWatch` makes
such imports visible: an audit hook (PEP 578) sees the ``import`` event,
which CPython raises only for a module that is not in `sys.modules` yet,
and reports each one (once) to a callback and in `late`.

Audit hooks cannot be removed; `stop()` only silences this one.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

__all__ = ["ImportWatch"]


class ImportWatch:
    """Records every import of a module not yet loaded, from `start()` on."""

    def __init__(self, on_import: Callable[[str], None] | None = None) -> None:
        self.on_import = on_import
        self.late: list[str] = []
        self._active = False
        self._installed = False
        self._lock = threading.Lock()
        self._reporting = threading.local()

    def __repr__(self) -> str:
        return f"<ImportWatch active={self._active} late={len(self.late)}>"

    def start(self) -> None:
        """Begin recording (installs the audit hook once)."""
        if not self._installed:
            sys.addaudithook(self._hook)
            self._installed = True
        self._active = True

    def stop(self) -> None:
        self._active = False

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "import" or not self._active or getattr(self._reporting, "busy", False):
            return
        name = str(args[0]) if args else "?"
        with self._lock:
            if name in self.late:
                return
            self.late.append(name)
        if self.on_import is not None:
            self._reporting.busy = True  # a callback that imports must not recurse into itself
            try:
                self.on_import(name)
            except Exception:  # noqa: BLE001 - an audit hook must never break the import it watches
                pass
            finally:
                self._reporting.busy = False
