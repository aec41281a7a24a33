"""Watching a live session: the phase file, the pane, the clocks and the lease.

The monitor decides how one session ends and returns that as a value; the
caller decides what follows (recover once after a crash, or end the run).

It sleeps on inotify over the run's private directory, so a write of the
phase file, or a marker written by a hook (SessionEnd's ``exited``, Stop's
``idle``, PostToolUse's ``phase-changed``), wakes it at once; the poll
interval is only the fallback for what inotify cannot see (a tmux server
that died, the clocks).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from workers import run as outcomes
from workers.config import AgentConfig, MonitorConfig
from workers.errors import PhaseFileError
from workers.hooks import EXITED_MARKER, HOOKS_LIVE, IDLE_MARKER, JOURNAL
from workers.phases import TERMINAL, read_phase
from workers.run import Run
from workers.tmux import AgentSession

# Checks (at the liveness interval) with an idle agent and no phase before
# the run is given up as idle_prompt, as the original did with its polls.
IDLE_PROMPT_CHECKS = 3

_WAKE_MASK = (
    inotify_flags.CLOSE_WRITE | inotify_flags.MODIFY | inotify_flags.MOVED_TO | inotify_flags.CREATE
)


@dataclass(frozen=True)
class MonitorExit:
    """How a session ended: an outcome and a reason (None for a plain done)."""

    outcome: str
    reason: str | None = None


class Limits:
    """The limits every kind of run shares: idle time, wall-clock cap, lease renewal."""

    def __init__(
        self,
        run: Run,
        agent: AgentConfig,
        timing: MonitorConfig,
        renew: Callable[[], bool],
        idle_what: str = "phase change",
    ) -> None:
        self.agent = agent
        self.timing = timing
        self.renew = renew
        self.idle_what = idle_what
        self.started = started_epoch(run)
        self.last_change = self.last_renew = time.monotonic()

    def changed(self) -> None:
        """Something happened: the idle clock starts again."""
        self.last_change = time.monotonic()

    def check(self) -> MonitorExit | None:
        """How the run must end now, if a limit is reached (renewing the lease when due)."""
        now = time.monotonic()
        if now - self.last_change >= self.agent.idle_timeout:
            return MonitorExit(
                outcomes.IDLE_TIMEOUT, f"no {self.idle_what} for {self.agent.idle_timeout:g} s"
            )
        if time.time() - self.started >= self.agent.max_runtime:
            return MonitorExit(
                outcomes.FAILED, f"max_runtime of {self.agent.max_runtime:g} s reached"
            )
        if now - self.last_renew >= self.timing.lease_seconds / 3:
            self.last_renew = now
            if not self.renew():
                return MonitorExit(outcomes.LOST_LEASE, "the agent's lease could not be renewed")
        return None


class RunDirWake:
    """Sleep until something is written in a run directory, or a timeout."""

    def __init__(self, run_dir: Path) -> None:
        self._inotify = INotify(nonblocking=True)
        self._inotify.add_watch(str(run_dir), _WAKE_MASK)

    def wait(self, timeout: float) -> None:
        """Return on the next write in the directory, or after ``timeout`` seconds."""
        self._inotify.read(timeout=max(0, int(timeout * 1000)))

    def close(self) -> None:
        """Release the inotify descriptor."""
        self._inotify.close()


def watch(
    run: Run,
    session: AgentSession,
    agent: AgentConfig,
    timing: MonitorConfig,
    on_phase: Callable[[Run], None],
    renew: Callable[[], bool],
    cancelled: Callable[[], str | None] = lambda: None,
) -> MonitorExit:
    """Monitor ``session`` until it ends; new phases are added to ``run`` as seen."""
    assert run.phase_file is not None and run.run_dir is not None
    run_dir = Path(run.run_dir)
    limits = Limits(run, agent, timing, renew)
    wake = RunDirWake(run_dir)
    try:
        last_live = time.monotonic()
        idle_checks = 0
        while True:
            try:
                if check_phase(run, on_phase):
                    limits.changed()
                    idle_checks = 0
            except PhaseFileError as exc:
                return MonitorExit(outcomes.FAILED, str(exc))
            if merge_journal(run):
                on_phase(run)
            terminal = TERMINAL.get(run.final_phase or "")
            if terminal is not None:
                _drain_journal(run, on_phase)
                reading = read_phase(run.phase_file)
                return MonitorExit(terminal, reading.reason if reading else None)
            now = time.monotonic()
            exited = (run_dir / EXITED_MARKER).exists()
            if exited or now - last_live >= timing.liveness_interval:
                last_live = now
                alive, how = session.status()
                if not alive:
                    if check_phase(run, on_phase):
                        continue  # it wrote its phase on the way out: judge that
                    return MonitorExit(outcomes.CRASHED, f"the agent's session ended ({how})")
                who = cancelled()
                if who:
                    return MonitorExit(outcomes.CANCELLED, f"cancelled by {who}")
                idle = run.final_phase is None and (run_dir / IDLE_MARKER).exists()
                idle_checks = idle_checks + 1 if idle else 0
                if idle_checks >= IDLE_PROMPT_CHECKS:
                    return MonitorExit(
                        outcomes.FAILED,
                        "idle_prompt: the agent returned to its prompt without writing a phase",
                    )
            limit = limits.check()
            if limit is not None:
                return limit
            wake.wait(timing.poll_interval)
    finally:
        wake.close()


def check_phase(run: Run, on_phase: Callable[[Run], None]) -> bool:
    """Record a new phase if the file shows one; True when the phase changed."""
    assert run.phase_file is not None
    reading = read_phase(run.phase_file)
    if reading is None or reading.phase == run.final_phase:
        return False
    run.add_phase(reading.phase)
    on_phase(run)
    return True


def merge_journal(run: Run) -> bool:
    """Fold new entries of the hooks' phase journal into the run's history.

    The journal lists every phase a tool call wrote, in order, even two in
    one millisecond that the phase file alone cannot show. Phases seen in the
    file and not yet in the journal are provisional: a journal entry that
    matches the oldest one confirms it; one that does not was missed, and is
    inserted before it. True when the history gained a phase.
    """
    assert run.run_dir is not None
    try:
        with open(Path(run.run_dir) / JOURNAL, "rb") as journal:
            journal.seek(run.journal_offset)
            data = journal.read()
    except OSError:
        return False
    complete = data[: data.rfind(b"\n") + 1]
    run.journal_offset += len(complete)
    grew = False
    for line in complete.splitlines():
        try:
            entry = json.loads(line)
            phase, at = str(entry["phase"]), float(entry["at"])
        except (ValueError, KeyError, TypeError):
            continue
        pending = run.phases[run.journal_confirmed :]
        if pending and pending[0]["phase"] == phase:
            run.journal_confirmed += 1
            continue
        last = run.phases[run.journal_confirmed - 1]["phase"] if run.journal_confirmed else None
        if not pending and phase == last:
            continue  # the same phase written again
        stamp = dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="microseconds")
        run.phases.insert(run.journal_confirmed, {"phase": phase, "at": stamp})
        run.journal_confirmed += 1
        run.final_phase = run.phases[-1]["phase"]
        grew = True
    return grew


def _drain_journal(run: Run, on_phase: Callable[[Run], None], timeout: float = 1.0) -> None:
    """Before ending on a terminal phase, let the hooks' journal catch up with it."""
    assert run.run_dir is not None
    if run.journal_offset == 0 and not (Path(run.run_dir) / HOOKS_LIVE).exists():
        return  # this agent runs no hooks: nothing to wait for
    deadline = time.monotonic() + timeout
    while run.journal_confirmed < len(run.phases) and time.monotonic() < deadline:
        time.sleep(0.02)
        if merge_journal(run):
            on_phase(run)


def started_epoch(run: Run) -> float:
    """When the run started, as a Unix time."""
    return dt.datetime.fromisoformat(run.started_at).timestamp()
