"""``python -m vmm.seccomp [--role ROLE] [--summary]``: print Ember's built-in filters.

The output is a Firecracker seccompiler JSON document (each rule's reason
as its comment), ready to edit and pass to ``ember-vmm --seccomp-filter``.
``--summary`` prints each role's syscall count and BPF size instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from .bpf import compile_filter
from .model import Role
from .seccompiler import filters_to_json
from .table import builtin_filters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmm.seccomp", description="Print Ember's built-in seccomp filters.")
    p.add_argument("--summary", action="store_true", help="syscall and rule counts, BPF instructions, per role")
    args = p.parse_args(argv)
    filters = builtin_filters()
    if args.summary:
        for role in Role:
            flt = filters[role]
            print(f"{role.value:5} {len(flt.syscalls):3} syscalls {len(flt.rules):3} rules "
                  f"{compile_filter(flt).instructions:4} BPF instructions")
        return 0
    json.dump(filters_to_json(filters), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
