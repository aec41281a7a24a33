"""The run registry in Redis: every run's latest snapshot, by start time.

It lets any host (the CLI, the demo, a reaper) see runs without holding a
result handle, the way rq keeps registries of jobs by state. What a run's
record, its live state, its claims and the ledger of steps sent hold must
come through a failover: those writes are kept (workers.sentinel.kept).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import redis

from workers.sentinel import kept, replicated

RUNS_KEY = "formulabeat:runs"
RUN_TTL_SECONDS = 7 * 24 * 3600


def run_key(run_id: str) -> str:
    """The key holding one run's JSON snapshot."""
    return f"formulabeat:run:{run_id}"


def record(client: redis.Redis, snapshot: dict[str, Any]) -> None:
    """Store a run's latest snapshot and index it (first sight sets its position)."""
    run_id = snapshot["run_id"]
    now = time.time()
    kept(
        client,
        ("SET", run_key(run_id), json.dumps(snapshot), "EX", RUN_TTL_SECONDS),
        ("ZADD", RUNS_KEY, "NX", now, run_id),
        ("ZREMRANGEBYSCORE", RUNS_KEY, 0, now - RUN_TTL_SECONDS),
    )


def get(client: redis.Redis, run_id: str) -> dict[str, Any] | None:
    """One run's latest snapshot, if known."""
    raw = client.get(run_key(run_id))
    return json.loads(raw) if raw else None


def recent(client: redis.Redis, limit: int = 50) -> list[dict[str, Any]]:
    """The latest snapshots of the most recently started runs, newest first."""
    ids = [_text(i) for i in client.zrevrange(RUNS_KEY, 0, limit - 1)]
    if not ids:
        return []
    raws = client.mget([run_key(i) for i in ids])
    return [json.loads(raw) for raw in raws if raw]


def runs_starting(client: redis.Redis, prefix: str) -> list[str]:
    """The ids of the known runs (recorded, or sent and not yet taken) starting with ``prefix``."""
    # Redis globs treat these as patterns; a typed id must match only itself.
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    found = set()
    for key in (RUNS_KEY, SENT_KEY):
        for member, _ in client.zscan_iter(key, match=pattern):
            # The ledger also names a run's session step, ``<run id>/session``.
            found.add(_text(member).partition("/")[0])
    return sorted(found)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cancel_key(run_id: str) -> str:
    """The key that asks a run, wherever it lives, to stop."""
    return f"formulabeat:cancel:{run_id}"


def request_cancel(client: redis.Redis, run_id: str, who: str) -> None:
    """Ask the run to stop; its monitor (on its own host) acts on it."""
    client.set(cancel_key(run_id), who, ex=RUN_TTL_SECONDS)


def cancel_requested(client: redis.Redis, run_id: str) -> str | None:
    """Who asked the run to stop, if anyone did."""
    value = client.get(cancel_key(run_id))
    return _text(value) if value is not None else None


def requests(client: redis.Redis, run_ids: list[str]) -> tuple[dict[str, str], set[str]]:
    """For many runs in one round trip: who asked each to stop, and whose pane is wanted."""
    if not run_ids:
        return {}, set()
    pipe = client.pipeline(transaction=False)
    pipe.mget([cancel_key(i) for i in run_ids])
    pipe.mget([pane_request_key(i) for i in run_ids])
    cancels, wanted = pipe.execute()
    stops = {i: _text(who) for i, who in zip(run_ids, cancels, strict=True) if who is not None}
    return stops, {i for i, flag in zip(run_ids, wanted, strict=True) if flag is not None}


def pane_key(run_id: str) -> str:
    """Where a run's host publishes its agent's pane when asked."""
    return f"formulabeat:pane:{run_id}"


def pane_request_key(run_id: str) -> str:
    """The key a client sets to ask a run's host for its pane."""
    return f"formulabeat:pane-wanted:{run_id}"


def request_pane(client: redis.Redis, run_id: str, seconds: int = 15) -> None:
    """Ask the run's host to publish its pane for the next ``seconds``."""
    client.set(pane_request_key(run_id), "1", ex=seconds)


def publish_pane(client: redis.Redis, run_id: str, text: str) -> None:
    """Publish the pane text (kept briefly: it is a view, not a record)."""
    client.set(pane_key(run_id), text, ex=30)


def published_pane(client: redis.Redis, run_id: str) -> str | None:
    """The last published pane text of the run, if any."""
    value = client.get(pane_key(run_id))
    return _text(value) if value is not None else None


def _claim_key(step: str) -> str:
    return f"formulabeat:claimed:{step}"


# A claim taken by the same owner before counts as taken: the reply to a
# claim can be lost (Redis restarting) after Redis carried it out, and the
# owner, asking again, must not take its own claim for a redelivery. Each
# delivery of a step claims as a new owner.
_TAKE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
  return 0
end
"""

# A step taken leaves the ledger of steps sent (below) in the same call.
_CLAIM = (
    _TAKE
    + """
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
return 1
"""
)


def claim(client: redis.Redis, step: str, owner: str) -> bool:
    """Take a run's step for ``owner``; False when another owner took it (a redelivery)."""
    keys = (_claim_key(step), SENT_KEY, _sent_key(step))
    return bool(replicated(client, "EVAL", _CLAIM, len(keys), *keys, owner, RUN_TTL_SECONDS, step))


def claimed_by(client: redis.Redis, step: str) -> str | None:
    """Who took a run's step, if anyone did."""
    owner = client.get(_claim_key(step))
    return _text(owner) if owner is not None else None


# The claim and the live state in one step: a worker killed right after its
# claim leaves a run its host adopts, never a claim nobody knows the run of.
# The run leaves the ledger of sent steps in the same call.
_CLAIM_RUN = (
    _TAKE
    + """
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('DEL', KEYS[5])
return 1
"""
)


def claim_run(client: redis.Redis, state: dict[str, Any], owner: str) -> bool:
    """Like :func:`claim` for the run itself, saving its live state with the claim."""
    run_id = state["id"]
    keys = (
        _claim_key(run_id),
        _state_key(run_id),
        _live_key(state["host"]),
        SENT_KEY,
        _sent_key(run_id),
    )
    args = (owner, RUN_TTL_SECONDS, json.dumps(state), run_id)
    return bool(replicated(client, "EVAL", _CLAIM_RUN, len(keys), *keys, *args))


# -- the ledger of steps sent and not yet taken (a message the broker lost) --
# A step is named as it is claimed: the run id for the run itself,
# ``<run id>/session`` for its session step.

SENT_KEY = "formulabeat:sent"


def session_step(run_id: str) -> str:
    """The name a run's session step is claimed and written down under."""
    return f"{run_id}/session"


def _sent_key(step: str) -> str:
    return f"formulabeat:sent:{step}"


def note_sent(client: redis.Redis, step: str, message: dict[str, Any]) -> None:
    """Write down a step being sent (its task, task id, args, kwargs, queue) until it is claimed."""
    kept(
        client,
        ("SET", _sent_key(step), json.dumps(message), "EX", RUN_TTL_SECONDS),
        ("ZADD", SENT_KEY, time.time(), step),
    )


def awaits_claim(client: redis.Redis, step: str) -> bool:
    """Whether a step was sent and no worker has taken it yet."""
    return bool(client.exists(_sent_key(step)))


def sent(client: redis.Redis, run_id: str) -> dict[str, Any] | None:
    """A run sent and not yet taken by any worker, shaped like its snapshot."""
    raw = client.get(_sent_key(run_id))
    if raw is None:
        return None
    message = json.loads(raw)
    project, agent = [*message["args"], None, None][:2]
    return {"run_id": run_id, "project": project, "agent": agent, "state": "SENT"}


def unclaimed(client: redis.Redis, older_than: float) -> dict[str, dict[str, Any]]:
    """Steps sent more than ``older_than`` seconds ago that no worker has claimed."""
    found = {}
    for member in client.zrangebyscore(SENT_KEY, 0, time.time() - older_than):
        step = _text(member)
        raw = client.get(_sent_key(step))
        if raw is None or client.exists(_claim_key(step)):
            client.zrem(SENT_KEY, step)
        else:
            found[step] = json.loads(raw)
    return found


# -- live runs and host heartbeats (adoption after a restart, the reaper) --


def _live_key(host: str) -> str:
    return f"formulabeat:live:{host}"


def _state_key(run_id: str) -> str:
    return f"formulabeat:state:{run_id}"


def _host_key(host: str) -> str:
    return f"formulabeat:host:{host}"


def save_state(client: redis.Redis, state: dict[str, Any]) -> None:
    """Keep a live run's whole state, so its host can adopt it after a restart."""
    kept(
        client,
        ("SET", _state_key(state["id"]), json.dumps(state), "EX", RUN_TTL_SECONDS),
        ("SADD", _live_key(state["host"]), state["id"]),
    )


def forget(client: redis.Redis, run_id: str, host: str) -> None:
    """The run has ended: it is no longer live anywhere."""
    kept(client, ("SREM", _live_key(host), run_id), ("DEL", _state_key(run_id)))


def live_states(client: redis.Redis, host: str) -> list[dict[str, Any]]:
    """The saved states of the runs live on ``host`` (stale entries dropped)."""
    states = []
    for run_id in [_text(i) for i in client.smembers(_live_key(host))]:
        raw = client.get(_state_key(run_id))
        if raw is None:
            client.srem(_live_key(host), run_id)
        else:
            states.append(json.loads(raw))
    return states


def hosts_with_live_runs(client: redis.Redis) -> list[str]:
    """Every host that has live runs recorded."""
    prefix = _live_key("")
    return [_text(k)[len(prefix) :] for k in client.scan_iter(f"{prefix}*")]


def heartbeat(client: redis.Redis, host: str, ttl_seconds: int, pid: int) -> None:
    """This host (its worker ``pid``) is alive for the next ``ttl_seconds``."""
    client.set(_host_key(host), json.dumps({"at": time.time(), "pid": pid}), ex=ttl_seconds)


def heartbeat_pid(client: redis.Redis, host: str) -> int | None:
    """The worker pid of the host's last heartbeat, if it is still within its TTL."""
    raw = client.get(_host_key(host))
    if raw is None:
        return None
    try:
        return int(json.loads(raw)["pid"])
    except (ValueError, KeyError, TypeError):
        return None


def host_alive(client: redis.Redis, host: str) -> bool:
    """Whether ``host`` sent a heartbeat within its TTL."""
    return bool(client.exists(_host_key(host)))
