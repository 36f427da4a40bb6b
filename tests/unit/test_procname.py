"""vmm.procname: the title a VMM process shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vmm.procname import process_title


def test_title_puts_the_id_first_and_drops_the_other_id_flags() -> None:
    assert process_title("vm7", ["--api-sock", "/run/a.sock", "--id", "vm7"]) == \
        "ember-vmm --id vm7 --api-sock /run/a.sock"
    assert process_title("x", ["--id=x", "--no-api"]) == "ember-vmm --id x --no-api"
    assert process_title("anonymous-instance", []) == "ember-vmm --id anonymous-instance"


def test_a_vmm_process_is_named_ember_vmm_with_its_id(tmp_path: Path) -> None:
    code = ("import sys, pathlib; from vmm.procname import name_process; name_process('vm-42', sys.argv[1:]);"
            "print(pathlib.Path('/proc/self/comm').read_text().strip());"
            "print(pathlib.Path('/proc/self/cmdline').read_bytes().replace(b'\\0', b' ').decode().strip())")
    out = subprocess.run([sys.executable, "-c", code, "--api-sock", "/x.sock", "--id", "vm-42"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]).stdout
    comm, cmdline = out.splitlines()
    assert comm == "ember-vmm"
    assert cmdline == "ember-vmm --id vm-42 --api-sock /x.sock"
