"""Seccomp filters on real `ember-vmm` processes (docs/seccomp.md).

Every thread of a running VMM — booted, restored from a snapshot, or forked
by the zygote — runs under exactly one filter (its role's), `--no-seccomp`
runs none, and a guest that makes a VMM thread call something outside its
allowlist kills that VMM (SIGSYS) and nothing else. A stop and continue
(SIGSTOP/SIGCONT, as a debugger or a cgroup freeze does) does not.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import VmmProcess, run_vmm, load_apiclient
from vmm.seccomp import BUILTIN_FILTERS, Role, filters_to_json

pytestmark = pytest.mark.kvm

REPO_ROOT = Path(__file__).resolve().parents[2]


apiclient = load_apiclient()


@pytest.fixture
def work():
    with tempfile.TemporaryDirectory(prefix="ember-sc-") as d:  # short: sun_path is 108 bytes
        yield Path(d)


@pytest.fixture
def api_vmm(work):
    procs = []

    def start(*args: str, name: str = "api.sock"):
        p = apiclient.VmmApiProcess(work, ("--id", name.split(".")[0], *args), sock_name=name)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def threads(pid: int) -> dict[int, dict[str, str]]:
    """Name, Seccomp mode and filter count of each thread of `pid` (KVM's kernel workers left out)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        except FileNotFoundError:
            continue  # the thread ended
        if fields["Name"].startswith("kvm-"):  # e.g. kvm-nx-lpage-recovery: never returns to user space
            continue
        out[int(tid)] = {k: fields[k].strip() for k in ("Name", "Seccomp", "Seccomp_filters")}
    return out


def wait_threads(pid: int, expected: dict[str, str], timeout: float = 10.0) -> dict[int, dict[str, str]]:
    """The threads of `pid` once they are exactly `expected`: name -> "Seccomp mode/filter count"."""
    deadline = time.monotonic() + timeout
    while True:
        found = threads(pid)
        got = {t["Name"]: f"{t['Seccomp']}/{t['Seccomp_filters']}" for t in found.values()}
        if got == expected and len(found) == len(expected):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"threads of {pid}: {found}, wanted {expected}")
        time.sleep(0.05)


def wait_all_filtered(pid: int, names: set[str], timeout: float = 10.0) -> dict[int, dict[str, str]]:
    """The threads of `pid` once it has exactly the threads `names`, each with one filter (Seccomp: 2)."""
    return wait_threads(pid, {name: "2/1" for name in names}, timeout)


def boot(proc, testguest: Path, boot_args: str = "mode=echo", vcpus: int = 1) -> None:
    assert proc.api.put("/machine-config", {"vcpu_count": vcpus, "mem_size_mib": 64}).status == 204
    assert proc.api.put("/boot-source", {"kernel_image_path": str(testguest), "boot_args": boot_args}).status == 204
    resp = proc.api.put("/actions", {"action_type": "InstanceStart"})
    assert resp.status == 204, f"{resp}\n{proc.describe()}"


def echo(proc, line: str) -> None:
    proc.send_console(line.encode() + b"\n")
    proc.wait_for_output(f"ECHO:{line}")


BOOTED = {"ember-vmm", "fc_api", "fc_metrics", "fc_vcpu 0", "fc_vcpu 1"}


def test_every_thread_of_a_booted_vmm_has_its_one_filter(api_vmm, testguest) -> None:
    proc = api_vmm()
    # Before boot: the API thread is filtered from its start, the main thread not yet.
    wait_threads(proc.proc.pid, {"ember-vmm": "0/0", "fc_api": "2/1"})
    boot(proc, testguest, vcpus=2)
    proc.wait_for_output("ECHO READY")
    found = wait_all_filtered(proc.proc.pid, BOOTED)
    assert proc.proc.pid in found  # the main thread too
    echo(proc, "filtered")
    assert proc.api.patch("/vm", {"state": "Paused"}).status == 204
    assert proc.api.patch("/vm", {"state": "Resumed"}).status == 204
    echo(proc, "resumed")
    assert proc.terminate() == 128 + signal.SIGTERM, proc.describe()
    assert not os.path.exists(proc.sock)


def test_a_filtered_vmm_survives_sigstop_and_sigcont(api_vmm, testguest) -> None:
    # Every thread sleeps with a timeout (epoll_wait, futex); a stop interrupts those sleeps and
    # the kernel resumes them through restart_syscall, which each filter must allow.
    proc = api_vmm()
    boot(proc, testguest)
    proc.wait_for_output("ECHO READY")
    wait_all_filtered(proc.proc.pid, {"ember-vmm", "fc_api", "fc_metrics", "fc_vcpu 0"})
    for _ in range(3):
        os.kill(proc.proc.pid, signal.SIGSTOP)
        time.sleep(0.3)
        os.kill(proc.proc.pid, signal.SIGCONT)
        time.sleep(0.3)
    assert proc.proc.poll() is None, proc.describe()
    echo(proc, "continued")
    assert proc.api.get("/").status == 200
    assert proc.terminate() == 128 + signal.SIGTERM, proc.describe()


def test_no_seccomp(api_vmm, testguest) -> None:
    proc = api_vmm("--no-seccomp")
    boot(proc, testguest)
    proc.wait_for_output("ECHO READY")
    wait_threads(proc.proc.pid, {name: "0/0" for name in ("ember-vmm", "fc_api", "fc_metrics", "fc_vcpu 0")})
    echo(proc, "unfiltered")


@pytest.mark.parametrize("backend", ["File", "Uffd"])
def test_a_restored_vmm_is_filtered_once_its_vcpu_threads_exist(api_vmm, testguest, work, backend) -> None:
    first = api_vmm(name="a.sock")
    boot(first, testguest, vcpus=2)
    first.wait_for_output("ECHO READY")
    echo(first, "before")
    assert first.api.patch("/vm", {"state": "Paused"}).status == 204
    state, mem = work / "snap.state", work / "snap.mem"
    resp = first.api.put("/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem)})
    assert resp.status == 204, f"{resp}\n{first.describe()}"
    first.close()

    page_server = None
    if backend == "Uffd":
        from tests.integration.page_server import PageServer
        page_server = PageServer(work / "uffd.sock", "--mem", str(mem))
    try:
        second = api_vmm(name="b.sock")
        path = work / "uffd.sock" if backend == "Uffd" else mem
        resp = second.api.put("/snapshot/load", {"snapshot_path": str(state),
                                                 "mem_backend": {"backend_type": backend, "backend_path": str(path)}})
        assert resp.status == 204, f"{resp}\n{second.describe()}"
        wait_all_filtered(second.proc.pid, BOOTED)  # paused vCPU threads: filtered before they run
        assert second.api.patch("/vm", {"state": "Resumed"}).status == 204
        echo(second, "after")
        assert second.terminate() == 128 + signal.SIGTERM, second.describe()
    finally:
        if page_server is not None:
            page_server.stop()


def test_a_vmm_forked_by_the_zygote_is_filtered(work, testguest) -> None:
    zsock = work / "z.sock"
    zygote = subprocess.Popen([sys.executable, "-m", "vmm.zygote", "--socket", str(zsock)], cwd=REPO_ROOT,
                              env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not zsock.exists():
            assert zygote.poll() is None and time.monotonic() < deadline, "the zygote did not start"
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(zsock))
            f = s.makefile("rwb")

            def ask(doc: dict) -> dict:
                f.write(json.dumps(doc).encode() + b"\n")
                f.flush()
                return json.loads(f.readline())

            def spawn_and_boot(name: str, mode: str) -> tuple[int, Path]:
                api_sock = work / f"{name}.sock"
                pid = ask({"argv": ["--api-sock", str(api_sock), "--id", name], "stdout": str(work / f"{name}.out"),
                           "stderr": str(work / f"{name}.err")})["pid"]
                deadline = time.monotonic() + 60
                while not api_sock.exists():
                    assert time.monotonic() < deadline, (work / f"{name}.err").read_text()
                    time.sleep(0.01)
                api = apiclient.ApiClient(str(api_sock))
                try:
                    assert api.put("/boot-source", {"kernel_image_path": str(testguest),
                                                    "boot_args": f"mode={mode}"}).status == 204
                    assert api.put("/actions", {"action_type": "InstanceStart"}).status == 204
                finally:
                    api.close()
                return pid, work / f"{name}.err"

            # The hello guest prints and resets: the VMM exits 0 through its filtered shutdown.
            pid, err = spawn_and_boot("zyg1", "hello")
            answer = ask({"op": "wait", "pid": pid, "timeout": 60})
            assert answer["returncode"] == 0, (answer, err.read_text())
            assert "TESTGUEST hello PASS" in (work / "zyg1.out").read_text()

            pid, err = spawn_and_boot("zyg2", "echo")
            wait_all_filtered(pid, {"ember-vmm", "fc_api", "fc_metrics", "fc_vcpu 0"})
            os.kill(pid, signal.SIGTERM)
            answer = ask({"op": "wait", "pid": pid, "timeout": 30})
            assert answer["returncode"] == 128 + signal.SIGTERM, (answer, err.read_text())
    finally:
        zygote.terminate()
        zygote.wait(10)


def _filter_file(path: Path, role: Role, *without: str) -> Path:
    filters = dict(BUILTIN_FILTERS)
    filters[role] = filters[role].without(*without)
    path.write_text(json.dumps(filters_to_json(filters)))
    return path


def test_a_guest_that_makes_its_vcpu_thread_break_the_rules_kills_only_its_vmm(testguest, work) -> None:
    """The vCPU thread writes the guest's serial output to stdout: without `write`, the first byte kills."""
    bystander = VmmProcess(testguest, "mode=echo")
    try:
        bystander.wait_for_output("ECHO READY")
        custom = _filter_file(work / "no-write.json", Role.VCPU, "write")
        result = run_vmm(testguest, "mode=hello", extra_args=["--seccomp-filter", str(custom)], timeout=60)
        assert result.returncode == -signal.SIGSYS, result.describe()
        assert "TESTGUEST" not in result.stdout
        # The same guest with the same file minus nothing passes: the filter file itself is fine.
        control = _filter_file(work / "all.json", Role.VCPU)
        run_vmm(testguest, "mode=hello", extra_args=["--seccomp-filter", str(control)]).assert_guest_passed("hello")
        bystander.send(b"still here\n")
        bystander.wait_for_output("ECHO:still here")
    finally:
        bystander.kill()


def test_a_guest_that_makes_the_vmm_thread_break_the_rules_kills_only_its_vmm(testguest, work) -> None:
    """virtio-blk requests are served on the event loop (ioeventfd): without preadv2, the first read kills."""
    disk = work / "disk.img"
    disk.write_bytes(random.Random(3).randbytes(1 << 20))
    drives = {"drives": [{"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True,
                          "is_read_only": True}]}
    bystander = VmmProcess(testguest, "mode=echo")
    try:
        bystander.wait_for_output("ECHO READY")
        custom = _filter_file(work / "no-preadv2.json", Role.VMM, "preadv2")
        result = run_vmm(testguest, "mode=vblk vblk.sectors=64", config_extra=drives,
                         extra_args=["--seccomp-filter", str(custom)], timeout=60)
        assert result.returncode == -signal.SIGSYS, result.describe()
        assert "VBLK READ" not in result.stdout
        bystander.send(b"still here\n")
        bystander.wait_for_output("ECHO:still here")
    finally:
        bystander.kill()


def test_a_bad_filter_file_stops_the_vmm_before_it_runs(testguest, work) -> None:
    bad = work / "bad.json"
    bad.write_text(json.dumps({"vmm": {}, "api": {}}))
    result = run_vmm(testguest, "mode=hello", extra_args=["--seccomp-filter", str(bad)])
    assert result.returncode == 1
    assert "cannot use the seccomp filters" in result.stderr and "missing vcpu" in result.stderr
    assert "TESTGUEST" not in result.stdout
