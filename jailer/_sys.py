"""The Linux system calls the jail needs that Python 3.11's `os` does not offer, through ctypes.

Every function raises `OSError` (with errno and a message naming the call)
on failure. Constants carry their header's name and value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = [
    "CLONE_NEWNS", "CLONE_NEWUTS", "CLONE_NEWIPC", "CLONE_NEWPID", "CLONE_NEWNET",
    "MS_RDONLY", "MS_NOSUID", "MS_NOEXEC", "MS_REMOUNT", "MS_BIND", "MS_REC", "MS_PRIVATE", "MNT_DETACH",
    "unshare", "setns", "mount", "umount2", "pivot_root", "sethostname",
    "drop_bounding_set", "clear_ambient", "set_no_new_privs", "no_new_privs", "clear_capabilities",
    "capabilities", "set_child_subreaper", "last_cap",
]

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
# <linux/prctl.h>
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# <linux/capability.h>
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# <asm/unistd_64.h> (x86-64): glibc has no pivot_root wrapper.
_NR_PIVOT_ROOT = 155

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.sethostname.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    """struct __user_cap_header_struct."""

    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    """struct __user_cap_data_struct (version 3 uses two of them: capabilities 0-31 and 32-63)."""

    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capget.restype = ctypes.c_int
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.restype = ctypes.c_int


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def unshare(flags: int) -> None:
    """unshare(2)."""
    # SAFETY: unshare takes its flags by value; no memory is passed.
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    """setns(2): join the namespace `fd` refers to."""
    # SAFETY: setns takes an fd and a flag by value; the caller keeps `fd` open for the call.
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); `data`: the filesystem's options as text (e.g. tmpfs ``size=64m,mode=0700``), or none."""
    src = os.fsencode(source) if source is not None else None
    fst = os.fsencode(fstype) if fstype is not None else None
    opts = os.fsencode(data) if data is not None else None
    # SAFETY: the four strings are NUL-terminated bytes objects that live (locals) for the whole call;
    # data is NULL (bind, propagation change, remount accept that) or a text option string, which is
    # what every filesystem that takes options (tmpfs here) reads from it.
    _check(_libc.mount(src, os.fsencode(target), fst, flags, opts), f"mount({source!r}, {target!r}, {flags:#x})")


def umount2(target: str, flags: int) -> None:
    """umount2(2)."""
    # SAFETY: `target` is a NUL-terminated bytes object alive for the call; flags by value.
    _check(_libc.umount2(os.fsencode(target), flags), f"umount2({target!r})")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (a raw syscall: glibc has no wrapper)."""
    new, old = os.fsencode(new_root), os.fsencode(put_old)
    # SAFETY: both arguments are NUL-terminated bytes objects (locals) alive for the whole call; the
    # syscall number is x86-64's pivot_root, which takes exactly these two pointers.
    _check(_libc.syscall(ctypes.c_long(_NR_PIVOT_ROOT), ctypes.c_char_p(new), ctypes.c_char_p(old)),
           f"pivot_root({new_root!r}, {put_old!r})")


def sethostname(name: str) -> None:
    """sethostname(2) (in the caller's UTS namespace)."""
    data = name.encode()
    # SAFETY: sethostname reads exactly len(data) bytes from the bytes object, alive for the call.
    _check(_libc.sethostname(data, len(data)), "sethostname")


def _prctl(option: int, arg2: int = 0, what: str = "prctl") -> int:
    # SAFETY: every option used here (CAPBSET_READ/DROP, NO_NEW_PRIVS, CHILD_SUBREAPER, CAP_AMBIENT)
    # takes integers by value and no pointer; unused arguments must be 0.
    return _check(_libc.prctl(option, arg2, 0, 0, 0), what)


def last_cap() -> int:
    """The highest capability number this kernel knows (/proc/sys/kernel/cap_last_cap, else probed)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        cap = 0
        # SAFETY: PR_CAPBSET_READ takes the capability number by value; it fails (EINVAL) past the last.
        while _libc.prctl(PR_CAPBSET_READ, cap + 1, 0, 0, 0) >= 0:
            cap += 1
        return cap


def drop_bounding_set(last: int) -> None:
    """Remove capabilities 0..`last` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"prctl(PR_CAPBSET_DROP, {cap})")


def clear_ambient() -> None:
    """Empty the ambient capability set."""
    # SAFETY: see _prctl; PR_CAP_AMBIENT_CLEAR_ALL passes its sub-command by value.
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve can never grant privileges again (irreversible)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def no_new_privs() -> bool:
    """The calling thread's no_new_privs bit."""
    return _prctl(PR_GET_NO_NEW_PRIVS, 0, "prctl(PR_GET_NO_NEW_PRIVS)") == 1


def set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to the caller instead of init."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, "prctl(PR_SET_CHILD_SUBREAPER)")


def capabilities() -> tuple[int, int, int]:
    """The caller's (effective, permitted, inheritable) capability sets as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    # SAFETY: version 3 capget writes exactly two __user_cap_data_struct; `data` is an array of two,
    # alive (a local) for the call; `header` is a properly initialised struct (pid 0: the caller).
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    return tuple(data[0].__getattribute__(f) | (data[1].__getattribute__(f) << 32)  # type: ignore[return-value]
                 for f in ("effective", "permitted", "inheritable"))


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets of the caller."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    # SAFETY: version 3 capset reads exactly two zero-filled __user_cap_data_struct from `data`, alive
    # (a local) for the call; lowering capabilities is always allowed.
    _check(_libc.capset(ctypes.byref(header), data), "capset")
