"""Two beats: exactly one schedules; when it is killed, the other takes over."""

from __future__ import annotations

import os
import signal

from tests.conftest import Fleet, wait_until


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
