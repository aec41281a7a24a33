"""Credentials the API has limited until a known time, and runs deferred past it.

When a run's turn ends on a rate or usage limit whose reset time the CLI
states, every host learns it here (one key per credential, expiring at the
reset): new runs that use the credential are not started only to fail, but
skipped with the reason and the reset time, or, for an agent with
``on_limit = "defer"``, skipped and sent again for just after the reset. The
reaper sends deferred runs when they are due.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from workers.apierrors import RESET_MARGIN, format_time

DEFERRED_KEY = "formulabeat:deferred"
# A limit's record outlives its reset by a little, for the reasons that name it.
_KEEP_AFTER_RESET = 60


def limited_key(credential: str) -> str:
    """The key that says a credential is limited, and until when."""
    return f"formulabeat:limited:{credential}"


def _deferred_key(run_id: str) -> str:
    return f"formulabeat:deferred:{run_id}"


@dataclass(frozen=True)
class Limited:
    """A credential known to be limited: until when, by what, seen by which run."""

    credential: str
    until: float
    error: str
    run_id: str
    host: str

    def reason(self) -> str:
        """Why a new run of the credential is not started (the skip's reason)."""
        return (
            f"credential {self.credential!r} is limited by the API until "
            f"{format_time(self.until)} ({self.error}; seen by run {self.run_id} on "
            f"host {self.host})"
        )


# Kept only when it ends later than the limit already known: two runs seeing
# one limit at once, or an older message read late, never shorten it.
_NOTE = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, known = pcall(cjson.decode, old)
  if ok and tonumber(known['until']) and tonumber(known['until']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""


def note_limited(
    client: redis.Redis, credential: str, until: float, error: str, run_id: str, host: str
) -> bool:
    """Record that ``credential`` is limited until ``until``; False when a later end was known."""
    record = {"until": until, "error": error, "run_id": run_id, "host": host}
    ttl_ms = max(1, int((until - time.time() + _KEEP_AFTER_RESET) * 1000))
    return bool(client.eval(_NOTE, 1, limited_key(credential), json.dumps(record), until, ttl_ms))


def limited(client: redis.Redis, credential: str, now: float | None = None) -> Limited | None:
    """The credential's limit, if one is known and not yet reset."""
    raw = client.get(limited_key(credential))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        until = float(data["until"])
    except (ValueError, KeyError, TypeError):
        return None
    if until <= (now or time.time()):
        return None
    return Limited(
        credential=credential,
        until=until,
        error=str(data.get("error") or "limited"),
        run_id=str(data.get("run_id") or "-"),
        host=str(data.get("host") or "-"),
    )


def defer(client: redis.Redis, run_id: str, project: str, agent: str, due: float) -> None:
    """Keep a run to be sent at ``due`` (a little after its credential's reset)."""
    message = {"project": project, "agent": agent, "due": due}
    pipe = client.pipeline()
    pipe.set(_deferred_key(run_id), json.dumps(message), ex=max(3600, int(due - time.time()) * 2))
    pipe.zadd(DEFERRED_KEY, {run_id: due})
    pipe.execute()


def due_after_reset(until: float) -> float:
    """When a run deferred past a reset at ``until`` is sent."""
    return until + RESET_MARGIN


def due(client: redis.Redis, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Deferred runs whose time has come: run id -> {project, agent, due}."""
    found = {}
    for member in client.zrangebyscore(DEFERRED_KEY, 0, now or time.time()):
        run_id = member.decode() if isinstance(member, bytes) else str(member)
        raw = client.get(_deferred_key(run_id))
        if raw is None:
            client.zrem(DEFERRED_KEY, run_id)
            continue
        found[run_id] = json.loads(raw)
    return found


def sent(client: redis.Redis, run_id: str) -> None:
    """A deferred run has been sent: it is no longer waiting."""
    pipe = client.pipeline()
    pipe.zrem(DEFERRED_KEY, run_id)
    pipe.delete(_deferred_key(run_id))
    pipe.execute()
