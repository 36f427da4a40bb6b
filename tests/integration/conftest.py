"""Fixtures for integration tests that boot real microVMs with `ember-vmm`.

* `guest_build` (session): the tests/guests/build.py module.
* `testguest` (session): path of the purpose-built test guest ELF, built with
  gcc from tests/guests (cached; see docs/test-guests.md).
* `run_vmm(kernel, boot_args, vcpus=1, mem_mib=128, stdin=None, timeout=60,
  extra_args=(), config_extra=None, wrapper=())`: boots a microVM from a Firecracker-style JSON config with
  `python -m vmm.main --no-api --config-file <file>` and returns
  `VmmResult(returncode, stdout, stderr)` (the guest's serial console is the
  VMM's stdout). `config_extra` adds top-level config keys (`drives`,
  `network-interfaces`, `vsock`, ...); `wrapper` prefixes the command (e.g.
  `["ip", "netns", "exec", ns]`). Also importable as a plain function.
* `spawn_vmm(...)`: the same, but returns a running `VmmProcess` to talk to
  (wait for output, send input); killed at teardown if still running.

Tests marked `@pytest.mark.kvm` are skipped when /dev/kvm is not usable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
KVM_DEVICE = "/dev/kvm"
DEFAULT_TIMEOUT = 60.0

__all__ = ["REPO_ROOT", "VmmResult", "VmmProcess", "VmmTimeout", "kvm_available", "load_module", "load_guest_build",
           "load_apiclient", "write_vm_config", "run_vmm"]


def kvm_available() -> bool:
    return os.access(KVM_DEVICE, os.R_OK | os.W_OK)


def load_module(name: str, path: Path):
    """The module at `path`, loaded once under `name` (test helpers are not an installed package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_guest_build():
    """tests/guests/build.py as a module."""
    return load_module("ember_tests_guest_build", REPO_ROOT / "tests" / "guests" / "build.py")


def load_apiclient():
    """tests/conformance/apiclient.py (a VMM process driven through its API socket) as a module."""
    return load_module("ember_tests_apiclient", REPO_ROOT / "tests" / "conformance" / "apiclient.py")


class VmmTimeout(AssertionError):
    """The VMM did not finish (or did not print what was awaited) in time."""


class VmmResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """The console output split into lines, carriage returns removed."""
        return [line.rstrip("\r") for line in self.stdout.replace("\r\n", "\n").split("\n")]

    def describe(self) -> str:
        return f"exit status {self.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"

    def assert_guest_passed(self, mode: str) -> None:
        """The guest printed START and PASS for `mode`, no exception, and the VMM exited 0."""
        lines = self.lines
        assert f"TESTGUEST {mode} START" in lines, self.describe()
        assert not any(line.startswith("TESTGUEST EXCEPTION") for line in lines), self.describe()
        assert not any(line.startswith(f"TESTGUEST {mode} FAIL") for line in lines), self.describe()
        assert f"TESTGUEST {mode} PASS" in lines, self.describe()
        assert self.returncode == 0, self.describe()


def write_vm_config(path: Path, kernel: os.PathLike | str, boot_args: str, vcpus: int = 1,
                    mem_mib: int = 128, extra: dict | None = None) -> Path:
    """Write a Firecracker-style VM configuration file and return its path.

    `extra` adds (or replaces) top-level keys, e.g. {"drives": [...]}.
    """
    config = {
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": boot_args},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
        **(extra or {}),
    }
    Path(path).write_text(json.dumps(config, indent=2))
    return Path(path)


def _vmm_command(config: Path, extra_args: Sequence[str], wrapper: Sequence[str] = ()) -> list[str]:
    return [*wrapper, sys.executable, "-m", "vmm.main", "--no-api", "--config-file", str(config), *extra_args]


def _vmm_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_vmm(kernel: os.PathLike | str, boot_args: str, vcpus: int = 1, mem_mib: int = 128,
            stdin: bytes | None = None, timeout: float = DEFAULT_TIMEOUT,
            extra_args: Sequence[str] = (), config_extra: dict | None = None,
            wrapper: Sequence[str] = ()) -> VmmResult:
    """Boot `kernel` in a microVM until the VMM exits; return its status and output.

    `stdin` (bytes) is fed to the serial console; without it the console input is
    /dev/null. Raises VmmTimeout (with the output so far) after `timeout` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="ember-vmm-") as tmp:
        config = write_vm_config(Path(tmp) / "vm.json", kernel, boot_args, vcpus, mem_mib, config_extra)
        proc = subprocess.Popen(_vmm_command(config, extra_args, wrapper), cwd=REPO_ROOT, env=_vmm_env(),
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(input=stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            result = VmmResult(-1, out.decode(errors="replace"), err.decode(errors="replace"))
            raise VmmTimeout(f"ember-vmm did not exit within {timeout} s\n{result.describe()}") from None
        return VmmResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class VmmProcess:
    """A running `ember-vmm`: read its console as it comes, write to its console input."""

    def __init__(self, kernel: os.PathLike | str, boot_args: str, vcpus: int = 1, mem_mib: int = 128,
                 extra_args: Sequence[str] = (), config_extra: dict | None = None, wrapper: Sequence[str] = ()):
        self._tmp = tempfile.TemporaryDirectory(prefix="ember-vmm-")
        config = write_vm_config(Path(self._tmp.name) / "vm.json", kernel, boot_args, vcpus, mem_mib, config_extra)
        self._cond = threading.Condition()
        self._out = bytearray()
        self._err = bytearray()
        self.proc = subprocess.Popen(_vmm_command(config, extra_args, wrapper), cwd=REPO_ROOT, env=_vmm_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self._readers = [threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True)]
        for t in self._readers:
            t.start()

    def _pump(self, stream, buf: bytearray) -> None:
        while True:
            chunk = stream.read1(65536)
            with self._cond:
                if chunk:
                    buf.extend(chunk)
                self._cond.notify_all()
            if not chunk:
                return

    @property
    def stdout(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._cond:
            return self._err.decode(errors="replace")

    def _snapshot(self) -> VmmResult:
        rc = self.proc.poll()
        return VmmResult(-1 if rc is None else rc, self.stdout, self.stderr)

    def wait_for_output(self, pattern: str, timeout: float = DEFAULT_TIMEOUT) -> re.Match:
        """Wait until the console output matches the regular expression `pattern`."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(self._out.decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._readers)):
                    break
                self._cond.wait(min(left, 0.5))
        what = "exited" if self.proc.poll() is not None else f"did not print it within {timeout} s"
        raise VmmTimeout(f"waiting for /{pattern}/: ember-vmm {what}\n{self._snapshot().describe()}")

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> VmmResult:
        """Wait for the VMM to exit; return its status and all its output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            snap = self._snapshot()
            self.kill()
            raise VmmTimeout(f"ember-vmm did not exit within {timeout} s\n{snap.describe()}") from None
        for t in self._readers:
            t.join(5)
        return self._snapshot()

    def kill(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc)
            self.proc.wait()
        self.close_stdin()

    def close(self) -> None:
        self.kill()
        for t in self._readers:
            t.join(5)
        self._tmp.cleanup()

    def __enter__(self) -> "VmmProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"<VmmProcess pid={self.proc.pid} {state} out={len(self._out)}B>"


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _skip_kvm_tests_without_kvm(request):
    if request.node.get_closest_marker("kvm") and not kvm_available():
        pytest.skip(f"needs {KVM_DEVICE}")


@pytest.fixture(scope="session")
def guest_build():
    """The tests/guests/build.py module (build_testguest, GuestBuildError, ...)."""
    return load_guest_build()


@pytest.fixture(scope="session")
def testguest(guest_build) -> Path:
    """The test guest ELF (tests/guests), built once per session and cached on disk."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test guest")
    return guest_build.build_testguest()


@pytest.fixture(name="run_vmm")
def _run_vmm_fixture():
    return run_vmm


@pytest.fixture
def spawn_vmm() -> Iterator:
    """Factory: spawn_vmm(kernel, boot_args, vcpus=1, mem_mib=128, extra_args=(), config_extra=None,
    wrapper=()) -> VmmProcess."""
    procs: list[VmmProcess] = []

    def spawn(kernel: os.PathLike | str, boot_args: str, vcpus: int = 1, mem_mib: int = 128,
              extra_args: Sequence[str] = (), config_extra: dict | None = None,
              wrapper: Sequence[str] = ()) -> VmmProcess:
        p = VmmProcess(kernel, boot_args, vcpus, mem_mib, extra_args, config_extra, wrapper)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        p.close()
