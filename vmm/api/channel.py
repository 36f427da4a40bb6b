"""Handing work from other threads to the VMM event loop, and waiting for the answer.

The API server runs on its own thread; the VMM's state (the pre-boot
resources, then the running `Vmm`) belongs to the main thread's event loop.
A request crosses over as a function: the API thread queues it and writes
the channel's eventfd (`call`); the loop, which watches that fd
(``Vmm.add_source(channel.fileno(), channel.serve)`` once the microVM runs,
`run_until` before), runs every queued function and hands each result back.
The API thread waits for its result, so a request is executed exactly
once, in order, on the loop thread, and never on a vCPU thread.

`post` queues a function without waiting (the periodic metrics flush).
`close` refuses new work and fails the work still queued with
`ChannelClosed`, so an API thread never waits for a loop that has ended.
"""

from __future__ import annotations

import os
import queue
import select
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog

__all__ = ["ChannelError", "ChannelClosed", "EventLoopChannel"]

log = structlog.get_logger("vmm.api.channel")

T = TypeVar("T")


class ChannelError(Exception):
    """Work could not be handed to the event loop."""

    def __init__(self, message: str | None = None) -> None:
        # The docstring is the message when none is given.
        super().__init__(message if message is not None else " ".join((type(self).__doc__ or "").split()))


class ChannelClosed(ChannelError):
    """The event loop has stopped: the VMM is shutting down."""


class _Job(Generic[T]):
    __slots__ = ("fn", "done", "result", "error", "wait")

    def __init__(self, fn: Callable[[], T], wait: bool) -> None:
        self.fn = fn
        self.wait = wait
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class EventLoopChannel:
    """A queue of functions for the event loop thread, with an eventfd to wake it."""

    def __init__(self) -> None:
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.served = 0

    def fileno(self) -> int:
        return self._efd

    # --- any thread -------------------------------------------------------------------

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run `fn` on the loop thread and return its result (or raise its exception).

        Raises `ChannelClosed` if the loop has stopped, `TimeoutError` after
        `timeout` seconds (the function may still run later).
        """
        job = self._submit(fn, wait=True)
        if not job.done.wait(timeout):
            raise TimeoutError(f"the VMM event loop did not answer within {timeout} s")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def post(self, fn: Callable[[], object]) -> None:
        """Queue `fn` for the loop thread without waiting; raises `ChannelClosed` if stopped."""
        self._submit(fn, wait=False)

    def _submit(self, fn: Callable[[], T], wait: bool) -> _Job[T]:
        job = _Job(fn, wait)
        with self._lock:
            if self._closed:
                raise ChannelClosed("the VMM is shutting down")
            self._jobs.put(job)
            os.eventfd_write(self._efd, 1)
        return job

    # --- the loop thread ----------------------------------------------------------------

    def serve(self) -> None:
        """Run every queued function (the loop's handler for `fileno()`)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            try:
                job.result = job.fn()
            except Exception as exc:  # handed back to the caller, or logged if nobody waits
                job.error = exc
                if not job.wait:
                    log.error("event loop job failed", error=repr(exc))
            self.served += 1
            job.done.set()

    def run_until(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """A minimal event loop over this channel alone, until `done()` (the pre-boot loop).

        Returns early, with `done()` still false, after `timeout` seconds
        without work (None: wait forever).
        """
        while not done():
            ready, _, _ = select.select([self._efd], [], [], timeout)
            if not ready:
                return
            self.serve()

    def close(self) -> None:
        """Refuse new work and fail what is still queued with `ChannelClosed`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._efd)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            job.error = ChannelClosed("the VMM stopped before running this request")
            job.done.set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<EventLoopChannel {state} queued={self._jobs.qsize()} served={self.served}>"
