"""Rate limits in Redis, shared by every API process: GCRA (the generic cell rate algorithm).

Each limit is "N per minute" with a burst of N: a key may spend its whole minute at once, then gets
one request every 60/N seconds. GCRA keeps one timestamp per key (the theoretical arrival time), so
it is exact, smooth and O(1), with no fixed-window edge where 2N requests pass in a second. The check
and update are one Lua script, atomic across processes.

If Redis is unreachable the limiter lets requests through (and logs it): an outage of the
broker must not stop clinics from submitting, and Postgres keeps every accepted case.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import redis

log = logging.getLogger("dermq.ratelimit")

# KEYS[1]: the key; ARGV: emission interval (ms), burst tolerance (ms), cost. One clock for every
# API process: Redis's own.
NOW = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
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
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return {1, 0}
"""
)

PEEK = (
    NOW
    + """
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + tonumber(ARGV[1]) - tonumber(ARGV[2])
if allow_at > now then return {0, allow_at - now} end
return {1, 0}
"""
)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after: int  # whole seconds, >= 1 when refused


class RateLimiter:
    def __init__(self, client: redis.Redis, prefix: str = "dermq:rl:") -> None:
        self.client = client
        self.prefix = prefix
        self._hit = client.register_script(GCRA)
        self._peek = client.register_script(PEEK)

    def _args(self, per_minute: int) -> tuple[int, int]:
        interval = 60_000 / per_minute
        return int(interval), int(interval * per_minute)

    def hit(self, bucket: str, per_minute: int, *, cost: int = 1) -> Decision:
        """Count one request against ``bucket``; refuse it if the bucket is over its limit."""
        interval, tolerance = self._args(per_minute)
        try:
            allowed, wait_ms = self._hit(keys=[self.prefix + bucket], args=[interval, tolerance, cost])
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable; allowing the request", extra={"error": type(exc).__name__})
            return Decision(True, 0)
        return Decision(bool(allowed), 0 if allowed else max(1, math.ceil(int(wait_ms) / 1000)))

    def check(self, bucket: str, per_minute: int) -> Decision:
        """Would one more request pass? (Does not count one.)"""
        interval, tolerance = self._args(per_minute)
        try:
            allowed, wait_ms = self._peek(keys=[self.prefix + bucket], args=[interval, tolerance])
        except redis.RedisError:
            return Decision(True, 0)
        return Decision(bool(allowed), 0 if allowed else max(1, math.ceil(int(wait_ms) / 1000)))
