"""Two beats: exactly one schedules; when it is killed, the other takes over.

A beat whose lock Redis lost (a failover to a replica that never had it,
an outage longer than the lock) takes it again instead of ending.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import redis

from tests.conftest import Fleet, wait_until

LOCK_KEY = "formulabeat:redbeat:lock"


def test_one_beat_schedules_and_the_standby_takes_over(fleet: Fleet) -> None:
    fleet.add_agent("planner", run_on_start=True)
    fleet.write_config("\n[beat]\nlock_timeout = 4\n")
    first, first_log = fleet.start_beat("beat-a")
    second = None
    try:
        wait_until(lambda: "Sending due task proj/planner" in first_log.read_text(), 60, "beat A")
        second, second_log = fleet.start_beat("beat-b")
        wait_until(lambda: "beat: Starting..." in second_log.read_text(), 60, "beat B to start")
        # While A lives, A keeps scheduling (the reaper, every 15 s) and B does not.
        sent_by_a = first_log.read_text().count("Sending due task")
        wait_until(
            lambda: first_log.read_text().count("Sending due task") > sent_by_a, 60, "A's next send"
        )
        assert "Sending due task" not in second_log.read_text()
        assert "Acquired lock" not in second_log.read_text()
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        # B takes the lock within its timeout (+ one loop) and schedules the reaper.
        wait_until(lambda: "Acquired lock" in second_log.read_text(), 60, "beat B to take over")
        wait_until(lambda: "Sending due task" in second_log.read_text(), 60, "beat B to schedule")
        # The agent that ran at A's start is not run again by B.
        assert "Sending due task proj/planner" not in second_log.read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _lose_the_lock(fleet: Fleet, extra: list[str] | None) -> tuple[subprocess.Popen[bytes], Path]:
    """A beat whose lock is deleted from Redis once it holds it; the beat and its log."""
    fleet.add_agent("planner")
    fleet.write_config("\n[beat]\nlock_timeout = 6\n")
    beat, log = fleet.start_beat(extra=extra)
    wait_until(lambda: "Acquired lock" in log.read_text(), 60, "beat to take its lock")
    assert fleet.redis_url is not None
    redis.Redis.from_url(fleet.redis_url).delete(LOCK_KEY)
    return beat, log


def test_stock_redbeat_ends_when_its_lock_is_lost(fleet: Fleet) -> None:
    # The bug tasks.beat works around: redbeat 2.4.2's tick raises
    # LockNotOwnedError, which ends beat. When this fails, redbeat handles a
    # lost lock itself and the workaround can go.
    beat, log = _lose_the_lock(fleet, ["-S", "redbeat.RedBeatScheduler"])
    try:
        beat.wait(timeout=60)
    finally:
        _stop(beat)
    assert "LockNotOwnedError" in log.read_text()


def test_a_beat_whose_lock_is_lost_takes_it_again_and_schedules_on(fleet: Fleet) -> None:
    beat, log = _lose_the_lock(fleet, None)
    try:
        wait_until(lambda: "its lock is gone" in log.read_text(), 60, "the lost lock to be seen")
        wait_until(lambda: log.read_text().count("Acquired lock") == 2, 60, "the lock again")
        sent = log.read_text().count("Sending due task formulabeat/reap")
        wait_until(
            lambda: log.read_text().count("Sending due task formulabeat/reap") > sent,
            60,
            "the reaper's next send",
        )
        assert beat.poll() is None, log.read_text()[-3000:]
        assert redis.Redis.from_url(str(fleet.redis_url)).exists(LOCK_KEY)
    finally:
        _stop(beat)
