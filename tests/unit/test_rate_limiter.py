"""Token bucket and rate limiter: Firecracker's semantics on a simulated clock, plus a real timerfd."""

from __future__ import annotations

import select
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.config import RateLimiterConfig, TokenBucketConfig
from vmm.rate_limiter import (
    REFILL_TIMER_INTERVAL_MS,
    BucketReduction,
    InvalidTokenBucket,
    InvalidTokenCount,
    ManualTimer,
    NoTimerFd,
    RateLimiter,
    RateLimiterError,
    RateLimiterState,
    RateLimiterStateInvalid,
    ReductionKind,
    SpuriousRateLimiterEvent,
    TimerFd,
    TimerFdError,
    TokenBucket,
    TokenBucketState,
    TokenType,
    UnknownTokenType,
)

MS = 1_000_000
SEC = 1_000 * MS


class FakeClock:
    """Monotonic nanoseconds that move only when told to."""

    def __init__(self, start: int = 10 * SEC) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        self.now += ns


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def bucket(clock: FakeClock, size: int = 1000, burst: int = 0, refill_ms: int = 1000) -> TokenBucket:
    return TokenBucket(size, burst, refill_time_ms=refill_ms, clock=clock)


def limiter(clock: FakeClock, bandwidth: TokenBucket | None = None,
            ops: TokenBucket | None = None) -> tuple[RateLimiter, ManualTimer]:
    timer = ManualTimer(clock)
    return RateLimiter(bandwidth, ops, clock=clock, timer=timer), timer


# --- token bucket --------------------------------------------------------------------------------


def test_new_bucket_is_full(clock: FakeClock) -> None:
    b = bucket(clock, size=1000, burst=300, refill_ms=250)
    assert (b.capacity, b.budget, b.one_time_burst, b.initial_one_time_burst, b.refill_time_ms) == \
        (1000, 1000, 300, 300, 250)
    assert b.last_update_ns == clock.now


@pytest.mark.parametrize("size,burst,refill_ms", [
    (0, 0, 100),                 # zero size limits nothing
    (100, 0, 0),                 # zero refill time limits nothing
    (-1, 0, 100),
    (100, -5, 100),
    (1 << 64, 0, 100),           # beyond u64
    (True, 0, 100),              # a bool is not a count
    (100, 0, (1 << 64) // MS + 1),  # refill time in ns overflows u64
])
def test_invalid_bucket_parameters(clock: FakeClock, size: int, burst: int, refill_ms: int) -> None:
    with pytest.raises(InvalidTokenBucket):
        TokenBucket(size, burst, refill_time_ms=refill_ms, clock=clock)


def test_refill_math_at_several_times(clock: FakeClock) -> None:
    # 1000 tokens per second: one token per millisecond.
    b = bucket(clock, size=1000, refill_ms=1000)
    assert b.reduce(1000) is BucketReduction.SUCCESS
    assert b.budget == 0
    clock.advance(MS // 2)                    # half a token earned: not enough
    assert b.reduce(1) is BucketReduction.FAILURE
    clock.advance(MS)                         # 1.5 tokens earned in total
    assert b.reduce(1) is BucketReduction.SUCCESS
    # Only the time that paid for the one whole token was spent; the half carries over.
    assert b.last_update_ns == clock.now - MS // 2
    clock.advance(MS // 2)                    # the carried half plus a new half: one token
    assert b.reduce(1) is BucketReduction.SUCCESS
    clock.advance(250 * MS)
    assert b.reduce(251) is BucketReduction.FAILURE   # 250 earned, budget 250 now
    assert b.budget == 250
    assert b.reduce(250) is BucketReduction.SUCCESS
    clock.advance(5 * SEC)                    # far beyond a refill period: full, not more
    assert b.reduce(1001).kind is ReductionKind.OVER_CONSUMPTION
    clock.advance(SEC)
    assert b.reduce(1000) is BucketReduction.SUCCESS
    assert b.budget == 0


def test_refill_uses_rational_rate_without_drift(clock: FakeClock) -> None:
    # 3 tokens per 1 ms refill period: a token every 333_333.33 ns. Polling often must not lose tokens.
    b = bucket(clock, size=3, refill_ms=1)
    assert b.reduce(3) is BucketReduction.SUCCESS
    granted = 0
    for _ in range(300):
        clock.advance(100_000)                # 30 ms in 0.1 ms steps
        while b.reduce(1) is BucketReduction.SUCCESS:
            granted += 1
    # 90 tokens were earned; each grant rounds the spent time up by < 1 ns, costing at most one token.
    assert 89 <= granted <= 90


def test_refill_never_runs_ahead_of_the_clock(clock: FakeClock) -> None:
    # 2,000,000 tokens per 3 ms: a token every 1.5 ns, polled every 2 ns. The time spent on
    # each grant is rounded up, so polling can lose a fraction of a token but never gain one.
    b = bucket(clock, size=2_000_000, refill_ms=3)
    assert b.reduce(2_000_000) is BucketReduction.SUCCESS
    granted = 0
    for _ in range(1000):
        clock.advance(2)
        while b.reduce(1) is BucketReduction.SUCCESS:
            granted += 1
    assert granted == 1000    # one token per poll (its 1.5 ns rounded up to 2); 1333 were due


@given(st.integers(1, 10**7), st.integers(1, 5),
       st.lists(st.tuples(st.integers(0, 5_000), st.integers(1, 50)), max_size=300))
def test_refill_earns_no_more_than_elapsed_time_pays_for(size: int, refill_ms: int,
                                                         plan: list[tuple[int, int]]) -> None:
    clock = FakeClock()
    start = clock.now
    b = TokenBucket(size, refill_time_ms=refill_ms, clock=clock)
    assert b.reduce(size) is BucketReduction.SUCCESS
    granted = 0
    for dt, n in plan:
        clock.advance(dt)
        if n <= size and b.reduce(n) is BucketReduction.SUCCESS:
            granted += n
        assert granted <= size * (clock.now - start) // (refill_ms * MS)


def test_budget_capped_at_size_after_partial_refill(clock: FakeClock) -> None:
    b = bucket(clock, size=1000, refill_ms=1000)
    assert b.reduce(10) is BucketReduction.SUCCESS
    clock.advance(500 * MS)
    assert b.reduce(995) is BucketReduction.SUCCESS   # 990 + 500 earned, capped at 1000
    assert b.budget == 5


def test_one_time_burst_is_consumed_first(clock: FakeClock) -> None:
    b = bucket(clock, size=1000, burst=100, refill_ms=1000)
    assert b.reduce(60) is BucketReduction.SUCCESS
    assert (b.one_time_burst, b.budget) == (40, 1000)
    assert b.reduce(90) is BucketReduction.SUCCESS     # 40 from the burst, 50 from the budget
    assert (b.one_time_burst, b.budget) == (0, 950)
    assert b.reduce(951) is BucketReduction.FAILURE    # the burst never comes back
    assert b.one_time_burst == 0


def test_time_in_the_burst_earns_no_tokens(clock: FakeClock) -> None:
    b = bucket(clock, size=1000, burst=100, refill_ms=1000)
    created = clock.now
    clock.advance(400 * MS)
    assert b.reduce(50) is BucketReduction.SUCCESS     # wholly from the burst: resets last_update
    assert b.last_update_ns == clock.now != created
    clock.advance(400 * MS)
    assert b.reduce(60) is BucketReduction.SUCCESS     # 50 burst + 10 budget: last_update kept
    assert b.last_update_ns == clock.now - 400 * MS


def test_over_consumption_lets_one_large_request_through(clock: FakeClock) -> None:
    b = bucket(clock, size=1000, burst=200, refill_ms=1000)
    result = b.reduce(2700)           # 200 burst, 1000 budget, 1500 beyond
    assert result.kind is ReductionKind.OVER_CONSUMPTION and result.granted
    assert result.ratio == 1.5
    assert result.wait_ns == 1500 * MS
    assert (b.budget, b.one_time_burst) == (0, 0)
    assert b.reduce(1) is BucketReduction.FAILURE


def test_over_consumption_after_partial_refill(clock: FakeClock) -> None:
    b = bucket(clock, size=1000, refill_ms=1000)
    b.reduce(1000)
    clock.advance(300 * MS)
    result = b.reduce(1500)           # 300 earned: 1200 beyond
    assert result.ratio == 1.2 and result.wait_ns == 1200 * MS
    assert b.budget == 0


def test_over_consumption_wait_is_never_zero(clock: FakeClock) -> None:
    # One token beyond a 10^9-token bucket refilled every 1 ms costs 10^-3 ns: rounded up to 1 ns.
    b = bucket(clock, size=10**9, refill_ms=1)
    result = b.reduce(10**9 + 1)
    assert result.kind is ReductionKind.OVER_CONSUMPTION and result.wait_ns == 1


def test_force_replenish(clock: FakeClock) -> None:
    b = bucket(clock, size=1000, burst=100, refill_ms=1000)
    b.reduce(70)
    b.force_replenish(500)            # back into the burst, capped at its initial size
    assert (b.one_time_burst, b.budget) == (100, 1000)
    b.reduce(100 + 600)
    assert (b.one_time_burst, b.budget) == (0, 400)
    b.force_replenish(250)
    assert b.budget == 650
    b.force_replenish(10**6)
    assert b.budget == 1000
    with pytest.raises(InvalidTokenCount):
        b.force_replenish(-1)


@pytest.mark.parametrize("tokens", [-1, 1.5, "3"])
def test_reduce_rejects_bad_counts(clock: FakeClock, tokens: object) -> None:
    with pytest.raises(InvalidTokenCount):
        bucket(clock).reduce(tokens)  # type: ignore[arg-type]


def test_reduce_zero_tokens(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(1000)
    assert b.reduce(0) is BucketReduction.SUCCESS


def test_bucket_update_reconfigures_full(clock: FakeClock) -> None:
    b = bucket(clock, size=1000, burst=10, refill_ms=1000)
    b.reduce(900)
    clock.advance(5 * MS)
    b.update(50, 7, refill_time_ms=20)
    assert (b.capacity, b.budget, b.one_time_burst, b.initial_one_time_burst, b.refill_time_ms) == \
        (50, 50, 7, 7, 20)
    assert b.last_update_ns == clock.now
    with pytest.raises(InvalidTokenBucket):
        b.update(0, refill_time_ms=20)


def test_bucket_from_and_to_config(clock: FakeClock) -> None:
    b = TokenBucket.from_config(TokenBucketConfig(size=4096, refill_time=100, one_time_burst=None), clock=clock)
    assert b is not None and (b.capacity, b.refill_time_ms, b.one_time_burst) == (4096, 100, 0)
    assert b.to_config() == TokenBucketConfig(size=4096, refill_time=100, one_time_burst=None)
    b2 = TokenBucket.from_config(TokenBucketConfig(size=1, refill_time=1, one_time_burst=5), clock=clock)
    assert b2 is not None and b2.to_config().one_time_burst == 5
    for disabled in (TokenBucketConfig(size=0, refill_time=100),
                     TokenBucketConfig(size=100, refill_time=0),
                     TokenBucketConfig(size=100, refill_time=(1 << 64) - 1)):  # ns overflow, as Firecracker
        assert TokenBucket.from_config(disabled, clock=clock) is None


def test_bucket_repr_is_one_line(clock: FakeClock) -> None:
    text = repr(bucket(clock, size=10, burst=2, refill_ms=5))
    assert text == "<TokenBucket size=10 budget=10 burst=2/2 refill_time_ms=5>"


# --- rate limiter --------------------------------------------------------------------------------


def test_refused_consume_blocks_and_arms_the_refill_timer(clock: FakeClock) -> None:
    rl, timer = limiter(clock, bandwidth=bucket(clock, size=1000, refill_ms=1000))
    assert rl.consume(600, TokenType.BYTES)
    assert not rl.is_blocked and timer.deadline_ns is None
    assert not rl.consume(600, TokenType.BYTES)
    assert rl.is_blocked
    assert timer.deadline_ns == clock.now + REFILL_TIMER_INTERVAL_MS * MS
    # While blocked, nothing is consumed, whatever the type and even with no bucket for it.
    assert not rl.consume(1, TokenType.BYTES)
    assert not rl.consume(1, TokenType.OPS)
    assert rl.bandwidth is not None and rl.bandwidth.budget == 400
    clock.advance(REFILL_TIMER_INTERVAL_MS * MS - 1)
    with pytest.raises(SpuriousRateLimiterEvent):
        rl.event_handler()
    assert rl.is_blocked
    clock.advance(1)
    rl.event_handler()
    assert not rl.is_blocked
    assert rl.consume(500, TokenType.BYTES)           # 400 + 100 earned in 100 ms
    with pytest.raises(SpuriousRateLimiterEvent):     # the timer fired once only
        rl.event_handler()


def test_over_consumption_blocks_for_the_debt(clock: FakeClock) -> None:
    rl, timer = limiter(clock, bandwidth=bucket(clock, size=1000, refill_ms=100))
    assert rl.consume(3500, TokenType.BYTES)          # granted: 2500 beyond the bucket
    assert rl.is_blocked
    assert timer.deadline_ns == clock.now + 250 * MS
    assert not rl.consume(1, "bytes")
    clock.advance(250 * MS)
    rl.event_handler()
    assert rl.consume(1000, "bytes")


def test_sub_millisecond_debt_still_unblocks(clock: FakeClock) -> None:
    rl, timer = limiter(clock, bandwidth=bucket(clock, size=10**6, refill_ms=1000))
    assert rl.consume(10**6 + 1, TokenType.BYTES)     # one byte of debt: 1 µs
    assert rl.is_blocked and timer.deadline_ns == clock.now + 1_000
    clock.advance(1_000)
    rl.event_handler()
    assert not rl.is_blocked


def test_ops_and_bytes_buckets_are_independent(clock: FakeClock) -> None:
    rl, _ = limiter(clock, bandwidth=bucket(clock, size=1000, refill_ms=1000),
                    ops=bucket(clock, size=2, refill_ms=1000))
    assert rl.consume(1, TokenType.OPS) and rl.consume(800, TokenType.BYTES)
    assert rl.consume(1, TokenType.OPS)
    assert rl.bandwidth is not None and rl.ops is not None
    assert (rl.bandwidth.budget, rl.ops.budget) == (200, 0)
    assert not rl.consume(1, TokenType.OPS)           # ops exhausted: blocks the limiter
    assert rl.bandwidth.budget == 200                 # ... without touching the bytes bucket
    clock.advance(REFILL_TIMER_INTERVAL_MS * MS)
    rl.event_handler()
    assert rl.consume(300, TokenType.BYTES)           # 200 + 100 earned
    assert rl.ops.budget == 0


def test_missing_bucket_limits_nothing(clock: FakeClock) -> None:
    rl, _ = limiter(clock, ops=bucket(clock, size=1, refill_ms=1000))
    for _ in range(100):
        assert rl.consume(1 << 40, TokenType.BYTES)
    assert not rl.is_blocked


def test_token_type_aliases(clock: FakeClock) -> None:
    rl, _ = limiter(clock, bandwidth=bucket(clock, size=10), ops=bucket(clock, size=5))
    assert rl.consume(4, "bytes") and rl.consume(3, "ops")
    assert rl.bandwidth is not None and rl.bandwidth.budget == 6
    assert rl.ops is not None and rl.ops.budget == 2
    with pytest.raises(UnknownTokenType):
        rl.consume(1, "packets")
    with pytest.raises(UnknownTokenType):
        rl.manual_replenish(1, "BYTES")
    assert issubclass(UnknownTokenType, RateLimiterError)


def test_manual_replenish(clock: FakeClock) -> None:
    rl, _ = limiter(clock, bandwidth=bucket(clock, size=1000))
    assert rl.consume(700, TokenType.BYTES)
    rl.manual_replenish(200, TokenType.BYTES)
    assert rl.bandwidth is not None and rl.bandwidth.budget == 500
    rl.manual_replenish(5, TokenType.OPS)             # no ops bucket: nothing to do
    with pytest.raises(InvalidTokenCount):
        rl.manual_replenish(-5, TokenType.OPS)


def test_from_config_and_zero_size_disables(clock: FakeClock) -> None:
    cfg = RateLimiterConfig(bandwidth=TokenBucketConfig(size=0, refill_time=100),
                            ops=TokenBucketConfig(size=10, refill_time=100, one_time_burst=3))
    rl = RateLimiter.from_config(cfg, clock=clock, timer=ManualTimer(clock))
    assert rl.bandwidth is None
    assert rl.ops is not None and (rl.ops.capacity, rl.ops.one_time_burst) == (10, 3)
    assert rl.consume(10**12, TokenType.BYTES)
    assert rl.to_config() == RateLimiterConfig(ops=TokenBucketConfig(size=10, refill_time=100, one_time_burst=3))
    empty = RateLimiter.from_config(None, clock=clock, timer=ManualTimer(clock))
    assert empty.bandwidth is None and empty.ops is None
    assert empty.to_config() == RateLimiterConfig()


def test_update_buckets(clock: FakeClock) -> None:
    rl, _ = limiter(clock, bandwidth=bucket(clock, size=1000), ops=bucket(clock, size=10))
    assert rl.consume(900, TokenType.BYTES) and rl.consume(9, TokenType.OPS)
    old_ops = rl.ops
    rl.update_buckets(TokenBucketConfig(size=5000, refill_time=10, one_time_burst=1), None)
    assert rl.ops is old_ops                          # None: unchanged
    assert rl.bandwidth is not None
    assert (rl.bandwidth.capacity, rl.bandwidth.budget, rl.bandwidth.one_time_burst) == (5000, 5000, 1)
    assert rl.bandwidth.clock is clock
    rl.update_buckets(None, TokenBucketConfig(size=0, refill_time=0))  # a zero bucket removes
    assert rl.ops is None
    replacement = bucket(clock, size=7)
    rl.update_buckets(replacement)
    assert rl.bandwidth is replacement
    rl.update_from_config(None)
    assert rl.bandwidth is replacement
    rl.update_from_config(RateLimiterConfig(ops=TokenBucketConfig(size=3, refill_time=3)))
    assert rl.bandwidth is replacement and rl.ops is not None and rl.ops.capacity == 3
    with pytest.raises(TypeError):
        rl.update_buckets(42)  # type: ignore[arg-type]


def test_update_keeps_the_blocked_state(clock: FakeClock) -> None:
    rl, _ = limiter(clock, bandwidth=bucket(clock, size=10))
    assert rl.consume(10, "bytes")
    assert not rl.consume(1, "bytes")
    assert rl.is_blocked
    rl.update_buckets(TokenBucketConfig(size=0, refill_time=0))
    assert rl.is_blocked and not rl.consume(1, "bytes")
    clock.advance(REFILL_TIMER_INTERVAL_MS * MS)
    rl.event_handler()
    assert rl.consume(10**9, "bytes")


def test_limiter_fd_needs_a_real_timer(clock: FakeClock) -> None:
    rl, _ = limiter(clock)
    with pytest.raises(NoTimerFd):
        rl.fd


def test_limiter_repr_is_one_line(clock: FakeClock) -> None:
    rl, _ = limiter(clock, bandwidth=bucket(clock, size=1000, burst=5, refill_ms=100))
    rl.consume(5 + 300, "bytes")
    assert repr(rl) == "<RateLimiter bandwidth=700/1000+0@100ms ops=off blocked=no>"


# --- persistence ---------------------------------------------------------------------------------


def test_state_round_trip(clock: FakeClock) -> None:
    rl, _ = limiter(clock, bandwidth=bucket(clock, size=1000, burst=50, refill_ms=1000),
                    ops=bucket(clock, size=10, refill_ms=100))
    rl.consume(50 + 400, TokenType.BYTES)
    rl.consume(4, TokenType.OPS)
    clock.advance(3 * MS)
    saved = rl.state()
    assert saved.bandwidth == TokenBucketState(size=1000, one_time_burst=0, initial_one_time_burst=50,
                                               refill_time_ms=1000, budget=600, elapsed_ns=3 * MS)
    other = FakeClock(start=777 * SEC)                # a different host, a different clock origin
    restored = RateLimiter.from_state(saved, clock=other, timer=ManualTimer(other))
    assert restored.state() == saved
    assert restored.bandwidth is not None and restored.bandwidth.last_update_ns == other.now - 3 * MS
    other.advance(2 * MS)                             # 5 ms since the last update: 5 tokens earned
    assert restored.consume(605, TokenType.BYTES)
    assert not restored.consume(1, TokenType.BYTES)
    assert restored.to_config() == rl.to_config()


def test_blocked_state_is_not_saved(clock: FakeClock) -> None:
    rl, _ = limiter(clock, bandwidth=bucket(clock, size=10))
    rl.consume(10, "bytes")
    rl.consume(1, "bytes")
    assert rl.is_blocked
    restored = RateLimiter.from_state(rl.state(), clock=clock, timer=ManualTimer(clock))
    assert not restored.is_blocked
    assert RateLimiter.from_state(RateLimiterState(), clock=clock, timer=ManualTimer(clock)).state() == \
        RateLimiterState()


GOOD = dict(size=100, one_time_burst=5, initial_one_time_burst=10, refill_time_ms=10, budget=50, elapsed_ns=7)


@pytest.mark.parametrize("change", [
    {"size": 0},
    {"refill_time_ms": 0},
    {"refill_time_ms": 1 << 60},
    {"budget": 101},
    {"budget": -1},
    {"one_time_burst": 11},
    {"one_time_burst": True},
    {"elapsed_ns": -1},
    {"elapsed_ns": 1 << 64},
    {"initial_one_time_burst": "10"},
    {"size": 2.5},
])
def test_invalid_states_are_refused(clock: FakeClock, change: dict[str, object]) -> None:
    TokenBucket.from_state(TokenBucketState(**GOOD), clock=clock)  # the baseline is valid
    bad = TokenBucketState(**{**GOOD, **change})  # type: ignore[arg-type]
    with pytest.raises(RateLimiterStateInvalid):
        TokenBucket.from_state(bad, clock=clock)
    with pytest.raises(RateLimiterStateInvalid):
        RateLimiter.from_state(RateLimiterState(ops=bad), clock=clock, timer=ManualTimer(clock))


def test_state_of_the_wrong_type_is_refused(clock: FakeClock) -> None:
    with pytest.raises(RateLimiterStateInvalid):
        RateLimiter.from_state(GOOD, clock=clock, timer=ManualTimer(clock))  # type: ignore[arg-type]
    with pytest.raises(RateLimiterStateInvalid):
        RateLimiter.from_state(RateLimiterState(bandwidth=GOOD),  # type: ignore[arg-type]
                               clock=clock, timer=ManualTimer(clock))


# --- the real timerfd ----------------------------------------------------------------------------


def _wait_readable(fd: int, timeout_s: float = 10.0) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout_s)
    return bool(ready)


def test_timerfd_fires() -> None:
    with TimerFd() as timer:
        assert not timer.armed and timer.read() == 0
        timer.arm(2 * MS)
        assert _wait_readable(timer.fileno())
        assert timer.read() == 1
        assert timer.read() == 0 and not timer.armed


def test_timerfd_zero_delay_still_fires_and_disarm_stops_it() -> None:
    with TimerFd() as timer:
        timer.arm(0)                                  # a literal 0 would disarm a timerfd
        assert _wait_readable(timer.fileno())
        assert timer.read() == 1
        timer.arm(60 * SEC)
        assert timer.armed
        timer.disarm()
        assert not timer.armed and timer.read() == 0
    assert timer.closed and repr(timer) == "<TimerFd closed>"
    with pytest.raises(TimerFdError):
        timer.arm(1)
    timer.close()                                     # idempotent


def test_limiter_with_timerfd_unblocks_when_the_fd_fires() -> None:
    rl = RateLimiter(TokenBucket(100, refill_time_ms=1000))
    try:
        assert rl.consume(100, TokenType.BYTES)
        assert not rl.consume(1, TokenType.BYTES)
        assert rl.is_blocked
        assert _wait_readable(rl.fd)
        rl.event_handler()
        assert not rl.is_blocked
        with pytest.raises(SpuriousRateLimiterEvent):
            rl.event_handler()
    finally:
        rl.close()


# --- properties ----------------------------------------------------------------------------------

bucket_params = st.tuples(
    st.integers(1, 10_000),        # size
    st.integers(0, 5_000),         # one_time_burst
    st.integers(1, 2_000),         # refill_time_ms
)
steps = st.lists(st.tuples(st.integers(0, 50 * MS), st.integers(0, 30_000)), max_size=200)


@given(bucket_params, st.lists(st.tuples(st.sampled_from(["reduce", "replenish", "wait"]),
                                         st.integers(0, 40_000)), max_size=200))
def test_budget_stays_within_bounds(params: tuple[int, int, int], ops: list[tuple[str, int]]) -> None:
    size, burst, refill_ms = params
    clock = FakeClock()
    b = TokenBucket(size, burst, refill_time_ms=refill_ms, clock=clock)
    for op, n in ops:
        if op == "reduce":
            b.reduce(n)
        elif op == "replenish":
            b.force_replenish(n)
        else:
            clock.advance(n * 1_000)
        assert 0 <= b.budget <= size
        assert 0 <= b.one_time_burst <= burst


@given(bucket_params, steps)
def test_bucket_never_grants_more_than_the_rate(params: tuple[int, int, int],
                                                plan: list[tuple[int, int]]) -> None:
    """Requests no larger than the bucket: granted <= size + burst + size * elapsed / refill_time."""
    size, burst, refill_ms = params
    clock = FakeClock()
    start = clock.now
    b = TokenBucket(size, burst, refill_time_ms=refill_ms, clock=clock)
    granted = 0
    for dt, n in plan:
        clock.advance(dt)
        n = min(n, size)
        if b.reduce(n) is BucketReduction.SUCCESS:
            granted += n
        assert granted <= size + burst + Fraction(size * (clock.now - start), refill_ms * MS)


def _drive(rl: RateLimiter, timer: ManualTimer, clock: FakeClock,
           plan: list[tuple[int, int]]) -> int:
    """Run `plan` (time step, request) through a limiter as a device would; the bytes granted."""
    granted = 0
    for dt, n in plan:
        clock.advance(dt)
        if timer.expired:
            rl.event_handler()
        if rl.consume(n, TokenType.BYTES):
            granted += n
    # Account for the last debt: measure once the limiter would unblock.
    if rl.is_blocked:
        assert timer.deadline_ns is not None
        clock.now = max(clock.now, timer.deadline_ns)
        rl.event_handler()
    return granted


@given(bucket_params, steps)
@settings(max_examples=200)
def test_limiter_holds_requests_within_the_bucket_to_the_rate(params: tuple[int, int, int],
                                                              plan: list[tuple[int, int]]) -> None:
    size, burst, refill_ms = params
    clock = FakeClock()
    start = clock.now
    rl, timer = limiter(clock, bandwidth=TokenBucket(size, burst, refill_time_ms=refill_ms, clock=clock))
    granted = _drive(rl, timer, clock, [(dt, min(n, size)) for dt, n in plan])
    assert granted <= size + burst + Fraction(size * (clock.now - start), refill_ms * MS)


@given(bucket_params, steps)
@settings(max_examples=200)
def test_limiter_with_oversized_requests_stays_within_twice_the_rate(
        params: tuple[int, int, int], plan: list[tuple[int, int]]) -> None:
    """Firecracker's over-consumption: the bucket refills while the debt is waited out (see below)."""
    size, burst, refill_ms = params
    clock = FakeClock()
    start = clock.now
    rl, timer = limiter(clock, bandwidth=TokenBucket(size, burst, refill_time_ms=refill_ms, clock=clock))
    granted = _drive(rl, timer, clock, plan)
    assert granted <= size + burst + 2 * Fraction(size * (clock.now - start), refill_ms * MS)


def test_back_to_back_double_size_requests_get_twice_the_rate(clock: FakeClock) -> None:
    """Pins Firecracker's accounting: a 2 x size request each refill period is always granted."""
    rl, timer = limiter(clock, bandwidth=bucket(clock, size=1000, refill_ms=100))
    for _ in range(50):
        assert rl.consume(2000, TokenType.BYTES)
        assert timer.deadline_ns == clock.now + 100 * MS
        clock.advance(100 * MS)
        rl.event_handler()
