"""tap.py without a real TAP: ioctl numbers, name checks, the fd wrapper over a socketpair."""

from __future__ import annotations

import socket

import pytest

from vmm.devices.virtio.net.tap import (
    TUNGETIFF,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
    TUNSETVNETLE,
    InvalidTapName,
    Tap,
    TapError,
    TapNotFound,
    _attach_error,
)


def test_ioctl_numbers_match_linux_if_tun_h():
    # _IOW('T', 202, int) etc., as the kernel headers expand them on x86_64.
    assert TUNSETIFF == 0x400454CA
    assert TUNSETOFFLOAD == 0x400454D0
    assert TUNGETIFF == 0x800454D2
    assert TUNSETVNETHDRSZ == 0x400454D8
    assert TUNSETVNETLE == 0x400454DC


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a:b", "a b", "..", "tap\0", "tâp"])
def test_bad_names_are_refused_before_any_syscall(name):
    with pytest.raises(InvalidTapName, match="cannot open TAP"):
        Tap.open(name)


def test_missing_interface_is_reported_not_created():
    with pytest.raises(TapNotFound, match="cannot open TAP embr-nosuch0: no such network interface"):
        Tap.open("embr-nosuch0")
    with pytest.raises(OSError):
        socket.if_nametoindex("embr-nosuch0")


@pytest.mark.parametrize("code,kind,text", [
    (16, "TapBusy", "another file descriptor"),
    (1, "TapPermissionDenied", "CAP_NET_ADMIN"),
    (22, "NotATap", "not a TAP"),
    (5, "TapError", "TUNSETIFF"),
])
def test_attach_errors_say_what_went_wrong(code, kind, text):
    err = _attach_error("tap0", OSError(code, "boom"))
    assert type(err).__name__ == kind and isinstance(err, TapError)
    assert str(err).startswith("cannot open TAP tap0:") and text in str(err)


def test_frames_move_through_the_fd_whole():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    tap = Tap(a.detach(), "tap0", 12)
    try:
        assert tap.write_frame([b"H" * 12, memoryview(b"frame")]) == 17
        assert b.recv(100) == b"H" * 12 + b"frame"
        b.send(b"one")
        b.send(b"two!")
        buf = bytearray(100)
        assert tap.read_frame(buf) == 3 and buf[:3] == b"one"
        assert tap.read_frame(buf) == 4 and buf[:4] == b"two!"
        with pytest.raises(BlockingIOError):
            tap.read_frame(buf)
        assert "tap0" in repr(tap)
    finally:
        tap.close()
        b.close()
    assert tap.closed and "closed" in repr(tap)
    with pytest.raises(TapError):
        tap.fileno()
