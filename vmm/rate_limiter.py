"""Token-bucket rate limiting for virtio devices (Firecracker's `rate_limiter`).

Primer. A `TokenBucket` holds at most `size` tokens and refills continuously
at `size` tokens per `refill_time_ms`; it starts full. An optional
`one_time_burst` is extra credit spent before the budget and never refilled.
A `RateLimiter` pairs two optional buckets, one counting bytes (bandwidth)
and one counting operations; a device calls `consume(n, type)` before each
request and stops processing its queue when the answer is False. The limiter
then stays *blocked* until its one-shot timer expires and the device's event
loop calls `event_handler()`; the device retries the request then.

The semantics follow Firecracker's `src/vmm/src/rate_limiter/mod.rs` (this is
an independent implementation):

* Refill is passive. Nothing refills a bucket in the background: `reduce`
  computes the tokens earned since `last_update` when the budget is short.
  Integer division would drop the fraction of a token earned on every call
  (at high call rates, all of it), so `last_update` advances only by the time
  that paid for the whole tokens granted, rounded up, and the remainder
  carries over to the next call. Once a full `refill_time` has passed the
  bucket is simply full again.
* The one-time burst is spent first; a request served wholly from it resets
  `last_update` (time spent in the burst earns no tokens).
* A request larger than the whole bucket can never succeed by waiting, so it
  is let through once: the bucket is emptied and the excess is reported as
  `OVER_CONSUMPTION` with `ratio = excess / size`. The limiter then blocks
  for the time the bucket needs to earn the excess, ``ratio * refill_time``.
  Firecracker truncated that wait to whole milliseconds, and a wait under 1 ms
  became a zero-length timerfd, which disarms the timer and left the limiter
  blocked for ever; its fix (firecracker PR #6211) computes the wait in
  nanoseconds rounded up, and so does this module (`wait_ns` is at least 1).
  Note what Firecracker's accounting guarantees: the bucket keeps earning
  tokens during that wait, so a stream of requests each larger than the
  bucket is limited to at most twice the configured rate (a request of
  exactly 2 x size every refill period), not to the rate. Requests no larger
  than the bucket are held to the rate exactly.
* A refused request arms the timer for a fixed `REFILL_TIMER_INTERVAL_MS`
  (100 ms), not for the moment the bucket would hold enough tokens. The timer
  only tells the device to retry; tokens accrue from elapsed time whether it
  fires early or late, and the device may retry a different request (another
  queue, the other token type) than the one refused, so an exact deadline
  would buy little. A fixed period bounds the wake-ups of a throttled device
  to ten per second. The cost is latency (a retry may come up to 100 ms after
  tokens were available) and, for buckets with `refill_time` under 100 ms, a
  lower ceiling than configured while continuously throttled, since a bucket
  cannot hold more than `size` tokens across a 100 ms wait.
* While blocked, `consume` refuses every request of either type without
  touching the buckets. A snapshot saves the buckets, not the blocked state:
  a restored limiter starts unblocked, as Firecracker's does.

Time is injected (`clock() -> int`, monotonic nanoseconds) and the timer is
an object with `arm(delay_ns)` / `disarm()` / `read()` / `fileno()`:
`TimerFd` is a Linux timerfd on CLOCK_MONOTONIC for the event loop,
`ManualTimer` a pure one driven by the same clock, for tests. Neither class is
thread-safe: a limiter belongs to the thread that runs its device.
"""

from __future__ import annotations

import ctypes
import enum
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from .config import RateLimiterConfig, TokenBucketConfig

__all__ = [
    "REFILL_TIMER_INTERVAL_MS",
    "RateLimiterError",
    "InvalidTokenBucket",
    "InvalidTokenCount",
    "UnknownTokenType",
    "SpuriousRateLimiterEvent",
    "RateLimiterStateInvalid",
    "TimerFdError",
    "NoTimerFd",
    "Clock",
    "Timer",
    "TimerFd",
    "ManualTimer",
    "ReductionKind",
    "BucketReduction",
    "TokenType",
    "BucketUpdate",
    "TokenBucket",
    "TokenBucketState",
    "RateLimiter",
    "RateLimiterState",
]

# Firecracker rate_limiter/mod.rs `REFILL_TIMER_DURATION`: how long a refused
# consume() blocks the limiter before the device retries.
REFILL_TIMER_INTERVAL_MS = 100

NANOSEC_IN_ONE_MILLISEC = 1_000_000
_REFILL_TIMER_INTERVAL_NS = REFILL_TIMER_INTERVAL_MS * NANOSEC_IN_ONE_MILLISEC
U64_MAX = (1 << 64) - 1
# linux/ktime.h KTIME_MAX: the longest delay a kernel timer can express, in ns.
KTIME_MAX = (1 << 63) - 1

Clock = Callable[[], int]


# --- errors ------------------------------------------------------------------------------


class RateLimiterError(Exception):
    """The rate limiter was misused or could not be built or restored."""


class InvalidTokenBucket(RateLimiterError):
    """A token bucket needs a size and a refill time of 1..u64 (the refill time in ns too) and a burst of 0..u64."""


class InvalidTokenCount(RateLimiterError):
    """A token count must be a non-negative integer."""


class UnknownTokenType(RateLimiterError):
    """Token type must be TokenType.BYTES or TokenType.OPS ("bytes" or "ops")."""


class SpuriousRateLimiterEvent(RateLimiterError):
    """Rate limiter event handler called but its timer has not expired."""


class RateLimiterStateInvalid(RateLimiterError):
    """A saved rate limiter state is out of range or inconsistent."""


class TimerFdError(RateLimiterError):
    """A timerfd system call failed."""


class NoTimerFd(RateLimiterError):
    """This rate limiter's timer has no file descriptor (it is a ManualTimer)."""


# --- timers ------------------------------------------------------------------------------


class Timer(Protocol):
    """A one-shot timer the limiter arms when it blocks.

    `read()` returns how many times the timer expired since it was last armed
    or read (0 if it has not), and consumes that count; it never blocks.
    `arm` replaces any earlier setting and clears a pending expiration.
    """

    def arm(self, delay_ns: int) -> None: ...

    def disarm(self) -> None: ...

    def read(self) -> int: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class _Timespec(ctypes.Structure):
    """`struct timespec` (64-bit Linux: two longs)."""

    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    """`struct itimerspec` (timerfd_create(2)): interval first, then the initial expiration."""

    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


# linux/time.h
CLOCK_MONOTONIC = 1
# linux/timerfd.h: TFD_NONBLOCK and TFD_CLOEXEC are defined as O_NONBLOCK and O_CLOEXEC.
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # SAFETY: dlopen(NULL) returns the running process's own symbol table, which
        # links glibc; nothing is loaded or initialised.
        libc = ctypes.CDLL(None, use_errno=True)
        # SAFETY: prototypes as in <sys/timerfd.h>; declaring them makes ctypes convert
        # and check every argument instead of guessing int-sized values.
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_create.restype = ctypes.c_int
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int,
                                         ctypes.POINTER(_Itimerspec), ctypes.POINTER(_Itimerspec)]
        libc.timerfd_settime.restype = ctypes.c_int
        libc.timerfd_gettime.argtypes = [ctypes.c_int, ctypes.POINTER(_Itimerspec)]
        libc.timerfd_gettime.restype = ctypes.c_int
        _libc = libc
    return _libc


def _oserror(call: str) -> TimerFdError:
    err = ctypes.get_errno()
    return TimerFdError(f"{call}: {os.strerror(err)}")


class TimerFd:
    """A non-blocking, close-on-exec Linux timerfd on CLOCK_MONOTONIC.

    Poll `fileno()` for readability; `read()` then returns the expiration
    count. Python 3.11 has no `os.timerfd_create`, so the calls go through
    ctypes to glibc's wrappers of the system calls.
    """

    def __init__(self) -> None:
        self._libc = _load_libc()
        # SAFETY: plain integer arguments; the call touches no memory of ours and
        # the result is checked before use.
        fd = self._libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            raise _oserror("timerfd_create")
        self._fd = fd

    def _settime(self, delay_ns: int) -> None:
        spec = _Itimerspec()  # zeroed: no interval (one-shot); value 0 disarms
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(delay_ns, 1_000_000_000)
        # SAFETY: `spec` is a live, correctly laid out itimerspec owned by this frame for
        # the whole call; the kernel only reads it. The old-value pointer is NULL.
        if self._libc.timerfd_settime(self._check_open(), 0, ctypes.byref(spec), None) < 0:
            raise _oserror("timerfd_settime")

    def arm(self, delay_ns: int) -> None:
        """Expire once, `delay_ns` from now (clamped to 1 ns .. KTIME_MAX: 0 would disarm)."""
        self._settime(min(max(delay_ns, 1), KTIME_MAX))

    def disarm(self) -> None:
        """Stop the timer and drop any pending expiration."""
        self._settime(0)

    @property
    def armed(self) -> bool:
        """True while an expiration is scheduled (not yet fired)."""
        spec = _Itimerspec()
        # SAFETY: the kernel writes one itimerspec into `spec`, which this frame owns and
        # which has exactly that layout and size.
        if self._libc.timerfd_gettime(self._check_open(), ctypes.byref(spec)) < 0:
            raise _oserror("timerfd_gettime")
        return spec.it_value.tv_sec != 0 or spec.it_value.tv_nsec != 0

    def read(self) -> int:
        """Expirations since the last arm or read (0 if none; never blocks)."""
        try:
            data = os.read(self._check_open(), 8)
        except BlockingIOError:
            return 0
        return int.from_bytes(data, sys.byteorder)

    def fileno(self) -> int:
        return self._check_open()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _check_open(self) -> int:
        if self._fd < 0:
            raise TimerFdError("timerfd is closed")
        return self._fd

    def __del__(self) -> None:
        # Only an fd this object still owns (a failed __init__ leaves no `_fd`).
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __enter__(self) -> TimerFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TimerFd fd={self._fd}>" if self._fd >= 0 else "<TimerFd closed>"


class ManualTimer:
    """A pure one-shot timer on an injected clock: it has expired once `clock()` reaches the deadline."""

    def __init__(self, clock: Clock = time.monotonic_ns) -> None:
        self.clock = clock
        self.deadline_ns: int | None = None

    def arm(self, delay_ns: int) -> None:
        self.deadline_ns = self.clock() + max(delay_ns, 1)

    def disarm(self) -> None:
        self.deadline_ns = None

    @property
    def armed(self) -> bool:
        return self.deadline_ns is not None and self.clock() < self.deadline_ns

    @property
    def expired(self) -> bool:
        """True when `read()` would report an expiration."""
        return self.deadline_ns is not None and self.clock() >= self.deadline_ns

    def read(self) -> int:
        if not self.expired:
            return 0
        self.deadline_ns = None
        return 1

    def fileno(self) -> int:
        raise NoTimerFd("ManualTimer has no file descriptor")

    def close(self) -> None:
        self.deadline_ns = None

    def __repr__(self) -> str:
        return f"<ManualTimer deadline_ns={self.deadline_ns}>"


# --- token bucket ------------------------------------------------------------------------


class ReductionKind(enum.Enum):
    """Firecracker's `BucketReduction` variants."""

    SUCCESS = "success"
    FAILURE = "failure"
    OVER_CONSUMPTION = "over_consumption"


@dataclass(frozen=True, slots=True)
class BucketReduction:
    """Outcome of `TokenBucket.reduce`.

    For `OVER_CONSUMPTION`, `ratio` is the tokens taken beyond the budget
    divided by the bucket size, and `wait_ns` is the time the bucket needs
    to earn them, rounded up (at least 1 ns).
    """

    kind: ReductionKind
    ratio: float = 0.0
    wait_ns: int = 0

    SUCCESS: ClassVar[BucketReduction]
    FAILURE: ClassVar[BucketReduction]

    @property
    def granted(self) -> bool:
        """True when the tokens were taken (success or over-consumption)."""
        return self.kind is not ReductionKind.FAILURE


BucketReduction.SUCCESS = BucketReduction(ReductionKind.SUCCESS)
BucketReduction.FAILURE = BucketReduction(ReductionKind.FAILURE)


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def _check_bucket_params(size: int, one_time_burst: int, refill_time_ms: int) -> None:
    if not (_is_u64(size) and _is_u64(one_time_burst) and _is_u64(refill_time_ms)):
        raise InvalidTokenBucket(
            f"size={size!r} one_time_burst={one_time_burst!r} refill_time_ms={refill_time_ms!r} "
            "are not all integers in 0..u64")
    if size == 0 or refill_time_ms == 0:
        raise InvalidTokenBucket(
            f"size={size} refill_time_ms={refill_time_ms}: a zero size or refill time limits nothing "
            "(use TokenBucket.from_config, which returns None for it)")
    if refill_time_ms * NANOSEC_IN_ONE_MILLISEC > U64_MAX:
        raise InvalidTokenBucket(f"refill_time_ms={refill_time_ms} overflows u64 in nanoseconds")


def _check_tokens(tokens: int) -> None:
    if not isinstance(tokens, int) or tokens < 0:
        raise InvalidTokenCount(f"token count {tokens!r} is not a non-negative integer")


class TokenBucket:
    """`size` tokens refilled over `refill_time_ms`, plus a one-time burst spent first.

    Python integers cannot overflow, so the refill fraction
    ``elapsed_ns * size / refill_ns`` is computed directly rather than
    reduced by its gcd first as Firecracker does; the results are the same.
    """

    __slots__ = ("clock", "_size", "_initial_one_time_burst", "_refill_time_ms", "_refill_ns",
                 "_one_time_burst", "_budget", "_last_update")

    def __init__(self, size: int, one_time_burst: int = 0, *, refill_time_ms: int,
                 clock: Clock = time.monotonic_ns) -> None:
        self.clock = clock
        self._reset(size, one_time_burst, refill_time_ms)

    def _reset(self, size: int, one_time_burst: int, refill_time_ms: int) -> None:
        _check_bucket_params(size, one_time_burst, refill_time_ms)
        self._size = size
        self._initial_one_time_burst = one_time_burst
        self._refill_time_ms = refill_time_ms
        self._refill_ns = refill_time_ms * NANOSEC_IN_ONE_MILLISEC
        self._one_time_burst = one_time_burst
        self._budget = size  # starts full
        self._last_update = self.clock()

    @classmethod
    def from_config(cls, cfg: TokenBucketConfig, *,
                    clock: Clock = time.monotonic_ns) -> TokenBucket | None:
        """The bucket `cfg` describes, or None when it limits nothing.

        As Firecracker's `TokenBucket::new`: a zero size or refill time, or a
        refill time whose nanoseconds overflow u64, yields no bucket.
        """
        burst = cfg.one_time_burst or 0
        if cfg.size == 0 or cfg.refill_time == 0 or cfg.refill_time * NANOSEC_IN_ONE_MILLISEC > U64_MAX:
            return None
        return cls(cfg.size, burst, refill_time_ms=cfg.refill_time, clock=clock)

    def to_config(self) -> TokenBucketConfig:
        """The configuration this bucket was built from (the initial burst; None when 0)."""
        return TokenBucketConfig(size=self._size, refill_time=self._refill_time_ms,
                                 one_time_burst=self._initial_one_time_burst or None)

    def update(self, size: int, one_time_burst: int = 0, *, refill_time_ms: int) -> None:
        """Reconfigure in place (PATCH); the bucket becomes full with a fresh burst, like a new one."""
        self._reset(size, one_time_burst, refill_time_ms)

    # --- Firecracker's accessors ---

    @property
    def capacity(self) -> int:
        """The bucket size."""
        return self._size

    @property
    def budget(self) -> int:
        """Tokens in the bucket as of the last update (not counting the burst, not refilled by reading)."""
        return self._budget

    @property
    def one_time_burst(self) -> int:
        """Burst tokens left."""
        return self._one_time_burst

    @property
    def initial_one_time_burst(self) -> int:
        """Burst tokens the bucket was configured with."""
        return self._initial_one_time_burst

    @property
    def refill_time_ms(self) -> int:
        """Milliseconds to refill an empty bucket."""
        return self._refill_time_ms

    @property
    def last_update_ns(self) -> int:
        """Clock time up to which refill has been accounted."""
        return self._last_update

    # --- the algorithm ---

    def _auto_replenish(self) -> None:
        now = self.clock()
        elapsed = max(now - self._last_update, 0)
        if elapsed >= self._refill_ns:
            self._budget = self._size
            self._last_update = now
            return
        tokens = elapsed * self._size // self._refill_ns
        # Advance only by the time that paid for `tokens`, rounded up so no fraction of a
        # nanosecond is spent twice; the rest (less than one token's worth) carries over.
        self._last_update += -(-tokens * self._refill_ns // self._size)
        self._budget = min(self._budget + tokens, self._size)

    def reduce(self, tokens: int) -> BucketReduction:
        """Take `tokens` (burst first); see the module docstring for the three outcomes."""
        _check_tokens(tokens)
        if self._one_time_burst > 0:
            if self._one_time_burst >= tokens:
                self._one_time_burst -= tokens
                self._last_update = self.clock()
                return BucketReduction.SUCCESS
            tokens -= self._one_time_burst
            self._one_time_burst = 0

        if tokens > self._budget:
            self._auto_replenish()
            if tokens > self._size:
                excess = tokens - self._budget
                self._budget = 0
                wait_ns = -(-excess * self._refill_ns // self._size)
                return BucketReduction(ReductionKind.OVER_CONSUMPTION, excess / self._size, wait_ns)
            if tokens > self._budget:
                return BucketReduction.FAILURE

        self._budget -= tokens
        return BucketReduction.SUCCESS

    def force_replenish(self, tokens: int) -> None:
        """Give `tokens` back: to the burst while one remains (up to its initial size), else to the budget.

        As in Firecracker, tokens a `reduce` took from the budget while
        finishing the burst are returned to the burst, an inconsequential
        imprecision.
        """
        _check_tokens(tokens)
        if self._one_time_burst > 0:
            self._one_time_burst = min(self._one_time_burst + tokens, self._initial_one_time_burst)
            return
        self._budget = min(self._budget + tokens, self._size)

    # --- persistence ---

    def state(self) -> TokenBucketState:
        return TokenBucketState(
            size=self._size, one_time_burst=self._one_time_burst,
            initial_one_time_burst=self._initial_one_time_burst,
            refill_time_ms=self._refill_time_ms, budget=self._budget,
            elapsed_ns=min(max(self.clock() - self._last_update, 0), U64_MAX),
        )

    @classmethod
    def from_state(cls, state: TokenBucketState, *, clock: Clock = time.monotonic_ns) -> TokenBucket:
        """Rebuild a bucket from untrusted saved state (`RateLimiterStateInvalid` if impossible)."""
        if not isinstance(state, TokenBucketState):
            raise RateLimiterStateInvalid(f"expected TokenBucketState, got {type(state).__name__}")
        try:
            bucket = cls(state.size, state.initial_one_time_burst,
                         refill_time_ms=state.refill_time_ms, clock=clock)
        except InvalidTokenBucket as exc:
            raise RateLimiterStateInvalid(f"token bucket: {exc}") from exc
        for name in ("one_time_burst", "budget", "elapsed_ns"):
            if not _is_u64(getattr(state, name)):
                raise RateLimiterStateInvalid(f"token bucket {name}={getattr(state, name)!r} is not a u64")
        if state.budget > state.size:
            raise RateLimiterStateInvalid(f"token bucket budget {state.budget} exceeds its size {state.size}")
        if state.one_time_burst > state.initial_one_time_burst:
            raise RateLimiterStateInvalid(
                f"token bucket burst {state.one_time_burst} exceeds its initial {state.initial_one_time_burst}")
        bucket._one_time_burst = state.one_time_burst
        bucket._budget = state.budget
        bucket._last_update = bucket._last_update - state.elapsed_ns
        return bucket

    def __repr__(self) -> str:
        return (f"<TokenBucket size={self._size} budget={self._budget} "
                f"burst={self._one_time_burst}/{self._initial_one_time_burst} "
                f"refill_time_ms={self._refill_time_ms}>")


@dataclass(frozen=True)
class TokenBucketState:
    """A bucket's parameters and budget; `elapsed_ns` is the time since its last update when saved.

    Unlike Firecracker's, it keeps the initial burst as well as what is left
    of it, so a restored bucket reports and caps its burst as before.
    """

    size: int
    one_time_burst: int
    initial_one_time_burst: int
    refill_time_ms: int
    budget: int
    elapsed_ns: int


# --- rate limiter ------------------------------------------------------------------------


class TokenType(str, enum.Enum):
    """Which bucket a `consume` draws from."""

    BYTES = "bytes"
    OPS = "ops"


BucketUpdate = TokenBucketConfig | TokenBucket | None


@dataclass(frozen=True)
class RateLimiterState:
    """Both buckets' states (None: no bucket of that type). The blocked state is not saved."""

    bandwidth: TokenBucketState | None = None
    ops: TokenBucketState | None = None


class RateLimiter:
    """Bandwidth and ops limiting for one device queue; see the module docstring.

    `timer` defaults to a new `TimerFd`, created up front as Firecracker does
    (a later `update_buckets` may enable limiting after a seccomp filter
    forbids creating fds). Pass a `ManualTimer` for a pure limiter.
    """

    __slots__ = ("clock", "_bandwidth", "_ops", "_timer", "_blocked")

    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None, *,
                 clock: Clock = time.monotonic_ns, timer: Timer | None = None) -> None:
        self.clock = clock
        self._bandwidth = bandwidth
        self._ops = ops
        self._timer: Timer = TimerFd() if timer is None else timer
        self._blocked = False

    @classmethod
    def from_config(cls, cfg: RateLimiterConfig | None, *, clock: Clock = time.monotonic_ns,
                    timer: Timer | None = None) -> RateLimiter:
        """The limiter `cfg` describes; absent or disabled buckets limit nothing."""
        def build(b: TokenBucketConfig | None) -> TokenBucket | None:
            return None if b is None else TokenBucket.from_config(b, clock=clock)
        if cfg is None:
            return cls(clock=clock, timer=timer)
        return cls(build(cfg.bandwidth), build(cfg.ops), clock=clock, timer=timer)

    def to_config(self) -> RateLimiterConfig:
        """The configuration of the current buckets (as GET /vm/config reports it)."""
        return RateLimiterConfig(
            bandwidth=None if self._bandwidth is None else self._bandwidth.to_config(),
            ops=None if self._ops is None else self._ops.to_config(),
        )

    @property
    def bandwidth(self) -> TokenBucket | None:
        return self._bandwidth

    @property
    def ops(self) -> TokenBucket | None:
        return self._ops

    @property
    def fd(self) -> int:
        """The timer's fd: poll it for input and call `event_handler()` when it is readable."""
        return self._timer.fileno()

    @property
    def is_blocked(self) -> bool:
        """True from a refused (or over-consuming) `consume` until `event_handler` sees the timer expire."""
        return self._blocked

    def _bucket(self, token_type: TokenType | str) -> TokenBucket | None:
        if token_type is TokenType.BYTES:
            return self._bandwidth
        if token_type is TokenType.OPS:
            return self._ops
        try:
            kind = TokenType(token_type)
        except ValueError:
            raise UnknownTokenType(f"unknown token type {token_type!r}") from None
        return self._bandwidth if kind is TokenType.BYTES else self._ops

    def _block(self, delay_ns: int) -> None:
        self._timer.arm(delay_ns)
        self._blocked = True

    def consume(self, tokens: int, token_type: TokenType | str) -> bool:
        """Take `tokens` of `token_type`; False (and blocked) if the device must wait.

        A request larger than the bucket is granted and blocks the limiter
        for as long as the bucket needs to earn the excess.
        """
        bucket = self._bucket(token_type)
        if self._blocked:
            return False
        if bucket is None:
            _check_tokens(tokens)
            return True
        result = bucket.reduce(tokens)
        if result.kind is ReductionKind.SUCCESS:
            return True
        if result.kind is ReductionKind.FAILURE:
            self._block(_REFILL_TIMER_INTERVAL_NS)
            return False
        self._block(result.wait_ns)
        return True

    def manual_replenish(self, tokens: int, token_type: TokenType | str) -> None:
        """Give back `tokens` (e.g. to undo a `consume` whose request could not proceed)."""
        bucket = self._bucket(token_type)
        if bucket is None:
            _check_tokens(tokens)
        else:
            bucket.force_replenish(tokens)

    def event_handler(self) -> None:
        """Handle the timer fd becoming readable: unblock, or `SpuriousRateLimiterEvent` if it has not expired."""
        if self._timer.read() == 0:
            raise SpuriousRateLimiterEvent("the rate limiter's timer has not expired")
        self._blocked = False

    def _apply(self, update: BucketUpdate, current: TokenBucket | None) -> TokenBucket | None:
        if update is None:
            return current
        if isinstance(update, TokenBucket):
            return update
        if isinstance(update, TokenBucketConfig):
            return TokenBucket.from_config(update, clock=self.clock)
        raise TypeError(f"bucket update must be a TokenBucketConfig, TokenBucket or None, "
                        f"not {type(update).__name__}")

    def update_buckets(self, bandwidth: BucketUpdate = None, ops: BucketUpdate = None) -> None:
        """Replace buckets (PATCH): None keeps one, a config builds a new full one or,
        if it limits nothing (size or refill time 0), removes it. The blocked state is kept.
        """
        new_bandwidth = self._apply(bandwidth, self._bandwidth)
        new_ops = self._apply(ops, self._ops)
        self._bandwidth, self._ops = new_bandwidth, new_ops

    def update_from_config(self, cfg: RateLimiterConfig | None) -> None:
        """`update_buckets` from a PATCH body's rate limiter (None: no change)."""
        if cfg is not None:
            self.update_buckets(cfg.bandwidth, cfg.ops)

    def state(self) -> RateLimiterState:
        return RateLimiterState(
            bandwidth=None if self._bandwidth is None else self._bandwidth.state(),
            ops=None if self._ops is None else self._ops.state(),
        )

    @classmethod
    def from_state(cls, state: RateLimiterState, *, clock: Clock = time.monotonic_ns,
                   timer: Timer | None = None) -> RateLimiter:
        """Rebuild a limiter (unblocked) from untrusted saved state."""
        if not isinstance(state, RateLimiterState):
            raise RateLimiterStateInvalid(f"expected RateLimiterState, got {type(state).__name__}")
        bandwidth = None if state.bandwidth is None else TokenBucket.from_state(state.bandwidth, clock=clock)
        ops = None if state.ops is None else TokenBucket.from_state(state.ops, clock=clock)
        return cls(bandwidth, ops, clock=clock, timer=timer)

    def close(self) -> None:
        """Close the timer (its fd)."""
        self._timer.close()

    def __repr__(self) -> str:
        def show(b: TokenBucket | None) -> str:
            if b is None:
                return "off"
            return f"{b.budget}/{b.capacity}+{b.one_time_burst}@{b.refill_time_ms}ms"
        return (f"<RateLimiter bandwidth={show(self._bandwidth)} ops={show(self._ops)} "
                f"blocked={'yes' if self._blocked else 'no'}>")
