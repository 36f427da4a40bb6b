"""What the zygote holds before it forks: every VMM maps (and every fork copies) that heap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
import vmm.zygote
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None)
import structlog.stdlib
get_loop = structlog.stdlib.asyncio.get_running_loop  # the real asyncio, imported on use
print(json.dumps({"loaded": loaded, "asyncio_after_use": type(sys.modules["asyncio"]).__name__,
                  "get_loop": get_loop.__name__}))
"""


def _probe() -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    return json.loads(out.stdout.splitlines()[-1])


def test_the_zygote_does_not_import_what_a_vmm_never_uses() -> None:
    doc = _probe()
    loaded = set(doc["loaded"])
    assert "vmm.main" in loaded and "structlog.stdlib" in loaded and "snapshot" in loaded
    unused = {m for m in loaded if m.split(".")[0] in ("asyncio", "rich", "colorama") and m != "asyncio"}
    assert not unused, sorted(unused)
    # The stand-in still gives the real module to whoever uses it.
    assert doc["asyncio_after_use"] == "module" and doc["get_loop"] == "get_running_loop"
