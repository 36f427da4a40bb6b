"""Process-wide logging for ember-vmm (structlog), reconfigurable through PUT /logger.

Two destinations:

* by default, stderr, one human-readable line per event (stdout belongs to
  the guest's serial console);
* once a `LoggerConfig` names a `log_path` (``--log-path``, ``logger`` in
  the config file, PUT /logger): that file or named pipe, one JSON object
  per line.

The log file is opened as Firecracker opens it (`open_file_nonblock`:
read-write, create, ``O_NONBLOCK``; Ember adds ``O_APPEND``): opening a
named pipe read-write neither waits for a reader nor fails without one, and
the pipe never raises EPIPE. A line that does not fit in a full pipe is
dropped and counted (`Logger.missed_log_count`, the metric
``logger.missed_log_count``): logging never stalls the event loop or a vCPU.

Settings follow Firecracker's `Logger::update`: a configuration without
`level` resets the level to Info; `log_path`, `show_level`,
`show_log_origin` and `module` keep their current value when not given.
`module` keeps only events of loggers whose name starts with it
(``vmm.api`` for the API server; Ember names loggers after modules).

A JSON line holds ``timestamp`` (ISO 8601, UTC), ``instance`` (the
microVM id), ``thread``, ``level`` (with `show_level`), ``origin``
(``file.py:line``, with `show_log_origin`), ``logger``, ``event`` and the
event's own key-values.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, TextIO

import structlog

from vmm.config import LoggerConfig

__all__ = [
    "LoggerError",
    "LogPathError",
    "LineWriter",
    "LogSettings",
    "Logger",
    "LOGGER",
    "level_number",
    "configure_logging",
    "fatal",
]

DEFAULT_INSTANCE_ID = "anonymous-instance"

# Python `logging` numbers; Firecracker's Trace sits below Debug.
_TRACE = 5
_LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": _TRACE,
}


class LoggerError(Exception):
    """The logger could not be configured."""

    def __init__(self, message: str | None = None) -> None:
        # The docstring is the message when none is given.
        super().__init__(message if message is not None else " ".join((type(self).__doc__ or "").split()))


class LogPathError(LoggerError):
    """Failed to open target file."""


def level_number(name: str) -> int:
    try:
        return _LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}: expected one of Error, Warning, Info, Debug, Trace, Off")


class LineWriter:
    """Whole lines to a file or named pipe, without ever blocking.

    `write_line` returns False and counts the line in `dropped` when it
    cannot be written now (a full pipe, a full disk). A line longer than the
    pipe's atomic write size (PIPE_BUF) may be taken in part: the rest is
    kept and written before any later line, which is dropped until the rest
    is out, so every line that starts in the pipe ends whole. Thread-safe.
    """

    def __init__(self, fd: int, path: str = "") -> None:
        self.fd = fd
        self.path = path
        self.written = 0
        self.dropped = 0
        self._pending = b""
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, path: str) -> LineWriter:
        """Open `path` (created if missing) for non-blocking appends; raises `OSError`."""
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
        return cls(os.open(path, flags, 0o644), path)

    def write_line(self, line: bytes | str) -> bool:
        data = line.encode("utf-8", "backslashreplace") if isinstance(line, str) else bytes(line)
        if not data.endswith(b"\n"):
            data += b"\n"
        with self._lock:
            if self._closed or not self._flush_pending_locked():
                self.dropped += 1
                return False
            try:
                n = os.write(self.fd, data)
            except OSError:  # EAGAIN (full pipe), ENOSPC, EIO, ...
                self.dropped += 1
                return False
            self._pending = data[n:]
            self.written += 1
            return True

    def flush_pending(self) -> bool:
        """Try to write the rest of a partly written line; True when nothing is left."""
        with self._lock:
            return self._flush_pending_locked()

    def _flush_pending_locked(self) -> bool:
        while self._pending:
            try:
                n = os.write(self.fd, self._pending)
            except OSError:
                return False
            self._pending = self._pending[n:]
        return True

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)

    def __repr__(self) -> str:
        return f"<LineWriter {self.path or self.fd} written={self.written} dropped={self.dropped}>"


@dataclass(frozen=True)
class LogSettings:
    """The logger's current settings (Firecracker's LoggerConfiguration)."""

    level: int = logging.WARNING
    log_path: str | None = None
    show_level: bool = False
    show_log_origin: bool = False
    module: str | None = None


class _LineLogger:
    """What structlog's bound loggers write to: one rendered line per call."""

    def __init__(self, name: str | None, emit: Callable[[str], None]) -> None:
        self.name = name
        self._emit = emit

    def msg(self, message: str) -> None:
        self._emit(message)

    log = debug = info = warn = warning = error = err = critical = fatal = exception = msg

    def __repr__(self) -> str:
        return f"<_LineLogger {self.name}>"


class Logger:
    """The process's logger: settings, destination, and what could not be written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settings = LogSettings()
        self._writer: LineWriter | None = None
        self._stream: TextIO | None = None
        self._missed_before = 0
        self.instance_id = DEFAULT_INSTANCE_ID

    @property
    def settings(self) -> LogSettings:
        return self._settings

    @property
    def missed_log_count(self) -> int:
        """Lines dropped because the destination could not take them (all destinations)."""
        writer = self._writer
        return self._missed_before + (writer.dropped if writer else 0)

    def set_defaults(self, level: str = "Warning", stream: TextIO | None = None) -> None:
        """Human-readable lines to `stream` (stderr when None) at `level`; forgets any log file."""
        with self._lock:
            self._settings = LogSettings(level=level_number(level))
            self._stream = stream
            self._swap_writer(None)
        self._install()

    def configure(self, config: LoggerConfig) -> None:
        """Apply a `LoggerConfig` as Firecracker's `Logger::update` does.

        Raises `LogPathError` ("Failed to open target file: ...") when
        `log_path` cannot be opened; the settings are then unchanged.
        """
        writer = None
        if config.log_path is not None:
            try:
                writer = LineWriter.open(config.log_path)
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise LogPathError(f"Failed to open target file: {reason} ({config.log_path})") from exc
        with self._lock:
            s = self._settings
            self._settings = replace(
                s,
                level=config.effective_level.python_level,
                log_path=config.log_path if config.log_path is not None else s.log_path,
                show_level=s.show_level if config.show_level is None else config.show_level,
                show_log_origin=s.show_log_origin if config.show_log_origin is None else config.show_log_origin,
                module=s.module if config.module is None else config.module,
            )
            if writer is not None:
                self._swap_writer(writer)
        self._install()

    def _swap_writer(self, writer: LineWriter | None) -> None:
        old, self._writer = self._writer, writer
        if old is not None:
            self._missed_before += old.dropped
            old.close()

    # --- the structlog pipeline ------------------------------------------------------

    def _emit(self, line: str) -> None:
        writer = self._writer
        if writer is not None:
            writer.write_line(line)
            return
        stream = self._stream or sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            self._missed_before += 1

    def _factory(self, *args: Any) -> _LineLogger:
        name = args[0] if args and isinstance(args[0], str) else None
        return _LineLogger(name, self._emit)

    def _install(self) -> None:
        s = self._settings
        json_lines = self._writer is not None
        processors: list[Any] = []
        if s.level > logging.CRITICAL:  # Off
            processors.append(_drop_all)
        if s.module is not None:
            processors.append(_module_filter(s.module))
        processors.append(structlog.processors.add_log_level)
        if s.show_log_origin:
            processors.append(structlog.processors.CallsiteParameterAdder(
                {structlog.processors.CallsiteParameter.FILENAME, structlog.processors.CallsiteParameter.LINENO}))
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"))
        if json_lines:
            processors += [self._json_fields(s.show_level), structlog.processors.format_exc_info,
                           structlog.processors.JSONRenderer(serializer=_dumps)]
        else:
            processors += [_origin_field, structlog.dev.ConsoleRenderer(colors=False)]
        structlog.configure(
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(_structlog_level(s.level)),
            logger_factory=self._factory,
            cache_logger_on_first_use=False,
        )

    def _json_fields(self, show_level: bool) -> Callable[[Any, str, dict], dict]:
        def order(logger: Any, method: str, event: dict) -> dict:
            out: dict[str, Any] = {"timestamp": event.pop("timestamp", None), "instance": self.instance_id,
                                   "thread": threading.current_thread().name}
            level = event.pop("level", None)
            if show_level:
                out["level"] = level
            origin = _pop_origin(event)
            if origin is not None:
                out["origin"] = origin
            name = getattr(logger, "name", None)
            if name is not None:
                out["logger"] = name
            out["event"] = event.pop("event", None)
            out.update(event)
            return out
        return order

    def __repr__(self) -> str:
        s = self._settings
        dest = s.log_path if self._writer is not None else "stderr"
        return (f"<Logger {logging.getLevelName(s.level)} -> {dest} module={s.module} "
                f"missed={self.missed_log_count}>")


def _dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(obj, default=repr, separators=(",", ":"), ensure_ascii=False)


def _structlog_level(level: int) -> int:
    # structlog filters on the `logging` levels only (NOTSET..CRITICAL): Trace
    # maps to NOTSET, Off to CRITICAL plus `_drop_all`.
    known = (logging.NOTSET, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
    return max(k for k in known if k <= level)


def _drop_all(logger: Any, method: str, event: dict) -> dict:
    raise structlog.DropEvent


def _module_filter(prefix: str) -> Callable[[Any, str, dict], dict]:
    def keep(logger: Any, method: str, event: dict) -> dict:
        name = getattr(logger, "name", None)
        if name is None or not name.startswith(prefix):
            raise structlog.DropEvent
        return event
    return keep


def _pop_origin(event: dict) -> str | None:
    filename, lineno = event.pop("filename", None), event.pop("lineno", None)
    return None if filename is None else f"{filename}:{lineno}"


def _origin_field(logger: Any, method: str, event: dict) -> dict:
    origin = _pop_origin(event)
    if origin is not None:
        event["origin"] = origin
    return event


#: The process's logger.
LOGGER = Logger()


def configure_logging(level: str = "Warning", stream: TextIO | None = None) -> None:
    """Log human-readable lines to `stream` (stderr) at `level` (the default destination)."""
    LOGGER.set_defaults(level, stream)


def fatal(message: str) -> None:
    """The one-line reason a VMM process gives when it exits with an error."""
    print(f"ember-vmm: error: {message}", file=sys.stderr, flush=True)
