"""Snapshots of Ember's default Linux guest: one boot, then restores (real KVM).

A Linux boot costs minutes on PVM hosts, a restore costs little, so this
module boots once (`template`), configured with Firecracker's getting-started
flow run with curl as its docs run it (PUT /logger, /boot-source,
/drives/rootfs, /network-interfaces/net1, then a vsock device and
/actions InstanceStart): the guest writes a marker file to its ext4
root (virtio-block), configures `eth0` (virtio-net on a TAP in a throw-away
network namespace), starts an `ember-vsock` echo server on vsock port 5000
and a counter that prints ``COUNT=<n>`` every two seconds, then gives its
console to a shell. The test waits for a few counts, pauses the VM, creates a
full snapshot and kills that VMM.

Every test then restores it into a new `ember-vmm` process — each in its own
network namespace with a TAP of another name (`network_overrides`), its own
vsock socket (`vsock_override`) and its own copy of the root file system
(Ember's `drive_overrides`) — and checks that the counter continues (no
reboot, no clock jump that the kernel complains about), the marker file
reads back, the console shell answers, vsock echoes, and the network
answers a ping. The memory backends: the memory file (MAP_PRIVATE), and
userfaultfd served by `ember page-server` from the raw file, from the chunk
store, and from the chunk store with the working set recorded by an earlier
restore prefetched. Two clones of one snapshot run side by side, diverge,
and read different random numbers after restore (VMGenID reseeds the guest's
RNG).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest.images import ImagesNotBuilt, run_arg, show
from tests.integration.conftest import load_apiclient
from tests.integration.netns import TapNamespace, missing_requirements
from tests.integration.page_server import PageServer

REPO_ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT_S = 1200
BOOT_ATTEMPTS = 3
STALL_S = 180
RESTORE_TIMEOUT_S = 300
GUEST_ADDR = "10.200.0.2"
GUEST_MAC = "06:00:0a:c8:00:02"
VSOCK_PORT = 5000

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.linux,
    pytest.mark.timeout(BOOT_TIMEOUT_S + 1800),
    pytest.mark.skipif(missing_requirements() is not None, reason=missing_requirements() or ""),
]


apiclient = load_apiclient()

# Runs once, then /init's shell takes the console (ember.exit=shell). The
# counter waits with `read -t` on a FIFO nobody writes, a shell builtin: no
# fork/exec every two seconds for this host's user-process crash to hit. The guest
# calls its interface eth0; the VMM knows it by its API id, net1.
GUEST_SCRIPT = f"""echo template-data >/root/marker;sync;echo MARKER-WRITTEN
ip addr add {GUEST_ADDR}/24 dev eth0;ip link set eth0 up
ember-vsock listen {VSOCK_PORT} >/dev/null 2>&1 &
mkfifo /tmp/tick;exec 3<>/tmp/tick
(i=0;while :;do echo COUNT=$i;i=$((i+1));read -t 2 x <&3;done)&
echo SCRIPT-DONE
"""

COUNT_RE = re.compile(r"COUNT=(\d+)")

# Runs in a namespace: ICMP echo requests to argv[1] once a second until a reply or argv[2] seconds.
ICMP_PING = r"""
import os, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(1.0)
ident, deadline, seq = os.getpid() & 0xFFFF, time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < deadline:
    seq += 1
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"ember-ping"
    sock.sendto(struct.pack("!BBHHH", 8, 0, csum(body), ident, seq) + b"ember-ping", (sys.argv[1], 0))
    try:
        while True:
            data, peer = sock.recvfrom(2048)
            icmp = data[(data[0] & 0xF) * 4:]
            if peer[0] == sys.argv[1] and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                print("reply", seq); sys.exit(0)
    except socket.timeout:
        pass
print("no reply"); sys.exit(1)
"""


@dataclass
class Template:
    dir: Path
    state: Path
    mem: Path
    rootfs: Path
    last_count: int
    console: str


def _images() -> dict:
    try:
        return show()
    except ImagesNotBuilt as exc:
        pytest.skip(f"guest images not built ({exc}); run `ember images build`")


@pytest.fixture(scope="module")
def template():
    img = _images()
    work = Path(tempfile.mkdtemp(prefix="ember-ls-"))
    ns = TapNamespace.create(prefix="ember-ls-")
    rootfs = work / "rootfs.ext4"
    result = None
    try:
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            shutil.copyfile(img["rootfs"], rootfs)
            proc = apiclient.VmmApiProcess(work, ("--id", "template"), wrapper=ns.exec_prefix,
                                           sock_name=f"api{attempt}.sock")
            try:
                result = _boot_template(proc, img, work, ns, rootfs)
                break
            except _GuestStalled as exc:
                print(f"\n[linux-snapshot] boot {attempt}: {exc}; booting again\n{proc.stdout[-1500:]}")
            finally:
                proc.close()
    finally:
        ns.delete()
    if result is None:
        pytest.fail(f"the template guest stalled in {BOOT_ATTEMPTS} boots (see docs/host-kvm.md)")
    state, mem, last, console = result
    yield Template(work, state, mem, rootfs, last, console)
    shutil.rmtree(work, ignore_errors=True)


class _GuestStalled(Exception):
    """/init started but the guest printed nothing more for STALL_S seconds."""


def _boot_template(proc, img: dict, work: Path, ns: TapNamespace, rootfs: Path):
    """Configure (curl), boot, wait for the counter, pause, snapshot; (state, mem, last count, console)."""
    api = proc.api
    args = f"{img['boot_args']} ember.exit=shell {run_arg(GUEST_SCRIPT)}"
    log = work / "vmm.log"
    log.touch()
    # Firecracker's getting-started flow, with curl exactly as its docs run it
    # (logger, boot source, root drive, net1, InstanceStart), plus a vsock device.
    for path, body in (
        ("/logger", {"log_path": str(log), "level": "Debug", "show_level": True, "show_log_origin": True}),
        ("/boot-source", {"kernel_image_path": img["kernel"], "boot_args": args}),
        ("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(rootfs), "is_root_device": True,
                            "is_read_only": False}),
        ("/network-interfaces/net1", {"iface_id": "net1", "guest_mac": GUEST_MAC, "host_dev_name": ns.tap}),
        ("/vsock", {"guest_cid": 3, "uds_path": str(work / "v.sock")}),
        ("/actions", {"action_type": "InstanceStart"}),
    ):
        resp = apiclient.curl(proc.sock, "PUT", path, json.dumps(body))
        assert resp.status == 204, f"{path}: {resp}\n{proc.describe()}"
    info = api.get("/").json()
    assert info["state"] == "Running" and info["app_name"] == "Ember", info
    assert api.get("/machine-config").json()["mem_size_mib"] == 128  # Firecracker's default
    started = time.monotonic()
    try:
        proc.wait_for_output("EMBER-INIT-OK", timeout=BOOT_TIMEOUT_S)
        proc.wait_for_output("COUNT=3", timeout=STALL_S)
    except AssertionError as exc:
        # The host's user-process crash (docs/host-kvm.md) killed the counter, or the
        # console shell (whose exit reboots the guest), or a process slept for good: boot again.
        raise _GuestStalled(f"no COUNT=3 within {STALL_S} s of /init, or the guest rebooted") from exc
    print(f"\n[linux-snapshot] template boot to COUNT=3: {time.monotonic() - started:.1f} s")
    assert api.patch("/vm", {"state": "Paused"}).status == 204
    state, mem = work / "tmpl.state", work / "tmpl.mem"
    t0 = time.monotonic()
    resp = api.put("/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem)})
    assert resp.status == 204, f"{resp}\n{proc.describe()}"
    print(f"[linux-snapshot] snapshot create: {(time.monotonic() - t0) * 1000:.0f} ms")
    time.sleep(0.5)
    console = proc.stdout
    assert "MARKER-WRITTEN" in console and "SCRIPT-DONE" in console, console
    assert any('"level"' in line for line in log.read_text().splitlines()), "the logger wrote nothing"
    last = max(int(m) for m in COUNT_RE.findall(console))
    return state, mem, last, console


class Restored:
    """A VMM restored from the template in its own namespace, with its own TAP, vsock and rootfs."""

    def __init__(self, tmpl: Template, name: str, backend: str, backend_path: Path, **load_extra):
        self.dir = Path(tempfile.mkdtemp(prefix=f"ember-{name}-"))
        self.ns = TapNamespace.create(prefix="ember-lr-", tap=f"tap{name[:8]}")
        self.rootfs = self.dir / "rootfs.ext4"
        shutil.copyfile(tmpl.rootfs, self.rootfs)
        self.vsock = self.dir / "v.sock"
        self.proc = apiclient.VmmApiProcess(self.dir, ("--id", name), wrapper=self.ns.exec_prefix)
        body = {"snapshot_path": str(tmpl.state),
                "mem_backend": {"backend_type": backend, "backend_path": str(backend_path)},
                "resume_vm": True,
                "network_overrides": [{"iface_id": "net1", "host_dev_name": self.ns.tap}],
                "vsock_override": {"uds_path": str(self.vsock)},
                "drive_overrides": [{"drive_id": "rootfs", "path_on_host": str(self.rootfs)}], **load_extra}
        assert self.proc.api.get("/").status == 200  # the VMM is up and idle: time the load alone
        t0 = time.monotonic()
        resp = self.proc.api.put("/snapshot/load", body)
        self.load_ms = (time.monotonic() - t0) * 1000
        assert resp.status == 204, f"{resp}\n{self.proc.describe()}"
        print(f"\n[linux-snapshot] {name}: load {self.load_ms:.1f} ms ({backend})")

    def wait_count_after(self, n: int) -> int:
        """Wait for a COUNT above `n`; return the first count printed after the restore."""
        self.proc.wait_for_output(f"COUNT={n + 1}", timeout=RESTORE_TIMEOUT_S)
        return min(int(m) for m in COUNT_RE.findall(self.proc.stdout))

    def shell(self, command: str, marker: str, attempts: int = 6) -> str:
        """Run `command` on the console shell; return the value printed after `marker=`.

        Retried: on kvm_pvm hosts a freshly exec'd busybox sometimes dies at
        once (docs/host-kvm.md), which is a host defect, not a restore one.
        """
        for attempt in range(attempts):
            # The console echoes the typed line: the tag is computed by the shell so
            # that only the answer contains it literally.
            tag = f"{marker}{1000 + attempt}"
            self.proc.send_console(f"echo {marker}$((1000+{attempt}))=$({command})\n".encode())
            deadline = time.monotonic() + RESTORE_TIMEOUT_S / attempts
            while time.monotonic() < deadline:
                m = re.search(rf"{tag}=([^\r\n]*)\r?\n", self.proc.stdout)  # the whole line, not a prefix
                if m:
                    break
                time.sleep(0.2)
            if m and m.group(1).strip():
                return m.group(1).strip()
        raise ConsoleSilent(f"no {marker} answer from the console\n{self.proc.describe()}")

    def vsock_echo(self, payload: bytes = b"ping over vsock\n") -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(RESTORE_TIMEOUT_S)
            s.connect(str(self.vsock))
            s.sendall(f"CONNECT {VSOCK_PORT}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                chunk = s.recv(1)
                assert chunk, "vsock closed during CONNECT"
                line += chunk
            assert line.startswith(b"OK "), line
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        return got

    def ping(self) -> bool:
        """An ICMP echo from the namespace to the guest (raw socket: no `ping` binary needed)."""
        r = subprocess.run(self.ns.exec_prefix + [sys.executable, "-c", ICMP_PING, GUEST_ADDR, "60"],
                           capture_output=True, text=True, timeout=120)
        return r.returncode == 0 and "reply" in r.stdout

    def close(self) -> None:
        self.proc.close()
        self.ns.delete()
        shutil.rmtree(self.dir, ignore_errors=True)


def _no_kernel_complaints(console: str) -> None:
    for bad in ("soft lockup", "hard LOCKUP", "clocksource", "Kernel panic", "Oops"):
        assert bad not in console, f"{bad!r} on the console after restore:\n{console}"


class ConsoleSilent(AssertionError):
    """The guest's console shell gave no answer at all (not a wrong one)."""


def _check_restored(vm: Restored, tmpl: Template) -> None:
    first = vm.wait_count_after(tmpl.last_count)
    assert tmpl.last_count < first <= tmpl.last_count + 2, (tmpl.last_count, first)  # continued, not rebooted
    assert "EMBER-INIT-OK" not in vm.proc.stdout
    assert vm.shell("cat /root/marker", "MARKER") == "template-data"
    assert vm.vsock_echo() == b"ping over vsock\n"
    assert vm.ping(), vm.proc.describe()
    _no_kernel_complaints(vm.proc.stdout)


def test_restore_from_the_memory_file(template) -> None:
    vm = Restored(template, "file", "File", template.mem)
    try:
        _check_restored(vm, template)
    finally:
        vm.close()


def test_two_clones_run_side_by_side_and_diverge(template) -> None:
    # A clone whose console shell goes silent for minutes is the host's stalling-guest
    # defect (docs/host-kvm.md): both clones are restored again, once. A wrong answer
    # is never retried.
    for attempt in range(2):
        try:
            _two_clones(template, attempt)
            return
        except ConsoleSilent as exc:
            if attempt:
                raise
            print(f"[linux-snapshot] a clone's console went silent; restoring both again:\n{str(exc)[:300]}")


def _two_clones(template, attempt: int) -> None:
    a = Restored(template, f"clonea{attempt}", "File", template.mem)
    b = Restored(template, f"cloneb{attempt}", "File", template.mem)
    try:
        a.wait_count_after(template.last_count)
        b.wait_count_after(template.last_count)
        rng_a = a.shell("head -c 16 /dev/urandom|od -A n -t x1|tr -d ' '", "RNG")
        rng_b = b.shell("head -c 16 /dev/urandom|od -A n -t x1|tr -d ' '", "RNG")
        assert re.fullmatch(r"[0-9a-f]{32}", rng_a) and re.fullmatch(r"[0-9a-f]{32}", rng_b), (rng_a, rng_b)
        # Same memory, same RNG state at the snapshot: only VMGenID's reseed tells them apart.
        assert rng_a != rng_b
        # VMGenID's notification reached each guest through the ACPI GED interrupt.
        for vm in (a, b):
            ged = vm.shell("grep -i ged /proc/interrupts|tr -s ' '", "GED")
            assert int(ged.split()[1]) >= 1, ged
        a.shell("echo clone-a >/root/who;sync;cat /root/who", "WHO")
        assert b.shell("cat /root/who 2>/dev/null||echo none", "WHO") == "none"  # own rootfs copies
        assert a.vsock_echo(b"a\n") == b"a\n" and b.vsock_echo(b"b\n") == b"b\n"
    finally:
        a.close()
        b.close()


def test_restore_through_the_page_server_from_the_raw_file(template) -> None:
    server = PageServer(template.dir / "ps-raw.sock", "--mem", str(template.mem))
    vm = None
    try:
        vm = Restored(template, "uffdraw", "Uffd", template.dir / "ps-raw.sock")
        _check_restored(vm, template)
    finally:
        if vm is not None:
            vm.close()
        events = server.stop()
    assert events and events[0]["faults"] > 0, events


def test_restore_from_the_chunk_store_then_with_the_working_set_prefetched(template) -> None:
    store = template.dir / "store"
    put = subprocess.run([sys.executable, "-m", "poolsvc.cli", "snapshot", "put", "linux", "--store", str(store),
                          "--state", str(template.state), "--mem", str(template.mem), "--json"], cwd=REPO_ROOT,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
                         timeout=600)
    assert put.returncode == 0, put.stderr
    prefetched = []
    for run in ("record", "prefetch"):
        sock = template.dir / f"ps-{run}.sock"
        server = PageServer(sock, "--snapshot", "linux", "--store", str(store))
        vm = None
        try:
            vm = Restored(template, f"store{run}", "Uffd", sock)
            _check_restored(vm, template)
        finally:
            if vm is not None:
                vm.close()
            events = server.stop()
        assert events, f"no report from the page server ({run})"
        prefetched.append(events[0].get("prefetched_bytes", 0))
        print(f"[linux-snapshot] chunk store {run}: {events[0]}")
    assert prefetched[0] == 0 and prefetched[1] > 0, prefetched


def test_diff_snapshot_of_a_restored_clone_round_trips(template) -> None:
    """Restore with dirty tracking, full snapshot, run on, diff snapshot, merge, restore the merge."""
    from snapshot.memfile import merge_diff_snapshot

    work = Path(tempfile.mkdtemp(prefix="ember-ld-"))
    vm = Restored(template, "diffsrc", "File", template.mem, track_dirty_pages=True)
    try:
        resp = vm.proc.api.put("/snapshot/load", {"snapshot_path": str(template.state),
                                                  "mem_file_path": str(template.mem)})
        assert resp.status == 400  # a VMM loads one snapshot, before anything else
        vm.wait_count_after(template.last_count + 1)
        api = vm.proc.api
        assert api.patch("/vm", {"state": "Paused"}).status == 204
        base_state, base_mem = work / "base.state", work / "base.mem"
        assert api.put("/snapshot/create", {"snapshot_path": str(base_state),
                                            "mem_file_path": str(base_mem)}).status == 204
        assert api.patch("/vm", {"state": "Resumed"}).status == 204
        assert vm.shell("echo diff-data >/tmp/after-base;cat /tmp/after-base", "DIFF") == "diff-data"
        assert api.patch("/vm", {"state": "Paused"}).status == 204
        diff_state, diff_mem = work / "diff.state", work / "diff.mem"
        resp = api.put("/snapshot/create", {"snapshot_path": str(diff_state), "mem_file_path": str(diff_mem),
                                            "snapshot_type": "Diff"})
        assert resp.status == 204, resp
        time.sleep(0.3)
        count_at_diff = max(int(m) for m in COUNT_RE.findall(vm.proc.stdout))
    finally:
        vm.close()
    assert os.stat(diff_mem).st_blocks < os.stat(base_mem).st_blocks  # only the dirtied pages
    merge_diff_snapshot(diff_state, base_mem, diff_mem)
    restored_tmpl = Template(work, diff_state, base_mem, template.rootfs, count_at_diff, "")
    again = Restored(restored_tmpl, "diffdst", "File", base_mem)
    try:
        again.wait_count_after(count_at_diff)
        assert again.shell("cat /tmp/after-base", "AFTER") == "diff-data"  # written after the base snapshot
        _no_kernel_complaints(again.proc.stdout)
    finally:
        again.close()
        shutil.rmtree(work, ignore_errors=True)


def test_bad_state_files_are_refused_and_a_dead_page_server_fails_the_vm(template) -> None:
    work = Path(tempfile.mkdtemp(prefix="ember-lb-"))
    try:
        data = template.state.read_bytes()
        bad = {"corrupt": data[:-8] + bytes(b ^ 0x55 for b in data[-8:]), "truncated": data[: len(data) // 3],
               "newer": data[:8] + (7).to_bytes(2, "little") + data[10:]}
        for name, content in bad.items():
            (work / name).write_bytes(content)
            proc = apiclient.VmmApiProcess(work, ("--id", name), sock_name=f"{name}.sock")
            try:
                resp = proc.api.put("/snapshot/load", {"snapshot_path": str(work / name), "mem_backend": {
                    "backend_type": "File", "backend_path": str(template.mem)}, "resume_vm": True})
                assert resp.status == 400 and "invalid snapshot file" in resp.fault, resp
                assert proc.api.get("/").json()["state"] == "Not started"
            finally:
                proc.close()
        server = PageServer(work / "ps.sock", "--mem", str(template.mem))
        vm = Restored(template, "psdie", "Uffd", work / "ps.sock")
        try:
            vm.wait_count_after(template.last_count)
            server.proc.kill()
            server.proc.wait()
            assert vm.proc.wait(timeout=120) != 0, vm.proc.describe()
            assert "page server" in vm.proc.stderr, vm.proc.describe()
        finally:
            vm.close()
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
