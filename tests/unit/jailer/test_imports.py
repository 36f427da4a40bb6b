"""`ImportWatch` sees imports of modules not loaded yet (in a subprocess: audit hooks are forever)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import json, sys
from jailer import ImportWatch
seen = []
watch = ImportWatch(seen.append)
import json as again            # loaded before: not an import event
watch.start()
import json as again_watched    # still loaded: nothing
import colorsys                 # new: recorded
import colorsys as twice        # now loaded: nothing
try:
    import ember_no_such_module
except ImportError:
    pass
watch.stop()
import fractions                # stopped: nothing
print(json.dumps({"late": watch.late, "seen": seen}))
"""


def test_watch_records_each_new_import_once() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["late"] == ["colorsys", "ember_no_such_module"]
    assert result["seen"] == result["late"]
