"""Watching a live session: the phase file, the pane, the clocks and the lease.

The monitor decides how a running session ends. It reads the phase file on
every tick (a read of a few bytes; cheaper than being wrong about a rewrite
within the filesystem's timestamp granularity) and asks tmux about the pane
less often. Each new first line of the phase file is reported through
``on_phase`` as soon as it is seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from workers import run as outcomes
from workers.config import AgentConfig, MonitorConfig
from workers.errors import PhaseFileError
from workers.phases import TERMINAL, PhaseReading, read_phase
from workers.run import Run
from workers.tmux import AgentSession


def watch(
    run: Run,
    session: AgentSession,
    agent: AgentConfig,
    timing: MonitorConfig,
    on_phase: Callable[[Run], None],
    renew: Callable[[], bool],
) -> None:
    """Monitor ``session`` until the run has an outcome (set on ``run``)."""
    assert run.phase_file is not None
    start = last_change = last_live = last_renew = time.monotonic()
    while not run.ended:
        now = time.monotonic()
        if _check_phase(run, run.phase_file, on_phase):
            last_change = now
        if run.ended:
            break
        if now - last_live >= timing.liveness_interval:
            last_live = now
            alive, code = session.status()
            # The agent may write its phase and exit between two ticks.
            if not alive and not _check_phase(run, run.phase_file, on_phase):
                run.end(outcomes.CRASHED, f"the agent's session ended (exit status {code})")
        if run.ended:
            break
        if now - last_change >= agent.idle_timeout:
            run.end(outcomes.IDLE_TIMEOUT, f"no phase change for {agent.idle_timeout:g} s")
        elif now - start >= agent.max_runtime:
            run.end(outcomes.FAILED, f"max_runtime of {agent.max_runtime:g} s reached")
        elif now - last_renew >= timing.lease_seconds / 3:
            last_renew = now
            if not renew():
                run.end(outcomes.LOST_LEASE, "the agent's lease could not be renewed")
        if not run.ended:
            time.sleep(timing.poll_interval)
    session.kill()


def _check_phase(run: Run, phase_file: str, on_phase: Callable[[Run], None]) -> bool:
    """Record a new phase if the file shows one; True when the phase changed."""
    try:
        reading: PhaseReading | None = read_phase(phase_file)
    except PhaseFileError as exc:
        run.end(outcomes.FAILED, str(exc))
        return False
    if reading is None or reading.phase == run.final_phase:
        return False
    run.add_phase(reading.phase)
    outcome = TERMINAL.get(reading.phase)
    if outcome is not None:
        run.end(outcome, reading.reason)
    on_phase(run)
    return True
