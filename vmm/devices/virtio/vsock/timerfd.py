"""A one-shot Linux timerfd (timerfd_create(2)), so connection deadlines can wake an fd-driven event loop.

Python 3.11 has no `os.timerfd_*` (3.13 does), so the two syscalls go
through libc with ctypes. The fd becomes readable when the timer expires;
`drain()` clears it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["TimerFdError", "TimerFd"]

# linux/time.h, sys/timerfd.h (TFD_* equal O_NONBLOCK / O_CLOEXEC on x86_64).
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC

_NS_PER_S = 1_000_000_000


class TimerFdError(Exception):
    """A timerfd could not be created or armed."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_create.restype = ctypes.c_int
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                  ctypes.POINTER(_Itimerspec)]
_libc.timerfd_settime.restype = ctypes.c_int


class TimerFd:
    """A CLOCK_MONOTONIC timer fd, non-blocking and close-on-exec."""

    def __init__(self) -> None:
        # SAFETY: plain integer arguments; the kernel returns a new fd or -1 with errno.
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise TimerFdError(f"timerfd_create failed: {os.strerror(err)}")
        self.fd = fd
        self.armed = False

    def fileno(self) -> int:
        return self.fd

    def _settime(self, seconds: int, nanoseconds: int) -> None:
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, nanoseconds))
        # SAFETY: `spec` is a live ctypes struct laid out as struct itimerspec (two pairs of
        # longs on x86_64); the kernel only reads it during the call. No old value is requested.
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise TimerFdError(f"timerfd_settime failed: {os.strerror(err)}")

    def arm(self, delay: float) -> None:
        """Expire once, `delay` seconds from now (at least 1 ns: a zero value would disarm)."""
        ns = max(1, int(delay * _NS_PER_S))
        self._settime(ns // _NS_PER_S, ns % _NS_PER_S)
        self.armed = True

    def disarm(self) -> None:
        self._settime(0, 0)
        self.armed = False

    def drain(self) -> int:
        """Consume the expiration count (0 if the timer has not fired)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<TimerFd fd={self.fd} {'armed' if self.armed else 'idle'}>"
