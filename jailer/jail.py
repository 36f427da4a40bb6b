"""Building a jail (`prepare`, as root, outside), entering it (`enter`, in the jailed process) and removing it.

Primer. Firecracker's jailer builds the chroot, then becomes the VMM by
exec'ing a copy of it inside. A Python VMM cannot exec inside an empty
chroot (no interpreter, no modules there), so here the split is:

* `prepare(spec)` (root, any process): the chroot directory owned by the
  jail's uid/gid, device nodes made with the host's major/minor numbers and
  chowned, hard links of files the VM reads, empty targets for the bind
  mounts, and the cgroup with its limits.
* `enter(spec)` (root, in the process that will run the VMM, after it has
  imported everything, before it starts a thread): join the cgroup, join
  the network namespace, unshare mount/IPC/UTS namespaces, make every mount
  private, bind-mount what the spec asks for, pivot_root into the chroot
  and detach the old root, set the hostname and the rlimits, drop the
  capability bounding and ambient sets, switch to the jail's uid/gid (which
  empties the effective and permitted sets), clear the inheritable set and
  set no_new_privs. It then checks that nothing privileged is left.
* A new PID namespace only applies to children: whoever starts the jailed
  process calls `fork_into_new_pid_ns` and the child (pid 1 there) enters.
* `cleanup(spec)` removes the chroot (and the cgroup, unless pooled).

What stays open across `enter` (inherited file descriptors, e.g. stdio)
remains usable: the jail limits what can be *opened*, like Firecracker's.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import stat
import threading

from jailer import _sys
from jailer.cgroup import Cgroup, CgroupError, CgroupMounts, detect_version
from jailer.spec import RLIMITS, JailSpec

__all__ = ["JailError", "JailReport", "prepare", "enter", "cleanup", "cgroup_of", "fork_into_new_pid_ns",
           "jail_status"]


class JailError(Exception):
    """A jail could not be prepared, entered or removed."""


def cgroup_of(spec: JailSpec, mounts: CgroupMounts | None = None) -> Cgroup | None:
    """`spec`'s cgroup resolved against this host's hierarchies (version detected if the spec says 0)."""
    if spec.cgroup is None:
        return None
    try:
        mounts = mounts if mounts is not None else CgroupMounts.read()
        version = spec.cgroup.version or detect_version(mounts)
        return Cgroup(version=version, path=spec.cgroup.path, settings=spec.cgroup.settings, mounts=mounts)
    except CgroupError as exc:
        raise JailError(str(exc)) from exc


# --- prepare (outside) -----------------------------------------------------------------------


def _makedirs_root(path: str, top: str) -> None:
    """Create `path` and its missing parents up to `top` (excluded), root-owned 0755."""
    missing = []
    p = path
    while p != top and not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)


def prepare(spec: JailSpec, *, cgroup: bool = True, exist_ok: bool = False) -> None:
    """Build `spec`'s chroot and (if `cgroup`) create its cgroup with its settings; `JailError` if not.

    The chroot must not exist yet unless `exist_ok` (then what it already
    holds is kept, as Firecracker's jailer keeps a pre-populated chroot);
    its parent directories are created (root-owned). On failure nothing
    this call created is left behind.
    """
    if os.geteuid() != 0:
        raise JailError("preparing a jail needs root")
    root = spec.chroot
    existed = False
    created_parents = []
    p = os.path.dirname(root)
    while not os.path.isdir(p):
        created_parents.append(p)
        p = os.path.dirname(p)
    try:
        for d in reversed(created_parents):
            os.mkdir(d, 0o755)
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            if not exist_ok:
                raise JailError(f"the chroot {root} already exists") from None
            existed = True
        os.chown(root, spec.uid, spec.gid)
        os.chmod(root, 0o700)
        for dev in spec.devices:
            try:
                st = os.stat(dev)
            except FileNotFoundError:
                continue  # e.g. /dev/userfaultfd before Linux 6.1: the VMM falls back to the syscall
            if not stat.S_ISCHR(st.st_mode):
                raise JailError(f"{dev} is not a character device on this host")
            target = spec.host_path(dev)
            _makedirs_root(os.path.dirname(target), root)
            if existed and os.path.lexists(target):
                old = os.lstat(target)
                if not stat.S_ISCHR(old.st_mode) or old.st_rdev != st.st_rdev:
                    raise JailError(f"{target} exists and is not the device {dev}")
            else:
                os.mknod(target, stat.S_IFCHR | 0o600, st.st_rdev)
            os.chown(target, spec.uid, spec.gid)
        for ln in spec.links:
            target = spec.host_path(ln.target)
            _makedirs_root(os.path.dirname(target), root)
            try:
                if existed and os.path.lexists(target) and os.path.samefile(ln.source, target):
                    continue
                os.link(ln.source, target)
            except OSError as exc:
                hint = " (another filesystem: use a bind mount)" if exc.errno == errno.EXDEV else ""
                raise JailError(f"cannot hard-link {ln.source} at {target}: {exc}{hint}") from exc
        for b in spec.binds:
            target = spec.host_path(b.target)
            _makedirs_root(os.path.dirname(target), root)
            if existed and os.path.lexists(target):
                continue
            if os.path.isdir(b.source):
                os.mkdir(target, 0o755)
            else:
                with open(target, "x"):
                    pass
        cg = cgroup_of(spec) if cgroup else None
        if cg is not None:
            try:
                cg.create()
            except CgroupError as exc:
                raise JailError(str(exc)) from exc
    except BaseException as exc:
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        for d in created_parents:
            try:
                os.rmdir(d)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise JailError(f"cannot prepare the jail {spec.id}: {exc}") from exc
        raise


def cleanup(spec: JailSpec, *, cgroup: bool = True) -> None:
    """Remove `spec`'s chroot and (if `cgroup`) its cgroup; idempotent. The jailed process must be gone."""
    try:
        shutil.rmtree(spec.chroot)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise JailError(f"cannot remove the chroot {spec.chroot}: {exc}") from exc
    cg = cgroup_of(spec) if cgroup else None
    if cg is not None:
        try:
            cg.remove()
        except CgroupError as exc:
            raise JailError(str(exc)) from exc


# --- enter (inside) --------------------------------------------------------------------------


def fork_into_new_pid_ns(*, own_pid_ns: int | None = None) -> int:
    """unshare(CLONE_NEWPID) and fork: 0 in the child (pid 1 of the new namespace), its pid in the parent.

    The caller must be single-threaded. unshare(CLONE_NEWPID) moves only the
    caller's *later children* into the new namespace, never the caller. Without
    `own_pid_ns`, every later child of the caller would land there too: call
    this in a process that forks nothing else afterwards. With `own_pid_ns` (an
    fd of the caller's ``/proc/self/ns/pid``, opened beforehand), the parent
    joins that namespace again right after the fork, so its later children are
    its own namespace's as before and it may call this again: how a fork server
    makes each child pid 1 of a namespace of its own without an intermediate
    process. If that fails the child is killed and reaped, and `JailError` says
    the caller's children would no longer be its own (it should stop forking).
    """
    try:
        _sys.unshare(_sys.CLONE_NEWPID)
    except OSError as exc:
        raise JailError(f"cannot create a PID namespace: {exc}") from exc
    try:
        # SAFETY: the caller is single-threaded (documented), so the child holds no lock owned by a
        # thread that does not exist in it.
        pid = os.fork()
    except OSError:
        if own_pid_ns is not None:
            _restore_pid_ns(own_pid_ns, None)
        raise
    if pid != 0 and own_pid_ns is not None:
        _restore_pid_ns(own_pid_ns, pid)
    return pid


def _restore_pid_ns(own_pid_ns: int, child: int | None) -> None:
    """Make the caller's next children its own PID namespace's again (setns to that namespace)."""
    try:
        _sys.setns(own_pid_ns, _sys.CLONE_NEWPID)
    except OSError as exc:
        if child is not None:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        raise JailError(f"cannot return to the caller's PID namespace after a fork: {exc}") from exc


class JailReport(dict):  # type: ignore[type-arg]
    """What `enter` did, for the VMM's log: ``{"id", "uid", "gid", "pid", "cgroup"}``."""


def enter(spec: JailSpec, *, cgroup_mounts: CgroupMounts | None = None) -> JailReport:
    """Put the calling process into the jail `spec` (prepared by `prepare`). Irreversible.

    Must run as root, single-threaded (unsharing the mount namespace needs
    an unshared fs_struct), after every module the process will need is
    imported: afterwards only the chroot's files can be opened.
    """
    if os.geteuid() != 0:
        raise JailError("entering a jail needs root (the jail drops it)")
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise JailError("entering a jail needs a single-threaded process")
    if spec.new_pid_ns and os.getpid() != 1:
        raise JailError("the spec says new_pid_ns, but this process is not pid 1 of a new PID namespace "
                        "(fork it with fork_into_new_pid_ns)")
    if not os.path.isdir(spec.chroot):
        raise JailError(f"the chroot {spec.chroot} does not exist (prepare the jail first)")
    last_cap = _sys.last_cap()
    cg = cgroup_of(spec, cgroup_mounts)
    step = "join the cgroup"
    try:
        if cg is not None:
            cg.join(0)
        if spec.netns is not None:
            step = f"join the network namespace {spec.netns}"
            fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _sys.setns(fd, _sys.CLONE_NEWNET)
            finally:
                os.close(fd)
        step = "unshare the mount, IPC and UTS namespaces"
        _sys.unshare(_sys.CLONE_NEWNS | _sys.CLONE_NEWIPC | _sys.CLONE_NEWUTS)
        step = "make the mounts private"
        _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        step = "bind-mount the chroot on itself"
        _sys.mount(spec.chroot, spec.chroot, None, _sys.MS_BIND | _sys.MS_REC)
        for b in spec.binds:
            step = f"bind-mount {b.source}"
            target = spec.host_path(b.target)
            _sys.mount(b.source, target, None, _sys.MS_BIND)
            if b.read_only:
                _sys.mount(None, target, None, _sys.MS_BIND | _sys.MS_REMOUNT | _sys.MS_RDONLY | _sys.MS_NOSUID)
        step = "pivot_root into the chroot"
        os.chdir(spec.chroot)
        # pivot_root(".", "."): the old root is stacked on top of the new one; detaching it leaves the
        # chroot as "/" with nothing of the host's tree reachable (pivot_root(2), NOTES).
        _sys.pivot_root(".", ".")
        _sys.umount2(".", _sys.MNT_DETACH)
        os.chdir("/")
        step = "set the hostname"
        _sys.sethostname(spec.hostname)
        for name, value in spec.rlimits:
            step = f"set the resource limit {name}"
            resource.setrlimit(RLIMITS[name], (value, value))
        step = "drop the capability bounding set"
        _sys.drop_bounding_set(last_cap)
        _sys.clear_ambient()
        step = "switch to the jail's uid and gid"
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
        step = "clear the capabilities"
        _sys.clear_capabilities()
        step = "set no_new_privs"
        _sys.set_no_new_privs()
    except (OSError, CgroupError) as exc:
        raise JailError(f"cannot enter the jail {spec.id}: {step}: {exc}") from exc
    status = jail_status()
    if status["caps"] != (0, 0, 0) or not status["no_new_privs"] or os.getuid() != spec.uid:
        raise JailError(f"the jail {spec.id} was entered but privileges remain: {status}")
    return JailReport(id=spec.id, uid=spec.uid, gid=spec.gid, pid=os.getpid(),
                      cgroup=None if cg is None else cg.path)


def jail_status() -> dict[str, object]:
    """The caller's privileges: uid/gid, (effective, permitted, inheritable) caps, no_new_privs."""
    return {"uid": os.getresuid(), "gid": os.getresgid(), "caps": _sys.capabilities(),
            "no_new_privs": _sys.no_new_privs()}
