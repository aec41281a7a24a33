"""The host's watcher: sessions hold no worker slot; lanes keep order and retry."""

from __future__ import annotations

import threading

import redis

from tests.conftest import Fleet, held_claims, tmux_sessions, wait_result, wait_until
from workers.lanes import Lanes


def test_idle_sessions_hold_no_worker_slot(fleet: Fleet, redis_client: redis.Redis) -> None:
    agents = [f"agent{i}" for i in range(6)]
    for name in agents:
        fleet.add_agent(name, "phase=awaiting_ci sleep=6 phase=done")
    fleet.write_config()
    # Two threads for six sessions: only possible if a live session holds none.
    fleet.config_path.write_text(
        fleet.config_path.read_text().replace("concurrency = 8", "concurrency = 2")
    )
    fleet.start_worker()
    sent = [fleet.send(name) for name in agents]
    wait_until(
        lambda: all(r.state == "AWAITING_CI" for r in sent), 60, "all six sessions to be live"
    )
    assert len(tmux_sessions(fleet.tmux_socket)) == 6
    results = [wait_result(r, 60) for r in sent]
    assert [r["outcome"] for r in results] == ["done"] * 6
    assert all(
        [p["phase"] for p in r["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"] for r in results
    )
    assert held_claims(redis_client) == []


def test_a_lane_keeps_a_runs_order_and_retries_while_redis_is_away() -> None:
    lanes = Lanes(count=2, name="test", max_pause=0.05)
    done: list[str] = []
    finished = threading.Event()
    failures = {"left": 3}

    def flaky() -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise redis.exceptions.ConnectionError("Redis restarting")
        done.append("second")

    lanes.submit("run-1", lambda: done.append("first"))
    lanes.submit("run-1", flaky)
    lanes.submit("run-1", lambda: done.append("third"))
    lanes.submit("run-1", finished.set)
    assert finished.wait(10)
    assert done == ["first", "second", "third"]
    assert failures["left"] == 0


def test_settle_returns_once_a_runs_earlier_jobs_went_through() -> None:
    lanes = Lanes(count=2, name="test", max_pause=0.05)
    release = threading.Event()
    done: list[str] = []

    def slow() -> None:
        release.wait(10)
        done.append("recorded")

    lanes.submit("run-1", slow)
    assert not lanes.settle("run-1", 0.2)  # the job is still held up
    release.set()
    assert lanes.settle("run-1", 10)
    assert done == ["recorded"]
    inside: list[bool] = []
    lanes.submit("run-1", lambda: inside.append(lanes.settle("run-1", 10)))
    assert lanes.settle("run-1", 10)
    assert inside == [False]  # a lane's own job is not made to wait for itself
