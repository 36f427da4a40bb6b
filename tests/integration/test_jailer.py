"""`ember-jailer` (``python -m jailer``) with real KVM: jailed `ember-vmm` processes running test guests.

Each VMM is started the way an operator starts Firecracker's: the jailer
builds ``<base>/python3.11/<id>/root``, a cgroup with memory, CPU and pids
limits, forks into a new PID namespace and execs ``python -m vmm.main
--jail <spec>``; the VMM imports everything, enters the jail, and serves
its API on ``/api.sock`` inside it. The tests check the jail from outside
(``/proc/PID``: ids, capabilities, no_new_privs, root, namespaces, cgroup,
rlimits), that the VMM cannot open host files, and that boot, pause,
snapshot, restore in another jail, block and vsock all work with no module
imported after the jail was entered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from jailer import CgroupMounts, JailSpec, detect_version, limits_settings
from poolsvc.agent import AgentClient, AgentConnectFailed
from tests.integration.conftest import REPO_ROOT, load_apiclient

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")]

apiclient = load_apiclient()

PYTHON = os.path.realpath(sys.executable)
EXEC_NAME = os.path.basename(PYTHON)
LATE_IMPORT = "module imported inside the jail"
MIB = 1 << 20


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class JailedVmm:
    """``python -m jailer ... -- --api-sock /api.sock --id ID``, its console and stderr pumped."""

    def __init__(self, base: Path, jail_id: str, uid: int, jailer_args: Sequence[str] = (),
                 vmm_args: Sequence[str] = ()) -> None:
        self.base, self.id, self.uid = base, jail_id, uid
        self.jail_dir = base / EXEC_NAME / jail_id
        self.chroot = self.jail_dir / "root"
        self.sock = self.chroot / "api.sock"
        self.jailer_cmd = [PYTHON, "-m", "jailer", "--id", jail_id, "--exec-file", PYTHON, "--exec-arg=-m",
                           "--exec-arg=vmm.main", "--uid", str(uid), "--gid", str(uid),
                           "--chroot-base-dir", str(base), *jailer_args]
        cmd = [*self.jailer_cmd, "--", "--api-sock", "/api.sock", "--id", jail_id, "--level", "Info", *vmm_args]
        self.proc = subprocess.Popen(cmd, cwd="/", env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._out, self._err = bytearray(), bytearray()
        self._cond = threading.Condition()
        self._pumps = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                       for s, b in ((self.proc.stdout, self._out), (self.proc.stderr, self._err))]
        for t in self._pumps:
            t.start()
        self.api = apiclient.ApiClient(str(self.sock))
        self._wait_listening()
        self.pid = int((self.chroot / f"{EXEC_NAME}.pid").read_text())

    def _pump(self, stream, buf: bytearray) -> None:
        while chunk := stream.read1(65536):
            with self._cond:
                buf.extend(chunk)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def stdout(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._cond:
            return self._err.decode(errors="replace")

    def describe(self) -> str:
        return f"exit={self.proc.poll()}\n--- console ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"

    def _wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the jailed VMM exited before listening\n{self.describe()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(self.sock))
                if (self.chroot / f"{EXEC_NAME}.pid").exists():
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"the jailed VMM did not listen within {timeout} s\n{self.describe()}")

    def wait_for_output(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self._out.decode(errors="replace"):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._pumps)):
                    raise AssertionError(f"no {needle!r} on the console\n{self.describe()}")
                self._cond.wait(min(left, 0.2))

    def put_ok(self, path: str, body: dict) -> None:
        resp = self.api.put(path, body)
        assert resp.status == 204, f"PUT {path}: {resp}\n{self.describe()}"

    def send_console(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def assert_no_late_import(self) -> None:
        assert "jail entered" in self.stderr, self.describe()
        assert LATE_IMPORT not in self.stderr, self.describe()

    def close(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the jailer passes it on to the VMM
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        for t in self._pumps:
            t.join(5)
        subprocess.run([*self.jailer_cmd, "--cleanup"], env=_env(), check=True, capture_output=True)


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ember-j-"))  # short: sun_path is 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def jail(base: Path) -> Iterator:
    started: list[JailedVmm] = []

    def start(jail_id: str, uid: int, jailer_args: Sequence[str] = (), vmm_args: Sequence[str] = ()) -> JailedVmm:
        vm = JailedVmm(base, jail_id, uid, jailer_args, vmm_args)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.close()
    for ctrl in ("memory", "cpu", "pids"):  # the parent cgroup the jailer made (one per exec file name)
        for mount in (CgroupMounts.read().v1.get(ctrl), CgroupMounts.read().v2):
            if mount and os.path.isdir(os.path.join(mount, EXEC_NAME)):
                try:
                    os.rmdir(os.path.join(mount, EXEC_NAME))
                except OSError:
                    pass


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _boot(vm: JailedVmm, kernel: str, boot_args: str, mem_mib: int = 64) -> None:
    vm.put_ok("/boot-source", {"kernel_image_path": kernel, "boot_args": boot_args})
    vm.put_ok("/machine-config", {"vcpu_count": 1, "mem_size_mib": mem_mib})
    vm.put_ok("/actions", {"action_type": "InstanceStart"})


def _limits_args() -> tuple[list[str], dict[str, str]]:
    version = detect_version(CgroupMounts.read())
    settings = limits_settings(version, memory_bytes=512 * MIB, cpu_quota_us=150_000, pids=64)
    return [a for name, value in settings for a in ("--cgroup", f"{name}={value}")], dict(settings)


def test_a_jailed_vmm_has_no_privilege_its_own_root_namespaces_cgroup_and_rlimits(jail, testguest: Path) -> None:
    cg_args, settings = _limits_args()
    vm = jail("jail-a", 200101, [*cg_args, "--resource-limit", "no-file=256", "--resource-limit",
                                 f"fsize={1 << 30}", "--new-pid-ns", "--hard-link", f"{testguest}:/guest.elf"])
    _boot(vm, "/guest.elf", "mode=echo")
    vm.wait_for_output("ECHO READY")
    vm.send_console(b"jailed\n")
    vm.wait_for_output("ECHO:jailed")

    st = _status(vm.pid)
    assert st["Uid"].split() == ["200101"] * 4 and st["Gid"].split() == ["200101"] * 4
    assert st["Groups"] == ""
    assert st["NoNewPrivs"] == "1"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap], 16) == 0, (cap, st[cap])
    assert st["NSpid"].split()[-1] == "1"  # pid 1 of its own PID namespace
    # Its root directory is the chroot: same inode, and only what the jailer put there.
    root, chroot = os.stat(f"/proc/{vm.pid}/root/"), os.stat(vm.chroot)
    assert (root.st_dev, root.st_ino) == (chroot.st_dev, chroot.st_ino)
    assert sorted(os.listdir(f"/proc/{vm.pid}/root/")) == ["api.sock", "dev", "guest.elf", f"{EXEC_NAME}.pid"]
    dev = os.stat(f"/proc/{vm.pid}/root/dev/kvm")
    assert dev.st_rdev == os.stat("/dev/kvm").st_rdev and dev.st_uid == 200101
    for ns in ("mnt", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{vm.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # The cgroup: the VMM is in it, with the limits the jailer was given.
    mounts = CgroupMounts.read()
    groups = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{vm.pid}/cgroup").read_text().splitlines())
    for name, value in settings.items():
        ctrl = name.split(".")[0]
        if detect_version(mounts) == 1:
            assert groups[ctrl] == f"/{EXEC_NAME}/jail-a", (ctrl, groups)
            path = Path(mounts.v1[ctrl]) / EXEC_NAME / "jail-a"
        else:
            path = Path(mounts.v2) / EXEC_NAME / "jail-a"
        assert (path / name).read_text().strip() == value
        assert vm.pid in {int(p) for p in (path / "cgroup.procs").read_text().split()}
    limits = Path(f"/proc/{vm.pid}/limits").read_text()
    assert any(line.startswith("Max open files") and line.split()[3:5] == ["256", "256"]
               for line in limits.splitlines()), limits
    assert any(line.startswith("Max file size") and line.split()[3:5] == [str(1 << 30)] * 2
               for line in limits.splitlines()), limits
    vm.send_console(b"quit\n")
    assert vm.proc.wait(30) == 0, vm.describe()
    vm.assert_no_late_import()


def test_the_jailed_vmm_cannot_open_host_files(jail, testguest: Path) -> None:
    vm = jail("jail-b", 200102, ["--new-pid-ns"])
    assert testguest.exists()
    for path in (str(testguest), "/etc/passwd", "/../../../../etc/passwd", "/proc/self/status"):
        resp = vm.api.put("/boot-source", {"kernel_image_path": path, "boot_args": "mode=hello"})
        if resp.status == 204:
            resp = vm.api.put("/actions", {"action_type": "InstanceStart"})
        assert resp.status == 400, (path, str(resp))
        assert "No such file" in resp.fault or "not found" in resp.fault.lower(), resp.fault
    vm.assert_no_late_import()


def _agent_ping(uds: Path, timeout: float = 20.0) -> str:
    """The agent's PONG. Right after a resume the guest is still handling the vsock
    TRANSPORT_RESET every restore sends and may refuse a CONNECT: retry (as the pool does)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return AgentClient(str(uds), timeout=timeout).ping()
        except AgentConnectFailed:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_snapshot_in_one_jail_restores_in_another_with_vsock_and_no_late_import(jail, testguest: Path) -> None:
    """Boot (agent guest on vsock), pause, snapshot in jail A; load it in jail B (another uid), resume."""
    a = jail("jail-c", 200103, ["--new-pid-ns", "--hard-link", f"{testguest}:/guest.elf"])
    a.put_ok("/boot-source", {"kernel_image_path": "/guest.elf", "boot_args": "mode=agent"})
    a.put_ok("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    a.put_ok("/vsock", {"guest_cid": 3, "uds_path": "/v.sock"})
    a.put_ok("/actions", {"action_type": "InstanceStart"})
    a.wait_for_output("AGENT LISTENING 52")
    assert _agent_ping(a.chroot / "v.sock") == "testguest"
    assert a.api.patch("/vm", {"state": "Paused"}).status == 204
    a.put_ok("/snapshot/create", {"snapshot_path": "/vm.state", "mem_file_path": "/vm.mem"})
    a.assert_no_late_import()
    # What the pool does with a template: root-owned, read-only files, hard-linked into each jail.
    state, mem = a.chroot / "vm.state", a.chroot / "vm.mem"
    for f in (state, mem):
        os.chown(f, 0, 0)
        os.chmod(f, 0o444)
    b = jail("jail-d", 200104, ["--new-pid-ns", "--hard-link", f"{state}:/snap/vm.state",
                                "--hard-link", f"{mem}:/snap/vm.mem"])
    a.close()
    b.put_ok("/snapshot/load", {"snapshot_path": "/snap/vm.state",
                                "mem_backend": {"backend_type": "File", "backend_path": "/snap/vm.mem"},
                                "vsock_override": {"uds_path": "/v.sock"}, "resume_vm": False})
    assert b.api.patch("/vm", {"state": "Resumed"}).status == 204
    assert _agent_ping(b.chroot / "v.sock") == "testguest"
    assert b.api.patch("/vm", {"state": "Paused"}).status == 204
    b.put_ok("/snapshot/create", {"snapshot_path": "/again.state", "mem_file_path": "/again.mem"})
    assert (b.chroot / "again.state").stat().st_uid == 200104
    b.assert_no_late_import()


def test_block_device_in_a_jail_across_snapshot_restore(jail, testguest: Path, base: Path) -> None:
    """The snap guest re-reads its virtio-blk drive every round, before and after a restore in another jail."""
    drive = base / "drive.img"
    drive.write_bytes(os.urandom(16 * 512))
    os.chmod(drive, 0o444)
    common = ["--new-pid-ns", "--hard-link", f"{drive}:/drive.img"]
    a = jail("jail-e", 200105, [*common, "--hard-link", f"{testguest}:/guest.elf"])
    a.put_ok("/boot-source", {"kernel_image_path": "/guest.elf",
                              "boot_args": "mode=snap snap.rounds=30 snap.round_ms=40 snap.idle=spin"})
    a.put_ok("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    a.put_ok("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/drive.img", "is_root_device": False,
                                "is_read_only": True})
    a.put_ok("/actions", {"action_type": "InstanceStart"})
    a.wait_for_output("SNAP round=6 ")
    assert a.api.patch("/vm", {"state": "Paused"}).status == 204
    a.put_ok("/snapshot/create", {"snapshot_path": "/vm.state", "mem_file_path": "/vm.mem"})
    a.assert_no_late_import()
    for f in (a.chroot / "vm.state", a.chroot / "vm.mem"):
        os.chown(f, 0, 0)
        os.chmod(f, 0o444)
    b = jail("jail-f", 200106, [*common, "--hard-link", f"{a.chroot / 'vm.state'}:/vm.state",
                                "--hard-link", f"{a.chroot / 'vm.mem'}:/vm.mem"])
    a.close()
    b.put_ok("/snapshot/load", {"snapshot_path": "/vm.state",
                                "mem_backend": {"backend_type": "File", "backend_path": "/vm.mem"},
                                "resume_vm": True})
    b.wait_for_output("TESTGUEST snap PASS", timeout=60)
    assert "blk=BAD" not in b.stdout and "SNAP FAIL" not in b.stdout, b.describe()
    b.assert_no_late_import()


def test_daemonized_jailer_exits_and_the_vmm_runs_in_its_own_session(base: Path) -> None:
    jail_id = "jail-g"
    cmd = [PYTHON, "-m", "jailer", "--id", jail_id, "--exec-file", PYTHON, "--exec-arg=-m",
           "--exec-arg=vmm.main", "--uid", "200107", "--gid", "200107", "--chroot-base-dir", str(base),
           "--new-pid-ns", "--daemonize"]
    chroot = base / EXEC_NAME / jail_id / "root"
    done = subprocess.run([*cmd, "--", "--api-sock", "/api.sock", "--id", jail_id], env=_env(), timeout=30,
                          capture_output=True)
    try:
        assert done.returncode == 0, done
        pid = int((chroot / f"{EXEC_NAME}.pid").read_text())
        deadline = time.monotonic() + 30
        while not (chroot / "api.sock").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert os.getsid(pid) != os.getsid(0)
        assert _status(pid)["NoNewPrivs"] == "1"
        assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass
        time.sleep(0.2)
        subprocess.run([*cmd, "--cleanup"], env=_env(), check=True)
    assert not (base / EXEC_NAME / jail_id).exists()


def test_a_module_imported_inside_the_jail_fails_and_is_reported(base: Path) -> None:
    """The proof's other half: the watch sees a late import, and the import cannot succeed in the jail."""
    spec = JailSpec(id="late", chroot=str(base / "late" / "root"), uid=200108, gid=200108)
    script = textwrap.dedent(f"""
        import json, os, sys
        from jailer import ImportWatch, JailSpec, enter, prepare
        spec = JailSpec.from_json(json.loads({json.dumps(json.dumps(spec.to_json()))}))
        prepare(spec)
        assert "colorsys" not in sys.modules
        enter(spec)
        watch = ImportWatch()
        watch.start()
        try:
            import colorsys
            outcome = "imported"
        except ImportError:
            outcome = "ImportError"
        print(json.dumps({{"late": watch.late, "outcome": outcome, "root": os.listdir("/")}}))
    """)
    done = subprocess.run([PYTHON, "-c", script], env=_env(), capture_output=True, timeout=30, cwd="/")
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result == {"late": ["colorsys"], "outcome": "ImportError", "root": ["dev"]}
