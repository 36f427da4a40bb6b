"""Fuzzing Ember's untrusted-input parsers and its API (docs/fuzzing.md).

* ``python -m bench.fuzz --target T --inputs N``: parser and device targets
  (`targets.TARGETS`: virtqueue, block, net, vsock, snapshot, mmds, api),
  atheris (libFuzzer) or an in-process mutation engine;
* ``python -m bench.fuzz.api --requests N``: schemathesis against a live
  ``python -m vmm.main`` driven by Firecracker's OpenAPI file.

This package imports no Ember code at import time: a target imports the
code under test when it is built, so atheris can instrument it.
"""

from .engine import CrashRecord, FuzzStats, Harness, InputTimeout, RandomEngine, Runner, run_random
from .targets import FAMILIES, TARGETS, make

__all__ = ["CrashRecord", "FuzzStats", "Harness", "InputTimeout", "RandomEngine", "Runner", "run_random",
           "FAMILIES", "TARGETS", "make"]
