"""The failed-login limits kept in this process's memory while Redis is unreachable
(:class:`core.ratelimit.LocalLimiter`): bounded memory and bounded cost per failure, however many
addresses fail at once, and a bucket at its limit stays there while fewer than the cap fail after it."""

from __future__ import annotations

import time
from types import SimpleNamespace

from core import ratelimit
from core.ratelimit import LocalLimiter


class Small(LocalLimiter):
    MAX_BUCKETS = 50


def test_a_spray_from_more_addresses_than_the_cap_holds_no_more_buckets_than_the_cap() -> None:
    limiter = Small()
    # one failure each from 500 addresses within a second: every bucket is still counting (1 a minute)
    for n in range(500):
        assert limiter.hit(f"authfail:2001:db8:{n:x}::/64:-", 1).allowed
    assert len(limiter._tat) == Small.MAX_BUCKETS  # (the only way to see the memory it holds)


def test_a_failure_past_the_cap_costs_about_what_one_below_it_does() -> None:
    # before: at the cap with every bucket still counting, each failure rebuilt the whole table under
    # the lock (100,000 buckets copied a failed login, for every caller of this process)
    limiter = LocalLimiter()
    started = time.process_time()
    for n in range(LocalLimiter.MAX_BUCKETS):
        limiter.hit(f"authfail:10.{n >> 16}.{(n >> 8) & 255}.{n & 255}:-", 1)
    below = (time.process_time() - started) / LocalLimiter.MAX_BUCKETS
    started = time.process_time()
    for n in range(2_000):
        limiter.hit(f"authfail:2001:db8:{n:x}::/64:-", 1)
    past = (time.process_time() - started) / 2_000
    # CPU time, not the clock: a pause of the test's process is no cost (before: thousands of times more)
    assert past < 100 * below, f"{past * 1e6:.0f} us a failure past the cap, {below * 1e6:.1f} us below it"
    assert len(limiter._tat) == LocalLimiter.MAX_BUCKETS


def test_a_bucket_at_its_limit_stays_refused_while_fewer_than_the_cap_fail_after_it() -> None:
    limiter = Small()
    guessed = "authfail:198.51.100.7:dq_live_abcd"
    assert [limiter.hit(guessed, 3).allowed for _ in range(4)] == [True, True, True, False]
    for n in range(Small.MAX_BUCKETS - 1):  # a flood of other buckets, each failing once
        limiter.hit(f"authfail:2001:db8:{n:x}::/64:-", 3)
        assert not limiter.hit(guessed, 3).allowed  # a refused guess counts nothing: it keeps no place
    assert not limiter.check(guessed, 3).allowed
    # the cap'th other bucket pushes out the one counted longest ago: the guessed one. Its budget
    # comes back after the cap's worth of failures elsewhere, each itself counted (docs/SECURITY.md)
    limiter.hit("authfail:2001:db8:ffff::/64:-", 3)
    assert limiter.hit(guessed, 3).allowed


def test_a_bucket_still_counting_failures_keeps_its_place_ahead_of_quieter_ones() -> None:
    limiter = Small()
    guessed = "authfail:198.51.100.7:dq_live_abcd"
    for n in range(3 * Small.MAX_BUCKETS):
        if n % 40 == 0:
            assert limiter.hit(guessed, 20).allowed  # counted again before the cap's worth of others
        limiter.hit(f"authfail:2001:db8:{n:x}::/64:-", 20)
    assert limiter.check(guessed, 20).used


def test_a_limit_of_one_a_minute_lets_a_first_failure_through_at_any_time(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # the last request of a burst was refused within a minute below each power of two seconds of
    # the clock: (now + 60) - 60 rounded above now. The clock is pinned in one such minute.
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(monotonic=lambda: 1000.3411))
    limiter = LocalLimiter()
    assert limiter.hit("authfail:192.0.2.1:-", 1).allowed
    assert not limiter.hit("authfail:192.0.2.1:-", 1).allowed
