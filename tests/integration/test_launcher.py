"""`poolsvc.launcher` with real KVM: templates of the test guest, clones forked by `vmm.zygote`.

The template is the `echo` test guest snapshotted after ``ECHO READY``.
Clones get a console FIFO (`Launcher(console_input=True)`), so a restored,
resumed clone proves it runs by echoing a line typed into it. Run with
``-s`` to see the launch numbers (restore and resume p50 over 20 clones,
memory per VMM with 10 clones alive).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from poolsvc.launcher import (
    LaunchError,
    Launcher,
    TemplateExists,
    TemplateNotFound,
    TemplateStore,
    VmHandle,
    ZygoteClient,
    cleanup_stale,
    process_start_time,
    vmm_memory,
)
from poolsvc.vmm_client import VmmClient

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(300)]

MIB = 1 << 20


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ember-l-"))  # short: sun_path is 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def store(home: Path, testguest: Path) -> TemplateStore:
    store = TemplateStore(home)
    store.create("echo", testguest, boot_args="mode=echo", vcpus=1, mem_mib=64, ready_marker="ECHO READY",
                 timeout=60)
    return store


@pytest.fixture
def launcher(store: TemplateStore, home: Path) -> Iterator[Launcher]:
    launchers: list[Launcher] = []

    def make(**kwargs) -> Launcher:
        lau = Launcher(store, home / f"run{len(launchers)}", console_input=True, **kwargs)
        lau.start()
        launchers.append(lau)
        return lau

    make.all = launchers  # type: ignore[attr-defined]
    yield make
    for lau in launchers:
        lau.destroy_all()
        lau.close()
        shutil.rmtree(lau.root, ignore_errors=True)


def _ppid(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2:].split()[1])


def _gone(pid: int, start_time: int) -> bool:
    """No process `pid` of that start time (not even a zombie)."""
    return process_start_time(pid) != start_time


def _wait_console(h: VmHandle, needle: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = h.console_log.read_bytes().decode(errors="replace")
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} on {h.vm_id}'s console\n{text}\n--- vmm ---\n"
                                 f"{h.vmm_log.read_text(errors='replace')}")
        time.sleep(0.01)


def _type(h: VmHandle, line: str) -> None:
    with open(h.console_in, "wb") as f:
        f.write(line.encode() + b"\n")


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


# --- templates ------------------------------------------------------------------------------


def test_template_store_create_get_list_remove(store: TemplateStore, testguest: Path) -> None:
    info = store.get("echo")
    doc = json.loads((info.dir / "template.json").read_text())
    assert doc["name"] == "echo" and doc["vcpus"] == 1 and doc["mem_mib"] == 64 and doc["boot_args"] == "mode=echo"
    assert info.state_path.stat().st_size > 0 and info.mem_path.stat().st_size == 64 * MIB
    assert not (info.dir / "build").exists()  # the template VMM's work files are gone
    with pytest.raises(TemplateExists):
        store.create("echo", testguest, boot_args="mode=echo", ready_marker="ECHO READY")
    with pytest.raises(TemplateNotFound):
        store.get("nope")
    # A second template (with a read-only root drive and a readiness callable), then removed.
    disk = store.root / "disk.img"
    disk.write_bytes(os.urandom(MIB))
    seen = []
    second = store.create("echo2", testguest, rootfs=disk, boot_args="mode=echo", mem_mib=32,
                          ready=lambda h: seen.append(h.pid) is None and b"ECHO READY" in h.console_log.read_bytes())
    assert seen and second.rootfs_path is not None and second.rootfs_path.read_bytes() == disk.read_bytes()
    assert [t.name for t in store.list()] == ["echo", "echo2"]
    store.remove("echo2")
    assert [t.name for t in store.list()] == ["echo"] and not second.dir.exists()
    with pytest.raises(TemplateNotFound):
        store.remove("echo2")


def test_a_template_that_never_gets_ready_leaves_nothing(store: TemplateStore, testguest: Path) -> None:
    from poolsvc.launcher import TemplateError
    with pytest.raises(TemplateError, match="not ready"):
        store.create("never", testguest, boot_args="mode=echo", mem_mib=32, ready_marker="NEVER PRINTED",
                     timeout=2)
    assert not (store.dir / "never").exists()


# --- clones -------------------------------------------------------------------------------


def test_three_clones_forked_by_the_zygote_run_on_their_own(launcher) -> None:
    lau = launcher()
    zpid = lau.zygote.pid
    assert zpid is not None
    clones = [lau.restore("echo", f"c{i}") for i in range(3)]
    zygote_sockets = _socket_inodes(zpid)
    for h in clones:
        assert Path(f"/proc/{h.pid}/comm").read_text().strip() == "ember-vmm"
        cmdline = Path(f"/proc/{h.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert cmdline.startswith(f"ember-vmm --id {h.vm_id} --api-sock {h.api_sock}"), cmdline
        assert _ppid(h.pid) == zpid and os.getsid(h.pid) == h.pid  # forked by the zygote, own session
        assert not (_socket_inodes(h.pid) & zygote_sockets)  # no listener or client connection inherited
        assert VmmClient(h.api_sock).describe_instance()["state"] == "Paused"
        pidfile = json.loads((h.workdir / "vmm.pid").read_text())
        assert pidfile["pid"] == h.pid and pidfile["start_time"] == h.start_time
        assert h.vsock_uds.exists()  # the vsock override: each clone its own socket
    time.sleep(0.3)
    assert all("ECHO" not in h.console_log.read_text() for h in clones)  # paused: nothing ran
    for h in clones:
        lau.resume(h)
    for i, h in enumerate(clones):
        _type(h, f"clone{i}")
    for i, h in enumerate(clones):
        text = _wait_console(h, f"ECHO:clone{i}")
        assert "ECHO READY" not in text  # restored, not booted
        assert f"ECHO:clone{(i + 1) % 3}" not in text
    for h in clones:
        lau.destroy(h)
        assert _gone(h.pid, h.start_time) and not h.workdir.exists()


def test_destroy_leaves_no_process_and_no_files_and_is_idempotent(launcher) -> None:
    lau = launcher()
    h = lau.restore("echo", "d0")
    lau.resume(h)
    files = set(os.listdir(h.workdir))
    assert {"api.sock", "vsock.sock", "console.log", "vmm.log", "vmm.pid", "console.in"} <= files
    lau.destroy(h)
    assert _gone(h.pid, h.start_time)
    assert not h.workdir.exists() and not lau.alive(h) and lau.handles() == []
    lau.destroy(h)  # again: nothing to do, no error
    assert sorted(os.listdir(lau.root)) == [".zygote.pid", ".zygote.sock", "zygote.log"]


def test_alive_turns_false_after_kill_9(launcher) -> None:
    lau = launcher()
    h = lau.restore("echo", "k0")
    assert lau.alive(h)
    os.kill(h.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while lau.alive(h):
        assert time.monotonic() < deadline, "alive() still True 5 s after kill -9"
        time.sleep(0.01)
    lau.destroy(h)
    assert not h.workdir.exists() and _gone(h.pid, h.start_time)


def test_a_failed_restore_leaves_nothing(launcher, store: TemplateStore) -> None:
    lau = launcher()
    good = store.get("echo")
    broken = store.dir / "broken"
    shutil.copytree(good.dir, broken)
    (broken / "vm.mem").write_bytes(b"\0" * 4096)  # too short for the guest's memory
    doc = json.loads((broken / "template.json").read_text())
    (broken / "template.json").write_text(json.dumps({**doc, "name": "broken"}))
    try:
        with pytest.raises(LaunchError, match="memory file"):
            lau.restore("broken", "b0")
        assert not (lau.root / "b0").exists() and lau.handles() == []
        assert lau.zygote.request({"op": "ping"})["children"] == 0
        with pytest.raises(TemplateNotFound):
            lau.restore("missing", "b1")
        assert not (lau.root / "b1").exists()
    finally:
        shutil.rmtree(broken)


def test_the_direct_spawn_fallback_restores_too(launcher) -> None:
    lau = launcher(use_zygote=False)
    h = lau.restore("echo", "f0")
    assert lau.zygote.pid is None and _ppid(h.pid) == os.getpid()
    lau.resume(h)
    _type(h, "direct")
    _wait_console(h, "ECHO:direct")
    lau.destroy(h)
    assert _gone(h.pid, h.start_time) and not h.workdir.exists()


def test_a_zygote_restart_does_not_lose_running_vms(launcher) -> None:
    lau = launcher()
    old = [lau.restore("echo", f"z{i}") for i in range(2)]
    first_zygote = lau.zygote.pid
    assert first_zygote is not None
    os.kill(first_zygote, signal.SIGKILL)
    time.sleep(0.1)
    assert all(lau.alive(h) for h in old)  # the clones outlive their zygote
    new = lau.restore("echo", "z2")  # the launcher starts a new zygote
    assert lau.zygote.pid not in (None, first_zygote) and _ppid(new.pid) == lau.zygote.pid
    for h in old:
        assert _ppid(h.pid) == os.getpid()  # re-parented to the launcher (child subreaper)
        lau.resume(h)
        _type(h, f"still-{h.vm_id}")
        _wait_console(h, f"ECHO:still-{h.vm_id}")
    for h in (*old, new):
        lau.destroy(h)
        assert _gone(h.pid, h.start_time) and not h.workdir.exists()  # killed and reaped: no zombie


def test_cleanup_stale_kills_a_leftover_vmm_and_spares_other_processes(launcher) -> None:
    crashed = launcher()
    h = crashed.restore("echo", "s0")
    crashed.resume(h)
    crashed.close()  # the service "crashes": its zygote goes, the VMM and its files stay
    assert crashed.alive(h)
    # A work directory whose pid file names a process that is not an ember-vmm.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        other = crashed.root / "s1"
        other.mkdir()
        (other / "vmm.pid").write_text(json.dumps({"pid": bystander.pid,
                                                   "start_time": process_start_time(bystander.pid)}))
        (crashed.root / "s2").mkdir()  # crashed before its pid file was written
        found = {s.vm_id: s for s in cleanup_stale(crashed.root)}
        assert found["s0"].killed and found["s0"].pid == h.pid
        assert not found["s1"].killed and bystander.poll() is None
        assert found["s2"].pid is None
        assert _gone(h.pid, h.start_time)
        # Only the zygote's log may remain, and only when something was written to it.
        left = os.listdir(crashed.root)
        assert left == [] or (left == ["zygote.log"] and (crashed.root / "zygote.log").stat().st_size > 0), left
    finally:
        bystander.kill()
        bystander.wait()


def test_zygote_protocol(home: Path) -> None:
    root = home / "zp"
    root.mkdir()
    zygote = ZygoteClient(root / "z.sock", root / "z.log")
    zygote.start()
    try:
        assert zygote.request({"op": "ping"})["pid"] == zygote.pid
        assert zygote.request({"argv": "x"}) == {"ok": False, "error": "argv must be a list of strings"}
        assert not zygote.request({"op": "fly"})["ok"]
        pid = zygote.spawn(["--version"], stdin=None, stdout=root / "out", stderr=root / "err", cwd=root)
        assert zygote.wait(pid, 10) == "exited"
        assert (root / "out").read_text().startswith("ember-vmm v")
        assert zygote.wait(pid, 0) == "unknown"  # reported once
        pid = zygote.spawn(["--no-such-flag"], stdin=None, stdout=root / "out", stderr=root / "err", cwd=root)
        answer = zygote.request({"op": "wait", "pid": pid, "timeout": 10}, timeout=20)
        assert answer["state"] == "exited" and answer["returncode"] == 2  # argparse's status
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a bad line does not end the connection
            s.connect(str(root / "z.sock"))
            s.sendall(b"not json\n{\"op\": \"ping\"}\n")
            time.sleep(0.2)
            lines = s.recv(4096).decode().splitlines()
        assert not json.loads(lines[0])["ok"] and json.loads(lines[1])["ok"]
    finally:
        zygote.stop()
    assert not (root / "z.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="jails need root")
def test_a_jailed_clone_writes_its_own_rootfs_copy_kept_on_disk_outside_the_jail(launcher, store, home,
                                                                                 testguest) -> None:
    from poolsvc.jailing import JailConfig

    image = home / "rw-image.ext4"
    image.write_bytes(bytes(1 << 20))
    if "rw" not in {t.name for t in store.list()}:
        store.create("rw", testguest, rootfs=image, rootfs_writable=True, boot_args="mode=echo", vcpus=1,
                     mem_mib=64, ready_marker="ECHO READY", timeout=60)
    lau = launcher(jail=JailConfig())
    h = lau.restore("rw", "rw0")
    jailed = lau.jail_of(h)
    assert jailed is not None
    copy = h.workdir / "rootfs.ext4"
    st = copy.stat()
    assert st.st_uid == jailed.spec.uid and st.st_dev != os.stat(lau.jail_root).st_dev  # on disk, the VM's
    assert Path(jailed.spec.chroot).parent == lau.jail_root and os.path.ismount(lau.jail_root)
    # The VMM has that copy open read-write (bind-mounted at /rootfs.ext4 in its jail).
    open_rw = []
    for fd in os.listdir(f"/proc/{h.pid}/fd"):
        try:
            fst = os.stat(f"/proc/{h.pid}/fd/{fd}")
        except OSError:
            continue
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
            flags = int(Path(f"/proc/{h.pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
            open_rw.append(flags & os.O_ACCMODE == os.O_RDWR)
    assert open_rw == [True]
    lau.resume(h)
    lau.destroy(h)
    assert not h.workdir.exists() and not Path(jailed.spec.chroot).exists()
    lau.close()
    assert not lau.jail_root.exists() and not os.path.ismount(lau.jail_root)  # nothing left mounted


def test_the_zygote_binds_the_api_socket_before_it_forks(home: Path) -> None:
    root = home / "zb"
    root.mkdir()
    zygote = ZygoteClient(root / "z.sock", root / "z.log")
    zygote.start()
    api = root / "api.sock"
    try:
        pid = zygote.spawn(["--api-sock", str(api), "--id", "zb"], stdin=None, stdout=root / "out",
                           stderr=root / "err", cwd=root, api_sock=api)
        try:
            # No polling: the socket listens by the time the spawn is answered.
            client = VmmClient(api, timeout=30)
            client.wait_until_listening(0.0)
            assert client.describe_instance()["id"] == "zb"
            client.close()
        finally:
            os.kill(pid, signal.SIGKILL)
            assert zygote.wait(pid, 10) == "exited"
        # A path that is taken: refused before any fork, and the zygote goes on.
        children = zygote.request({"op": "ping"})["children"]
        answer = zygote.request({"argv": ["--api-sock", str(root / "out")], "api_sock": str(root / "out")})
        assert not answer["ok"] and "cannot bind the API socket" in answer["error"]
        assert zygote.request({"op": "ping"})["children"] == children
        assert (root / "out").is_file()  # not ours: left alone
        assert not zygote.request({"argv": [], "api_sock": 7})["ok"]
    finally:
        zygote.stop()


# --- numbers --------------------------------------------------------------------------------


def test_launch_latency_and_memory_per_vmm(launcher, store: TemplateStore) -> None:
    lau = launcher()
    mem_file = store.get("echo").mem_path
    restore_ms, resume_ms = [], []
    for i in range(20):
        t0 = time.perf_counter()
        h = lau.restore("echo", f"m{i}")
        t1 = time.perf_counter()
        lau.resume(h)
        t2 = time.perf_counter()
        restore_ms.append((t1 - t0) * 1e3)
        resume_ms.append((t2 - t1) * 1e3)
        if i >= 10:
            lau.destroy(h)  # keep 10 alive
    alive = lau.handles()
    assert len(alive) == 10
    for h in alive:
        _type(h, "m")
    for h in alive:
        _wait_console(h, "ECHO:m")
    mems = [vmm_memory(h.pid, mem_file) for h in alive]
    zygote_mem = vmm_memory(lau.zygote.pid)

    def p50(values: list[float]) -> float:
        return statistics.median(values)

    pss = p50([m.pss / MIB for m in mems])
    priv = p50([m.private_dirty / MIB for m in mems])
    print(f"\nlaunch via zygote, 20 clones of a 64 MiB echo guest: restore (fork + snapshot load, paused) "
          f"p50 {p50(restore_ms):.1f} ms (min {min(restore_ms):.1f}, max {max(restore_ms):.1f}); "
          f"resume p50 {p50(resume_ms):.2f} ms")
    print(f"per VMM, 10 alive: PSS {pss:.2f} MiB, private dirty {priv:.2f} MiB, RSS "
          f"{p50([m.rss / MIB for m in mems]):.2f} MiB; guest memory mapping: PSS "
          f"{p50([m.guest_pss / MIB for m in mems]):.2f} MiB, private dirty "
          f"{p50([m.guest_private_dirty / MIB for m in mems]):.2f} MiB; overhead (minus guest): PSS "
          f"{p50([m.overhead_pss / MIB for m in mems]):.2f} MiB, private dirty "
          f"{p50([m.overhead_private_dirty / MIB for m in mems]):.2f} MiB, RSS "
          f"{p50([m.overhead_rss / MIB for m in mems]):.2f} MiB; zygote RSS {zygote_mem.rss / MIB:.1f} MiB")
    assert all(m.guest_rss > 0 for m in mems)  # the guest memory file's mapping was found
    # Forking from the zygote shares the interpreter: a `python -m vmm.main` VMM has ~25 MiB private.
    assert priv < 16, mems
