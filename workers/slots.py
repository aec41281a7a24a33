"""Session slots per agent credential: a Redis semaphore across all hosts.

The original took a machine-wide flock around each agent CLI so that two
sessions never refreshed one OAuth login at once; a flock holds on one
machine only. Here each credential has a sorted set of holders (run ids)
scored by when their hold expires: at most ``max_sessions`` unexpired
holders at a time, whatever host they run on. A holder renews with its
run's lease; one whose host died simply expires, and the reaper frees it at
once. Time comes from the Redis server, so hosts' clocks do not matter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from workers.sentinel import replicated

_NOW = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Drop expired holders, then take a slot when one is free (or already ours).
_ACQUIRE = (
    _NOW
    + """
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[3])
if redis.call('zscore', KEYS[1], ARGV[1]) or
   redis.call('zcard', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('zadd', KEYS[1], now + ttl, ARGV[1])
    if redis.call('pttl', KEYS[1]) < ttl then redis.call('pexpire', KEYS[1], ttl) end
    return 1
end
return 0
"""
)

_RENEW = (
    _NOW
    + """
local score = redis.call('zscore', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('zadd', KEYS[1], now + ttl, ARGV[1])
if redis.call('pttl', KEYS[1]) < ttl then redis.call('pexpire', KEYS[1], ttl) end
return 1
"""
)

KEY_PREFIX = "formulabeat:slots:"


def slots_key(credential: str) -> str:
    """The sorted set of a credential's slot holders."""
    return f"{KEY_PREFIX}{credential}"


class Slots:
    """The session slots of one credential."""

    def __init__(self, client: redis.Redis, credential: str, ttl_seconds: float) -> None:
        self.client = client
        self.credential = credential
        self.key = slots_key(credential)
        self.ttl_ms = max(1, int(ttl_seconds * 1000))

    def try_acquire(self, holder: str, limit: int) -> bool:
        """Take a slot for ``holder`` if fewer than ``limit`` are held; True when held."""
        return bool(
            replicated(self.client, "EVAL", _ACQUIRE, 1, self.key, holder, limit, self.ttl_ms)
        )

    def acquire(
        self,
        holder: str,
        limit: int,
        wait: float,
        give_up: Callable[[], bool] = lambda: False,
        poll: float = 0.25,
    ) -> bool:
        """Take a slot, waiting at most ``wait`` seconds (or until ``give_up`` says so)."""
        deadline = time.monotonic() + wait
        while True:
            if self.try_acquire(holder, limit):
                return True
            if time.monotonic() >= deadline or give_up():
                return False
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def renew(self, holder: str) -> bool:
        """Extend ``holder``'s slot by the TTL; False when it is no longer held."""
        return bool(self.client.eval(_RENEW, 1, self.key, holder, self.ttl_ms))

    def release(self, holder: str) -> None:
        """Give ``holder``'s slot back (nothing when it had none)."""
        replicated(self.client, "ZREM", self.key, holder)

    def holders(self) -> list[str]:
        """The runs holding a slot now (expired holds not yet dropped included)."""
        held = self.client.zrange(self.key, 0, -1)
        return [h.decode() if isinstance(h, bytes) else str(h) for h in held]
