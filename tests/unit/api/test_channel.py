"""`EventLoopChannel`: work from other threads runs on the loop thread, in order, exactly once."""

from __future__ import annotations

import select
import threading

import pytest

from vmm.api import ChannelClosed, EventLoopChannel


@pytest.fixture
def channel():
    ch = EventLoopChannel()
    yield ch
    ch.close()


def _loop(channel: EventLoopChannel, stop: threading.Event, seen: list) -> threading.Thread:
    def run() -> None:
        seen.append(threading.current_thread().name)
        while not stop.is_set():
            if select.select([channel.fileno()], [], [], 0.05)[0]:
                channel.serve()
    t = threading.Thread(target=run, name="loop", daemon=True)
    t.start()
    return t


def test_call_runs_on_the_loop_thread_and_returns_the_result(channel: EventLoopChannel) -> None:
    stop, seen = threading.Event(), []
    t = _loop(channel, stop, seen)
    try:
        assert channel.call(lambda: threading.current_thread().name, timeout=5) == "loop"
        assert channel.call(lambda: 6 * 7, timeout=5) == 42
    finally:
        stop.set()
        t.join()
    assert channel.served == 2


def test_exceptions_are_raised_in_the_caller(channel: EventLoopChannel) -> None:
    stop = threading.Event()
    t = _loop(channel, stop, [])
    try:
        with pytest.raises(ZeroDivisionError):
            channel.call(lambda: 1 / 0, timeout=5)
        assert channel.call(lambda: "still serving", timeout=5) == "still serving"
    finally:
        stop.set()
        t.join()


def test_jobs_run_in_order_from_many_threads(channel: EventLoopChannel) -> None:
    stop, order = threading.Event(), []
    t = _loop(channel, stop, [])
    try:
        callers = [threading.Thread(target=lambda i=i: channel.call(lambda: order.append(i), timeout=5))
                   for i in range(20)]
        for c in callers:
            c.start()
        for c in callers:
            c.join()
    finally:
        stop.set()
        t.join()
    assert sorted(order) == list(range(20))


def test_post_does_not_wait_and_serve_drains_everything(channel: EventLoopChannel) -> None:
    done = []
    for i in range(3):
        channel.post(lambda i=i: done.append(i))
    assert done == []
    channel.serve()
    assert done == [0, 1, 2]
    channel.serve()  # nothing queued, no wakeup pending: returns at once


def test_run_until_is_the_pre_boot_loop(channel: EventLoopChannel) -> None:
    state = {"started": False}
    caller = threading.Thread(target=lambda: channel.call(lambda: state.update(started=True), timeout=5))
    caller.start()
    channel.run_until(lambda: state["started"], timeout=5)
    caller.join()
    assert state["started"]


def test_run_until_gives_up_after_its_timeout(channel: EventLoopChannel) -> None:
    channel.run_until(lambda: False, timeout=0.01)


def test_call_times_out_when_nobody_serves(channel: EventLoopChannel) -> None:
    with pytest.raises(TimeoutError):
        channel.call(lambda: None, timeout=0.01)


def test_close_fails_waiting_callers_and_refuses_new_work() -> None:
    channel = EventLoopChannel()
    errors = []

    def caller() -> None:
        try:
            channel.call(lambda: None, timeout=5)
        except ChannelClosed as exc:
            errors.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    while channel._jobs.qsize() == 0:  # wait until the call is queued
        threading.Event().wait(0.001)
    channel.close()
    t.join(5)
    assert len(errors) == 1 and "stopped" in str(errors[0])
    with pytest.raises(ChannelClosed):
        channel.post(lambda: None)
    channel.close()  # idempotent
    assert repr(channel).startswith("<EventLoopChannel closed")
