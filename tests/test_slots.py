"""Session slots per credential: a Redis semaphore that holds across hosts."""

from __future__ import annotations

import time

import redis

from tests.conftest import Fleet, held_claims, tmux_sessions, wait_result, wait_until
from workers import registry
from workers.slots import Slots


def test_at_most_the_limit_hold_a_slot_and_a_dead_holder_expires(
    redis_client: redis.Redis,
) -> None:
    slots = Slots(redis_client, "shared", ttl_seconds=30)
    assert slots.try_acquire("run-1", 2)
    assert slots.try_acquire("run-2", 2)
    assert not slots.try_acquire("run-3", 2)
    assert slots.try_acquire("run-1", 2)  # taking it again is not a second slot
    slots.release("run-2")
    assert slots.try_acquire("run-3", 2)
    assert sorted(slots.holders()) == ["run-1", "run-3"]

    short = Slots(redis_client, "brief", ttl_seconds=30)
    assert short.try_acquire("stalled", 1)
    assert not short.try_acquire("next", 1)
    # The holder's host died: its hold runs out (last renewed for a millisecond).
    assert Slots(redis_client, "brief", ttl_seconds=0.001).renew("stalled")
    wait_until(lambda: short.try_acquire("next", 1), 10, "the stalled hold to run out")
    assert not short.renew("stalled")
    assert short.try_acquire("next", 1)
    assert short.renew("next")


def test_a_bounded_wait_gives_up_and_honours_give_up(redis_client: redis.Redis) -> None:
    slots = Slots(redis_client, "busy", ttl_seconds=30)
    assert slots.try_acquire("holder", 1)
    assert not slots.acquire("waiter", 1, wait=0.3)
    assert not slots.acquire("waiter", 1, wait=30, give_up=lambda: True)
    slots.release("holder")
    assert slots.acquire("waiter", 1, wait=0.3)


SLOTS = "\n[credentials.shared]\nmax_sessions = 1\nwait = {wait}\n"


def test_agents_sharing_a_credential_take_turns(fleet: Fleet, redis_client: redis.Redis) -> None:
    fleet.add_agent("first", "sleep=3 phase=done", credential="shared")
    fleet.add_agent("second", "phase=done", credential="shared")
    fleet.add_agent("third", "phase=done", credential="shared")
    fleet.write_config(SLOTS.format(wait=60))
    fleet.start_worker()
    first = fleet.send("first")
    wait_until(lambda: first.state == "RUNNING", 30, "the first run to start")
    second = fleet.send("second")
    wait_until(
        lambda: (registry.get(redis_client, second.id) or {}).get("state") == "WAITING_FOR_SLOT",
        30,
        "the second run to wait for the slot",
    )
    assert len(tmux_sessions(fleet.tmux_socket)) == 1
    # Its run step is still running, so its message is not acked yet: had the
    # worker died before the claim, the message would come back.
    assert any(second.id in v.decode() for v in redis_client.hvals("unacked"))
    # A run waiting for a slot can be cancelled from anywhere.
    cancelled = fleet.send("third")
    wait_until(
        lambda: (registry.get(redis_client, cancelled.id) or {}).get("state") == "WAITING_FOR_SLOT",
        30,
        "the third run to wait",
    )
    registry.request_cancel(redis_client, cancelled.id, "tester")
    assert wait_result(cancelled, 30)["outcome"] == "cancelled"
    done_first, done_second = wait_result(first, 60), wait_result(second, 60)
    assert (done_first["outcome"], done_second["outcome"]) == ("done", "done")
    assert done_second["phases"][0]["at"] > done_first["finished_at"]
    assert held_claims(redis_client) == []


def test_a_slot_that_stays_busy_skips_the_run_and_frees_its_lease(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("first", "sleep=6 phase=done", credential="shared")
    fleet.add_agent("second", "phase=done", credential="shared")
    fleet.write_config(SLOTS.format(wait=1))
    fleet.start_worker()
    first = fleet.send("first")
    wait_until(lambda: first.state == "RUNNING", 30, "the first run to start")
    skipped = wait_result(fleet.send("second"), 30)
    assert skipped["outcome"] == "skipped"
    assert "credential 'shared'" in skipped["reason"] and first.id in skipped["reason"]
    assert redis_client.keys("formulabeat:lock:proj:second") == []
    assert wait_result(first, 60)["outcome"] == "done"
    assert held_claims(redis_client) == []


def test_a_wait_for_a_slot_longer_than_the_lease_keeps_the_lease(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("first", "sleep=8 phase=done", credential="shared")
    fleet.add_agent("second", "phase=done", credential="shared")
    fleet.write_config(SLOTS.format(wait=60), monitor={"lease_seconds": 3})
    fleet.start_worker()
    first = fleet.send("first")
    wait_until(lambda: first.state == "RUNNING", 30, "the first run to start")
    second = fleet.send("second")
    key = "formulabeat:lock:proj:second"

    def state() -> object:
        return (registry.get(redis_client, second.id) or {}).get("state")

    wait_until(lambda: state() == "WAITING_FOR_SLOT", 30, "the second run to wait")
    # Waiting longer than its lease lasts, the run keeps it all along.
    while state() == "WAITING_FOR_SLOT":
        assert redis_client.pttl(key) > 0, "the waiting run's lease ran out"
        time.sleep(0.2)
    assert wait_result(second, 60)["outcome"] == "done"
    assert held_claims(redis_client) == []
