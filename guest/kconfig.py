"""Kernel config fragments: parsing, and checking that a .config honours one.

A fragment line is either ``CONFIG_FOO=value`` or ``# CONFIG_FOO is not
set``; other ``#`` lines are comments. After ``merge_config.sh`` and
``olddefconfig`` Kconfig may silently drop a value whose dependencies are
missing, so the build compares every fragment line with the final .config
and refuses a kernel that lost one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import GuestImageError

__all__ = [
    "KconfigError",
    "FragmentSyntaxError",
    "ConfigMismatch",
    "parse_config",
    "config_mismatches",
]

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


class KconfigError(GuestImageError):
    """A kernel config fragment or .config could not be used."""


class FragmentSyntaxError(KconfigError):
    """A config line is neither CONFIG_X=v, '# CONFIG_X is not set', a comment nor blank."""


def parse_config(text: str) -> dict[str, str | None]:
    """Map each symbol to its value, or None for '# CONFIG_X is not set'.

    A symbol given twice keeps its last value, as Kconfig does. Raises
    FragmentSyntaxError for a line that is none of the accepted forms (a
    typo such as 'CONFIG_FOO = y' must not be silently ignored).
    """
    values: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if match := _SET.match(line):
            values[match[1]] = match[2]
        elif match := _UNSET.match(line):
            values[match[1]] = None
        elif line.startswith("#") and not line.startswith("# CONFIG_"):
            continue
        else:
            raise FragmentSyntaxError(f"line {number}: {raw!r}")
    return values


@dataclass(frozen=True)
class ConfigMismatch:
    """A fragment value that the final .config does not carry."""

    symbol: str
    wanted: str | None
    got: str | None

    def __str__(self) -> str:
        def show(value: str | None) -> str:
            return "is not set" if value in (None, "n") else f"={value}"

        return f"{self.symbol}: fragment wants {show(self.wanted)}, .config has {show(self.got)}"


def config_mismatches(
    fragment: Mapping[str, str | None], final: Mapping[str, str | None]
) -> list[ConfigMismatch]:
    """Every fragment symbol whose value did not survive into ``final``.

    "Not set" is satisfied by an absent symbol, '# ... is not set' or =n.
    """
    bad = []
    for symbol, wanted in fragment.items():
        got = final.get(symbol)
        if wanted in (None, "n"):
            ok = got in (None, "n")
        else:
            ok = got == wanted
        if not ok:
            bad.append(ConfigMismatch(symbol, wanted, got))
    return bad
