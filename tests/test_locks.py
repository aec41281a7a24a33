"""Leases in Redis: owner token, compare-and-extend/delete, fencing tokens."""

from __future__ import annotations

import dataclasses

import redis

from tests.conftest import Fleet, wait_result, wait_until
from workers.locks import Lease, agent_lock_key, fence_key, holder, release_run


def test_a_lease_has_one_owner_and_only_it_extends_or_releases(redis_client: redis.Redis) -> None:
    key = agent_lock_key("p", "a")
    first = Lease.acquire(redis_client, key, "run-1", "host-a", 30)
    assert first is not None
    assert Lease.acquire(redis_client, key, "run-2", "host-b", 30) is None
    owner = holder(redis_client, key)
    assert owner is not None and (owner.run_id, owner.host) == ("run-1", "host-a")
    impostor = Lease(key=key, token=first.token.replace("run-1", "run-9"), ttl_ms=30000)
    assert not impostor.extend(redis_client)
    assert not impostor.release(redis_client)
    assert first.extend(redis_client)
    assert first.release(redis_client)
    assert redis_client.get(key) is None


def test_fencing_tokens_grow_and_a_stale_lease_knows_it(redis_client: redis.Redis) -> None:
    key = agent_lock_key("p", "fenced")
    old = Lease.acquire(redis_client, key, "run-1", "host-a", 30)
    assert old is not None and old.still_ours(redis_client)
    # Its owner stalled: the lease runs out (last renewed for a millisecond).
    assert dataclasses.replace(old, ttl_ms=1).extend(redis_client)
    wait_until(lambda: redis_client.get(key) is None, 10, "the lease to run out")
    new = Lease.acquire(redis_client, key, "run-2", "host-b", 30)
    assert new is not None and new.fence == old.fence + 1
    assert not old.still_ours(redis_client)
    assert new.still_ours(redis_client)
    assert not old.release(redis_client)  # cannot drop the new owner's lease
    assert redis_client.get(key) == new.token.encode()


def test_a_run_that_loses_its_lease_stops_itself_and_pushes_nothing(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("planner", "phase=awaiting_ci sleep=60", ops_commit=["journal.md"])
    fleet.write_config()
    text = fleet.config_path.read_text().replace(
        "ready_quiet = 0.2", "ready_quiet = 0.2\nlease_seconds = 3"
    )
    fleet.config_path.write_text(text)
    fleet.start_worker()
    sent = fleet.send_live("planner")
    key = agent_lock_key("proj", "planner")
    redis_client.delete(key)  # the lease is gone (as after a long stall) ...
    thief = Lease.acquire(redis_client, key, "other-run", "host-z", 60)  # ... and taken
    assert thief is not None
    result = wait_result(sent, 60)
    assert result["outcome"] == "lost_lease"
    assert redis_client.get(key) == thief.token.encode()  # the new owner keeps it


def test_the_host_ending_a_run_frees_its_lease_by_run_id_only(redis_client: redis.Redis) -> None:
    key = agent_lock_key("p", "orphan")
    assert Lease.acquire(redis_client, key, "run-1", "host-a", 30) is not None
    assert not release_run(redis_client, key, "run-2")
    assert release_run(redis_client, key, "run-1")
    assert redis_client.get(key) is None
    assert not release_run(redis_client, key, "run-1")
    redis_client.set(key, "not json")
    assert not release_run(redis_client, key, "run-1")


def test_a_lease_redis_lost_is_taken_back_by_its_owner_only(redis_client: redis.Redis) -> None:
    key = agent_lock_key("proj", "planner")
    lease = Lease.acquire(redis_client, key, "run-1", "host-a", 30)
    assert lease is not None
    # A restart that lost the last writes: the lease and its counter gone.
    redis_client.delete(key, fence_key(key))
    assert not lease.extend(redis_client)
    assert lease.reassert(redis_client) and lease.still_ours(redis_client)
    # Its fence stands: the next owner's number is higher.
    lease.release(redis_client)
    later = Lease.acquire(redis_client, key, "run-2", "host-b", 30)
    assert later is not None and later.fence > lease.fence
    # Another owner holds it: nothing is taken back.
    assert not lease.reassert(redis_client)
    assert holder(redis_client, key).run_id == "run-2"  # type: ignore[union-attr]
