"""Per-agent leases in Redis, in place of the original's PID files.

A lease is ``SET key value NX PX ttl``; the value is an owner record (run id,
host, random token) so that only its owner can extend or release it, through
compare-and-extend and compare-and-delete scripts. A lease whose owner died
simply expires: there is no stale file to clean. Taking, taking back and
giving back a lease are writes a replica must have before they count
(workers.sentinel.replicated): a failover must not hand an agent's lease to
a second run while the first lives.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

import redis

from workers.sentinel import replicated

_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# Take the lease and draw the next fencing token in one step.
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return redis.call('incr', KEYS[2])
end
return 0
"""

# Take back a lease Redis lost (restarted without its last writes): only if
# nobody holds it, and with the fencing counter no lower than its own number.
_REASSERT = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    local fence = tonumber(redis.call('get', KEYS[2]) or '0')
    if fence < tonumber(ARGV[3]) then redis.call('set', KEYS[2], ARGV[3]) end
    return 1
end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

# Drop the lease if a given run holds it, whatever the token: for the host
# that ends a run whose worker died before it recorded the token.
_RELEASE_RUN = """
local value = redis.call('get', KEYS[1])
if not value then return 0 end
local ok, owner = pcall(cjson.decode, value)
if ok and type(owner) == 'table' and owner['run_id'] == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def agent_lock_key(project: str, agent: str) -> str:
    """The Redis key of an agent's run lease."""
    return f"formulabeat:lock:{project}:{agent}"


def fence_key(key: str) -> str:
    """The counter that numbers every acquisition of the lease at ``key``."""
    # Kept apart from the leases: a scan for held leases must not find it.
    return f"formulabeat:fence:{key.removeprefix('formulabeat:lock:')}"


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease, as read by someone who does not."""

    run_id: str
    host: str
    ttl_seconds: float


@dataclass(frozen=True)
class Lease:
    """A lease this process acquired (or rebuilt from a run's token)."""

    key: str
    token: str
    ttl_ms: int
    # Monotonic per key: a side effect made under an older number is stale.
    fence: int = 0

    @classmethod
    def acquire(
        cls, client: redis.Redis, key: str, run_id: str, host: str, ttl_seconds: float
    ) -> Lease | None:
        """Take the lease, or return None when a live owner holds it."""
        token = json.dumps(
            {"run_id": run_id, "host": host, "nonce": secrets.token_hex(8)}, sort_keys=True
        )
        ttl_ms = max(1, int(ttl_seconds * 1000))
        fence = int(replicated(client, "EVAL", _ACQUIRE, 2, key, fence_key(key), token, ttl_ms))
        if fence:
            return cls(key=key, token=token, ttl_ms=ttl_ms, fence=fence)
        return None

    def extend(self, client: redis.Redis) -> bool:
        """Renew the lease for another TTL; False when it is no longer ours."""
        return bool(client.eval(_EXTEND, 1, self.key, self.token, self.ttl_ms))

    def reassert(self, client: redis.Redis) -> bool:
        """Take the lease back when it is gone from Redis; False when another owner holds it.

        Redis acknowledges a write before it is on disk (or on a replica): a
        restart can lose a lease taken a moment before. Its owner, still
        renewing it, is the only one entitled to it.
        """
        keys = (self.key, fence_key(self.key))
        return bool(
            replicated(client, "EVAL", _REASSERT, 2, *keys, self.token, self.ttl_ms, self.fence)
        )

    def still_ours(self, client: redis.Redis) -> bool:
        """Whether this lease is held by us and no later acquisition happened (fencing)."""
        return self.lost_because(client) is None

    def lost_because(self, client: redis.Redis) -> str | None:
        """Why this lease is not ours now (None: it is, and no later acquisition happened)."""
        pipe = client.pipeline()
        pipe.get(self.key)
        pipe.get(fence_key(self.key))
        value, fence = pipe.execute()
        token = value.decode() if isinstance(value, bytes) else value
        if token is None:
            return "it is gone from Redis"
        if token != self.token:
            try:
                other = json.loads(token).get("run_id", "?")
            except (ValueError, AttributeError):
                other = "?"
            return f"run {other} holds it"
        if fence is None or int(fence) != self.fence:
            return f"its fencing counter is {fence.decode() if fence else 'gone'}, not {self.fence}"
        return None

    def release(self, client: redis.Redis) -> bool:
        """Drop the lease if it is still ours; False when it had already gone."""
        return bool(replicated(client, "EVAL", _RELEASE, 1, self.key, self.token))


def release_run(client: redis.Redis, key: str, run_id: str) -> bool:
    """Drop the lease at ``key`` if run ``run_id`` holds it; False otherwise."""
    return bool(replicated(client, "EVAL", _RELEASE_RUN, 1, key, run_id))


def holder(client: redis.Redis, key: str) -> LeaseHolder | None:
    """Who holds the lease at ``key`` now, if anyone."""
    pipe = client.pipeline()
    pipe.get(key)
    pipe.pttl(key)
    value, pttl = pipe.execute()
    if value is None:
        return None
    try:
        owner: dict[str, Any] = json.loads(value)
    except ValueError:
        owner = {}
    return LeaseHolder(
        run_id=str(owner.get("run_id", "?")),
        host=str(owner.get("host", "?")),
        ttl_seconds=max(0.0, int(pttl) / 1000),
    )
