"""Give a VMM process the name operators look for: ``ember-vmm``, with its VM id.

`/proc/PID/comm` becomes ``ember-vmm`` (so ``pgrep -x ember-vmm`` finds every
microVM, whether started as ``python -m vmm.main``, through the console
script or forked by the zygote) and `/proc/PID/cmdline` becomes
``ember-vmm --id <id> <the VMM's arguments>`` (so ``pgrep -f 'id vm7'`` finds
one). The command line is rewritten with `setproctitle`, the maintained
library for it; the comm with prctl(PR_SET_NAME).
"""

from __future__ import annotations

import ctypes

import setproctitle

__all__ = ["PROCESS_NAME", "name_process", "process_title"]

#: The comm of every VMM process (at most 15 bytes: TASK_COMM_LEN - 1).
PROCESS_NAME = b"ember-vmm"

PR_SET_NAME = 15  # <linux/prctl.h>

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def process_title(vm_id: str, argv: list[str]) -> str:
    """The command line a VMM shows: ``ember-vmm --id ID`` then `argv` without its own --id."""
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--id":
            skip = True
            continue
        if arg.startswith("--id="):
            continue
        rest.append(arg)
    return " ".join(["ember-vmm", "--id", vm_id, *rest])


def name_process(vm_id: str, argv: list[str]) -> None:
    """Set this process's comm to ``ember-vmm`` and its command line to `process_title`.

    Only the calling thread's comm changes: call it from the main thread
    before any other thread starts (threads created later inherit it).
    """
    name = ctypes.create_string_buffer(PROCESS_NAME, 16)
    # SAFETY: PR_SET_NAME copies at most 16 bytes up to a NUL from the pointer; `name` is a
    # 16-byte zero-filled buffer holding the 9-byte name, alive (a local) for the whole call.
    _libc.prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)
    setproctitle.setproctitle(process_title(vm_id, argv))
    # setproctitle may also set the comm from the title's first word; keep ours exact.
    _libc.prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)  # SAFETY: as above.
