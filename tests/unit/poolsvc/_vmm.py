"""A stand-in for a restoring VMM (no KVM): anonymous memory registered with a
userfaultfd, handed to a page server over its socket, read from another thread."""

from __future__ import annotations

import ctypes
import json
import queue
import socket
import threading
import time
from pathlib import Path

from snapshot import UffdMapping, Userfaultfd, send_handshake, write_state
from snapshot import uffd_server as us

PAGE = 4096
CHUNK = 64 << 10
SIZE = 2 << 20
ZERO_PAGES = range(256, 320)  # four whole 64 KiB chunks of zeros

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MADV_DONTNEED = 4


def page_bytes(index: int) -> bytes:
    """Page `index` of the test memory file: a recognisable pattern, or zeros."""
    if index in ZERO_PAGES or index % 8 == 7:
        return bytes(PAGE)
    return (index.to_bytes(8, "little") + b"EMBERPG!") * (PAGE // 16)


def write_snapshot(directory: Path, name: str = "vm") -> tuple[Path, Path]:
    """A state file and a SIZE-byte memory file of `page_bytes`."""
    state = directory / f"{name}.state"
    mem = directory / f"{name}.mem"
    write_state(state, {"name": name})
    mem.write_bytes(b"".join(page_bytes(i) for i in range(SIZE // PAGE)))
    return state, mem


class FakeVmm:
    """Guest memory of `size` bytes, registered with a uffd and sent to the page server at `path`."""

    def __init__(self, path: str | Path, size: int = SIZE, *, handshake_size: int | None = None) -> None:
        self.size = size
        # SAFETY (test): a fresh private anonymous mapping of `size` bytes, unmapped in close().
        self.addr = _libc.mmap(None, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        assert self.addr not in (None, ctypes.c_void_p(-1).value)
        self.uffd = Userfaultfd.create(features=us.UFFD_FEATURE_EVENT_REMOVE)
        self.uffd.register(self.addr, size)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        mapping = UffdMapping(self.addr, handshake_size or size, 0, PAGE)
        send_handshake(self.sock, [mapping], self.uffd.fd)

    def read(self, offset: int, length: int) -> bytes:
        """Read guest memory from another thread with the GIL released: a fault
        blocks that thread until the server answers."""
        buf = ctypes.create_string_buffer(length)
        # SAFETY (test): [addr+offset, +length) lies inside our live mapping; memmove
        # goes through ctypes' FFI, which releases the GIL during the copy.
        worker = threading.Thread(target=ctypes.memmove, args=(buf, self.addr + offset, length), daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "fault was never served"
        return buf.raw

    def discard(self, offset: int, length: int) -> None:
        """MADV_DONTNEED (a balloon giving pages back): blocks until the server reads the remove event."""
        # SAFETY (test): the range lies inside our live mapping.
        worker = threading.Thread(target=_libc.madvise, args=(self.addr + offset, length, MADV_DONTNEED),
                                  daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "remove event was never read"

    def disconnect(self) -> None:
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
        self.uffd.close()
        # SAFETY (test): our mapping, once; nothing reads it after this.
        _libc.munmap(self.addr, self.size)


class EventLog:
    """A text stream collecting the page server's JSON event lines."""

    def __init__(self) -> None:
        self.lines: queue.Queue[dict] = queue.Queue()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines.put(json.loads(line))
        return len(text)

    def flush(self) -> None:
        pass

    def next(self, event: str, timeout: float = 10) -> dict:
        """The next event line, which must be `event`."""
        deadline = time.monotonic() + timeout
        item = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        assert item["event"] == event, item
        return item

    def empty(self) -> bool:
        return self.lines.empty()
