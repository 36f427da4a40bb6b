"""Logger and metrics configuration.

Spec: `Logger` (PUT /logger, ``logger`` in the config file) and `Metrics`
(PUT /metrics, ``metrics``). Log levels are case-insensitive, and, as in
Firecracker, ``Warn`` is accepted for ``Warning``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from .errors import InvalidType, UnknownVariant
from .schema import (
    ConfigType,
    Field,
    Schema,
    describe,
    one_of,
    read_bool,
    read_str,
    str_map,
)

__all__ = ["LogLevel", "LoggerConfig", "MetricsConfig", "TRACE"]

#: Python logging level used for Firecracker's Trace (below DEBUG).
TRACE = 5


class LogLevel(enum.StrEnum):
    """Spec `Logger.level`, in the spec's order."""

    ERROR = "Error"
    WARNING = "Warning"
    INFO = "Info"
    DEBUG = "Debug"
    TRACE = "Trace"
    OFF = "Off"

    @property
    def python_level(self) -> int:
        """The `logging` level that lets exactly this level and more severe through."""
        return _PYTHON_LEVELS[self]


_PYTHON_LEVELS = {
    LogLevel.ERROR: logging.ERROR,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.INFO: logging.INFO,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.TRACE: TRACE,
    LogLevel.OFF: logging.CRITICAL + 10,
}

_LEVELS_BY_NAME = {level.value.lower(): level for level in LogLevel} | {
    "warn": LogLevel.WARNING
}


def read_level(value: object, path: str) -> LogLevel:
    if not isinstance(value, str):
        raise InvalidType(f"invalid type: {describe(value)}, expected a string", path=path)
    level = _LEVELS_BY_NAME.get(value.lower())
    if level is None:
        raise UnknownVariant(
            f"Invalid LevelFilter {describe(value)}, "
            f"{one_of([level.value for level in LogLevel])} (case-insensitive)",
            path=path,
        )
    return level


@dataclass(frozen=True)
class LoggerConfig(ConfigType):
    """Spec `Logger`; unset fields keep the logger's current (default) setting."""

    log_path: str | None = None
    level: LogLevel | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None

    SCHEMA = Schema(
        "LoggerConfig",
        [
            Field.option("log_path", read_str),
            Field.option("level", read_level),
            Field.option("show_level", read_bool),
            Field.option("show_log_origin", read_bool),
            Field.option("module", read_str),
        ],
    )

    @property
    def effective_level(self) -> LogLevel:
        """`level`, or the spec's default (Info)."""
        return self.level or LogLevel.INFO


@dataclass(frozen=True)
class MetricsConfig(ConfigType):
    """Spec `Metrics`: where JSON metrics lines go, and what each line carries.

    `properties` is a tuple of (key, value) pairs sorted by key (Firecracker
    keeps them in a BTreeMap); `to_json` writes them as an object.
    """

    metrics_path: str
    emit_id: bool = False
    properties: tuple[tuple[str, str], ...] | None = None

    SCHEMA = Schema(
        "MetricsConfig",
        [
            Field("metrics_path", read_str),
            Field("emit_id", read_bool, default=False),
            Field.option("properties", str_map, skip_none=True, write=dict),
        ],
    )

    def __post_init__(self) -> None:
        if isinstance(self.properties, dict):
            # Accept a mapping from Python callers; store the canonical form.
            object.__setattr__(self, "properties", tuple(sorted(self.properties.items())))
