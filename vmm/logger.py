"""Process-wide logging setup for ember-vmm (structlog).

Until the logger API (PUT /logger) configures a destination, logs go to
stderr, one line each, so the serial console on stdout stays clean.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}


def level_number(name: str) -> int:
    try:
        return _LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}: expected one of Error, Warning, Info, Debug, Trace, Off")


def configure_logging(level: str = "Warning", stream=None) -> None:
    stream = stream or sys.stderr
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def fatal(message: str) -> None:
    """The one-line reason a VMM process gives when it exits with an error."""
    print(f"ember-vmm: error: {message}", file=sys.stderr, flush=True)
