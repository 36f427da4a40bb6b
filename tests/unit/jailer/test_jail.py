"""`prepare`, `enter` and `cleanup` on this host (root): the jail is entered in a forked child."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from jailer import HardLink, JailError, JailSpec, cleanup, enter, fork_into_new_pid_ns, jail_status, prepare

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="jails need root")


def _spec(tmp_path: Path, **kw) -> JailSpec:
    return JailSpec(id="unit", chroot=str(tmp_path / "jails" / "unit" / "root"), uid=200201, gid=200202, **kw)


def _in_child(fn) -> dict:
    """Run `fn` in a forked child (the jail is irreversible) and return what it returned (JSON)."""
    r, w = os.pipe()
    # SAFETY: the child only runs `fn`, writes to the pipe and leaves with os._exit; pytest's threads
    # (if any) are not used in it.
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_prepare_builds_the_chroot_devices_and_links(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_text("guest")
    spec = _spec(tmp_path, links=(HardLink(str(payload), "/snap/payload"),))
    prepare(spec)
    root = Path(spec.chroot)
    st = root.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (200201, 200202, 0o700)
    for dev in ("/dev/kvm", "/dev/net/tun", "/dev/userfaultfd"):
        if os.path.exists(dev):
            node = os.stat(spec.host_path(dev))
            assert stat.S_ISCHR(node.st_mode) and node.st_rdev == os.stat(dev).st_rdev
            assert (node.st_uid, node.st_gid, stat.S_IMODE(node.st_mode)) == (200201, 200202, 0o600)
    assert os.path.samefile(payload, root / "snap" / "payload")
    with pytest.raises(JailError, match="already exists"):
        prepare(spec)
    cleanup(spec)
    assert not root.exists() and payload.exists()


def test_a_failed_prepare_leaves_nothing(tmp_path: Path) -> None:
    spec = _spec(tmp_path, links=(HardLink(str(tmp_path / "missing"), "/x"),))
    with pytest.raises(JailError, match="cannot hard-link"):
        prepare(spec)
    assert not (tmp_path / "jails").exists()


def test_enter_drops_everything(tmp_path: Path) -> None:
    # Above the fds this (long-lived pytest) process already holds: the limit caps fd numbers.
    no_file = max(int(name) for name in os.listdir("/proc/self/fd")) + 64
    spec = _spec(tmp_path, rlimits=(("no-file", no_file),))
    prepare(spec)
    outside = tmp_path / "outside.txt"
    outside.write_text("host")

    def inside() -> dict:
        enter(spec)
        try:
            open(outside).close()
            opened = True
        except OSError:
            opened = False
        status = jail_status()
        return {"status": status, "root": sorted(os.listdir("/")), "opened_host_file": opened,
                "hostname": os.uname().nodename, "cwd": os.getcwd()}

    try:
        out = _in_child(inside)
    finally:
        cleanup(spec)
    assert "error" not in out, out
    assert out["status"] == {"uid": [200201] * 3, "gid": [200202] * 3, "caps": [0, 0, 0], "no_new_privs": True}
    assert out["root"] == ["dev"] and out["opened_host_file"] is False
    assert out["hostname"] == "unit" and out["cwd"] == "/"


def test_enter_refuses_without_a_prepared_chroot_or_in_the_wrong_pid_namespace(tmp_path: Path) -> None:
    out = _in_child(lambda: enter(_spec(tmp_path)))
    assert "does not exist" in out["error"]
    out = _in_child(lambda: enter(_spec(tmp_path, new_pid_ns=True)))
    assert "pid 1" in out["error"]


def test_a_fork_server_makes_each_child_pid_1_of_its_own_namespace_and_stays_in_its_own() -> None:
    def fork_three() -> dict:
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        r, w = os.pipe()
        kids = []
        for _ in range(3):
            pid = fork_into_new_pid_ns(own_pid_ns=own)
            if pid == 0:
                os.write(w, json.dumps([os.getpid(), os.readlink("/proc/self/ns/pid")]).encode() + b"\n")
                os._exit(0)
            kids.append(pid)
        os.close(w)
        statuses = [os.waitpid(pid, 0)[1] for pid in kids]
        with os.fdopen(r) as f:
            seen = [json.loads(line) for line in f]
        return {"seen": seen, "statuses": statuses, "ns": os.readlink("/proc/self/ns/pid"),
                "for_children": os.readlink("/proc/self/ns/pid_for_children")}

    out = _in_child(fork_three)
    assert "error" not in out, out
    assert out["statuses"] == [0, 0, 0]
    assert [pid for pid, _ in out["seen"]] == [1, 1, 1]
    namespaces = {ns for _, ns in out["seen"]}
    assert len(namespaces) == 3 and out["ns"] not in namespaces
    assert out["for_children"] == out["ns"]  # the caller's next child is its own namespace's again
