"""Rate limits in Redis, shared by every API process: GCRA (the generic cell rate algorithm).

Each limit is "N per minute" with a burst of N: a key may spend its whole minute at once, then gets
one request every 60/N seconds. GCRA keeps one timestamp per key (the theoretical arrival time), so
it is exact, smooth and O(1), with no fixed-window edge where 2N requests pass in a second. The check
and update are one Lua script, atomic across processes.

If Redis is unreachable, request limits let requests through (and log it): an outage of the
broker must not stop clinics from submitting, and Postgres keeps every accepted case. Limits on
failures (failed logins) are kept instead by :class:`LocalLimiter`, the same algorithm in this
process's memory: an outage must not open the door to unlimited guessing either.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis

log = logging.getLogger("dermq.ratelimit")

# KEYS[1]: the key; ARGV: emission interval (us), burst tolerance (us), cost (-1: a refund). Answers
# wait in ms. One clock for every API process: Redis's own, in microseconds (a limit above 30,000 a
# minute has an interval under 2 ms: whole milliseconds rounded it away). Integers below 2**53: exact.
NOW = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
GCRA = (
    NOW
    + """
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, math.ceil((allow_at - now) / 1000)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(math.ceil((new_tat - now) / 1000), 0) + 1000)
return {1, 0}
"""
)

PEEK = (
    NOW
    + """
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + tonumber(ARGV[1]) - tonumber(ARGV[2])
local used = 0
if tat > now then used = 1 end
if allow_at > now then return {0, math.ceil((allow_at - now) / 1000), used} end
return {1, 0, used}
"""
)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after: int  # whole seconds, >= 1 when refused
    #: (from a check) the bucket holds requests counted and not yet recovered
    used: bool = False


class LocalLimiter:
    """GCRA in this process's memory: the stand-in for Redis while it is unreachable.

    At most :attr:`MAX_BUCKETS` buckets are kept, in the order they last counted a request: a new one
    past the cap pushes out the one counted longest ago (O(1), so memory and the cost of a failed
    login stay bounded whatever number of addresses fail at once). Before, a full table of buckets
    still counting was copied whole on every failure and kept growing. The trade-off: a bucket at its
    limit gets its budget back once the cap's worth of other buckets have counted a failure after it;
    an attacker who can fail from that many addresses and key prefixes has that many fresh budgets
    anyway, so pushing one bucket out adds one budget per ``MAX_BUCKETS`` failures (docs/SECURITY.md).
    """

    #: Buckets kept at most (about 250 bytes each); the one counted longest ago goes first.
    MAX_BUCKETS = 100_000

    def __init__(self) -> None:
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def _decide(self, bucket: str, per_minute: int, cost: int) -> Decision:
        interval = 60.0 / per_minute
        now = time.monotonic()
        with self._lock:
            tat = max(self._tat.get(bucket, now), now)
            # as if it were counted; one product, so the last request of a burst is exact: (tat + 60) - 60
            # rounded above tat in the minute below each power of two seconds of the clock
            allow_at = tat - interval * (per_minute - max(cost, 1))
            if allow_at > now:
                return Decision(False, max(1, math.ceil(allow_at - now)))
            if cost:
                self._tat[bucket] = tat + interval * cost
                self._tat.move_to_end(bucket)
                if len(self._tat) > self.MAX_BUCKETS:
                    self._tat.popitem(last=False)
            return Decision(True, 0)

    def hit(self, bucket: str, per_minute: int, *, cost: int = 1) -> Decision:
        return self._decide(bucket, per_minute, cost)

    def refund(self, bucket: str, per_minute: int) -> None:
        """Give back one request counted by :meth:`hit`."""
        now = time.monotonic()
        with self._lock:
            if bucket in self._tat:
                self._tat[bucket] = max(self._tat[bucket], now) - 60.0 / per_minute

    def check(self, bucket: str, per_minute: int) -> Decision:
        decision = self._decide(bucket, per_minute, 0)
        with self._lock:
            used = self._tat.get(bucket, 0.0) > time.monotonic()
        return Decision(decision.allowed, decision.retry_after, used)


class RateLimiter:
    #: Buckets hold microseconds since the limits kept them (``us``): a release that kept milliseconds
    #: under ``dermq:rl:`` would read these as 1000 times later (an answer of 429 for years) while both
    #: serve during a rolling deploy, so the two never share a key.
    PREFIX = "dermq:rl:us:"

    def __init__(self, client: redis.Redis, prefix: str = PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._hit = client.register_script(GCRA)
        self._peek = client.register_script(PEEK)
        self.local = LocalLimiter()

    def _args(self, per_minute: int) -> tuple[int, int]:
        """The emission interval and the burst tolerance (``per_minute`` intervals), in microseconds."""
        interval = max(1, round(60_000_000 / per_minute))
        return interval, interval * per_minute

    def hit(self, bucket: str, per_minute: int, *, cost: int = 1, failures: bool = False) -> Decision:
        """Count one request against ``bucket``; refuse it if the bucket is over its limit. Without
        Redis: allowed, or, for a limit on ``failures``, decided by :attr:`local`."""
        interval, tolerance = self._args(per_minute)
        try:
            allowed, wait_ms = self._hit(keys=[self.prefix + bucket], args=[interval, tolerance, cost])
        except redis.RedisError as exc:
            if failures:
                return self.local.hit(bucket, per_minute, cost=cost)
            log.warning("rate limiter unavailable; allowing the request", extra={"error": type(exc).__name__})
            return Decision(True, 0)
        return Decision(bool(allowed), 0 if allowed else max(1, math.ceil(int(wait_ms) / 1000)))

    def refund(self, bucket: str, per_minute: int, *, failures: bool = False) -> None:
        """Give back one request that :meth:`hit` counted (a reservation that turned out not to count)."""
        interval, tolerance = self._args(per_minute)
        try:
            self._hit(keys=[self.prefix + bucket], args=[interval, tolerance, -1])
        except redis.RedisError:
            if failures:
                self.local.refund(bucket, per_minute)

    def check(self, bucket: str, per_minute: int, *, failures: bool = False) -> Decision:
        """Would one more request pass? (Does not count one.) Without Redis: as :meth:`hit` says."""
        interval, tolerance = self._args(per_minute)
        try:
            allowed, wait_ms, used = self._peek(keys=[self.prefix + bucket], args=[interval, tolerance])
        except redis.RedisError:
            return self.local.check(bucket, per_minute) if failures else Decision(True, 0)
        return Decision(bool(allowed), 0 if allowed else max(1, math.ceil(int(wait_ms) / 1000)), bool(used))
