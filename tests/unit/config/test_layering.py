"""`vmm.config` is a bottom layer: it imports only the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import vmm.config

PACKAGE = Path(vmm.config.__file__).parent


def test_config_imports_only_stdlib_and_itself() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                continue  # inside the package
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top != "__future__" and top not in sys.stdlib_module_names:
                    offenders.append(f"{path.name}: {module}")
    assert offenders == []


def test_public_names_are_exported() -> None:
    for name in vmm.config.__all__:
        assert hasattr(vmm.config, name), name
    assert len(set(vmm.config.__all__)) == len(vmm.config.__all__)
