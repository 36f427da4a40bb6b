"""The dependency rules of ../shared/STYLE.md, enforced by reading imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods: set[str] = set()
    pkg_parts = path.relative_to(root).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            mods.add(mod)
    return mods


def _violations(pkg: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    bad = []
    for f in sorted((root / pkg).rglob("*.py")):
        for mod in _imports(f, root):
            if any(mod == p or mod.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(root)} imports {mod}")
    return bad


@pytest.mark.parametrize("pkg,forbidden", [
    ("snapshot", ("vmm", "poolsvc")),
    ("poolsvc", ("vmm",)),
    ("vmm/kvm", ("vmm.devices", "vmm.vstate", "vmm.api", "vmm.builder", "vmm.arch", "vmm.loader")),
    ("vmm/memory", ("vmm.devices", "vmm.vstate", "vmm.api", "vmm.builder", "vmm.kvm")),
    ("vmm/arch", ("vmm.devices", "vmm.vstate", "vmm.api", "vmm.builder", "vmm.kvm")),
    ("vmm/loader", ("vmm.devices", "vmm.vstate", "vmm.api", "vmm.builder", "vmm.kvm")),
    ("vmm/config", ("vmm.devices", "vmm.vstate", "vmm.api", "vmm.builder", "vmm.kvm")),
    ("vmm/devices", ("vmm.api", "vmm.builder", "vmm.vstate", "vmm.runtime")),
    ("vmm/vstate", ("vmm.api", "vmm.builder")),
])
def test_dependency_direction(pkg: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(pkg, forbidden) == []


def test_virtio_transport_imports_no_concrete_device() -> None:
    transport = ROOT / "vmm/devices/virtio/transport"
    if not transport.exists():
        pytest.skip("no virtio transport yet")
    concrete = ("vmm.devices.virtio.block", "vmm.devices.virtio.net", "vmm.devices.virtio.vsock")
    assert _violations("vmm/devices/virtio/transport", concrete) == []


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    """The rule above can fail: a relative import is resolved to its absolute name."""
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "probe.py").write_text("from ..vmm import kvm\nimport poolsvc.cli\nimport os\n")
    assert len(_violations("snapshot", ("vmm", "poolsvc"), tmp_path)) == 2
