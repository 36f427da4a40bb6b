"""vmm.mmds stays pure: it imports the standard library, h11 and vmm.config only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "vmm" / "mmds"
ALLOWED_THIRD_PARTY = {"h11"}
FORBIDDEN_STDLIB = {"socket", "subprocess", "select", "selectors", "asyncio", "os"}


def imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module)
    return mods


def test_imports_are_pure() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert files
    for path in files:
        for mod in imported_modules(path):
            top = mod.split(".")[0]
            if top == "vmm":
                assert mod == "vmm.config" or mod.startswith("vmm.config."), f"{path.name} imports {mod}"
            elif top not in ALLOWED_THIRD_PARTY:
                assert top in sys.stdlib_module_names, f"{path.name} imports {mod}"
                assert top not in FORBIDDEN_STDLIB, f"{path.name} does I/O through {mod}"
