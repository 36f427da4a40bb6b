"""`jailer/` imports neither `vmm/` nor `poolsvc/` (both may import it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_jailer_imports_neither_vmm_nor_poolsvc() -> None:
    bad = []
    for path in sorted((ROOT / "jailer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("vmm", "poolsvc", "snapshot")]
    assert bad == []
