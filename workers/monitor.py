"""Watching a live session: the phase file, the pane, the clocks and the lease.

These decide how one session ends and return that as a value; the host's
watcher (workers.watcher) feeds them events and checks for every session at
once, and the caller decides what follows (recover once after a crash, or
end the run).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from workers import run as outcomes
from workers.apierrors import RESET_MARGIN, ApiFailure, format_time, read_record, retry_delay
from workers.config import AgentConfig, MonitorConfig
from workers.errors import PhaseFileError, SessionError
from workers.phases import TERMINAL, read_phase
from workers.run import Run, now_iso
from workers.rundir import EXITED, HOOKS_LIVE, IDLE, JOURNAL
from workers.tmux import AgentSession
from workers.usage import Meter, Usage, over_budget

# Checks (at the liveness interval) with an idle agent and no phase before
# the run is given up as idle_prompt, as the original did with its polls.
IDLE_PROMPT_CHECKS = 3
JOURNAL_DRAIN_SECONDS = 1.0
TRANSCRIPT_QUIET_SECONDS = 0.5

_WAKE_MASK = (
    inotify_flags.CLOSE_WRITE | inotify_flags.MODIFY | inotify_flags.MOVED_TO | inotify_flags.CREATE
)


@dataclass(frozen=True)
class MonitorExit:
    """How a session ended: an outcome and a reason (None for a plain done)."""

    outcome: str
    reason: str | None = None


@dataclass(frozen=True)
class WaitOver:
    """The run's wait for the API has ended: its agent is to be told to go on."""


# What ends the watcher's following of a session.
WatchEnd = MonitorExit | WaitOver


class Limits:
    """The limits every kind of run shares: idle time, wall-clock cap, lease renewal.

    ``renew`` answers True (renewed), False (the lease is someone else's now)
    or None (Redis did not answer). Redis away is not the lease lost, until
    the lease has certainly run out: then the run stops itself rather than
    run on beside a second copy started elsewhere.
    """

    def __init__(
        self,
        run: Run,
        agent: AgentConfig,
        timing: MonitorConfig,
        renew: Callable[[], bool | None],
        idle_what: str = "phase change",
    ) -> None:
        self.run = run
        self.agent = agent
        self.timing = timing
        self.renew = renew
        self.idle_what = idle_what
        self.started = started_epoch(run)
        self.last_change = self.last_confirmed = time.monotonic()
        # Renewed at the first check: the steps before (the agent's start, the
        # go-on after a wait, a worker's restart) renewed nothing.
        self.last_renew = float("-inf")

    def changed(self) -> None:
        """Something happened: the idle clock starts again."""
        self.last_change = time.monotonic()

    def working(self, at: float | None = None) -> float:
        """Seconds the run has worked: since it started, less its waits for the API."""
        return (at or time.time()) - self.started - self.run.waited_seconds

    def check(self, waiting: bool = False) -> MonitorExit | None:
        """How the run must end now, if a limit is reached (renewing the lease when due).

        ``waiting``: the run waits out an API error, which is neither idling nor
        working: only its lease is kept.
        """
        now = time.monotonic()
        if waiting:
            self.last_change = now
        elif now - self.last_change >= self.agent.idle_timeout:
            return MonitorExit(
                outcomes.IDLE_TIMEOUT, f"no {self.idle_what} for {self.agent.idle_timeout:g} s"
            )
        if not waiting and self.working() >= self.agent.max_runtime:
            return MonitorExit(
                outcomes.FAILED, f"max_runtime of {self.agent.max_runtime:g} s reached"
            )
        if now - self.last_renew >= self.timing.lease_seconds / 3:
            renewed = self.renew()
            if renewed is False:
                return MonitorExit(outcomes.LOST_LEASE, "the agent's lease is no longer ours")
            if renewed:
                self.last_renew = self.last_confirmed = now
            elif now - self.last_confirmed >= self.timing.lease_seconds:
                return MonitorExit(
                    outcomes.LOST_LEASE,
                    f"the lease could not be renewed for {self.timing.lease_seconds:g} s "
                    "(Redis unreachable): stopped so that no second copy runs",
                )
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


class SessionWatch:
    """What the host's watcher knows of one live session, and how it judges it.

    ``scan`` runs when the run directory changes (the phase file, the hooks'
    journal, a marker); ``check`` runs at the liveness interval with the
    pane's state and any cancel request, read for all sessions at once.
    Neither blocks: they return how the session must end, or None.
    """

    def __init__(
        self,
        run: Run,
        session: AgentSession,
        agent: AgentConfig,
        timing: MonitorConfig,
        on_phase: Callable[[Run], None],
        renew: Callable[[], bool | None],
        explain: Callable[[str, str], str],
        meter: Meter | None = None,
        on_usage: Callable[[Run, Usage], None] = lambda run, fresh: None,
        judge: Callable[[str, str, float], ApiFailure] | None = None,
        on_wait: Callable[[Run, ApiFailure], None] = lambda run, failure: None,
    ) -> None:
        assert run.phase_file is not None and run.run_dir is not None
        self.run = run
        self.agent = agent
        # The driver's judgement of an API error that ended a turn (None: the
        # CLI reports none), and who publishes a wait that begins.
        self.judge = judge
        self.on_wait = on_wait
        # Counts the run's tokens from its CLI's transcript (None: no transcript).
        self.meter = meter
        self.on_usage = on_usage
        # (how it ended, its last screen) -> the reason, from the agent's driver.
        self.explain = explain
        self.session = session
        self.on_phase = on_phase
        self.run_dir = Path(run.run_dir)
        self.limits = Limits(run, agent, timing, renew)
        self.idle_checks = 0
        self.terminal: MonitorExit | None = None
        self.timing = timing
        self.drain_until = self.turn_until = self.terminal_at = 0.0
        self.transcript_stamp: tuple[int, int] | None = None
        self.transcript_since = 0.0
        self.next_count = 0.0
        self.wd: int | None = None  # the watcher's inotify watch on run_dir

    def scan(self) -> MonitorExit | None:
        """Take in what the agent wrote; a terminal phase ends the session."""
        run = self.run
        try:
            if check_phase(run, self.on_phase):
                self.limits.changed()
                self.idle_checks = 0
        except PhaseFileError as exc:
            return MonitorExit(outcomes.FAILED, str(exc))
        if merge_journal(run):
            self.on_phase(run)
        if self.terminal is None:
            outcome = TERMINAL.get(run.final_phase or "")
            if outcome is None:
                return self._api_error()
            assert run.phase_file is not None
            reading = read_phase(run.phase_file)
            self.terminal = MonitorExit(outcome, reading.reason if reading else None)
            hooks = run.journal_offset > 0 or (self.run_dir / HOOKS_LIVE).exists()
            now = time.monotonic()
            # The hooks' journal may trail the phase file by a moment: give it
            # up to a second to confirm what happened before the terminal phase.
            self.drain_until = now + JOURNAL_DRAIN_SECONDS if hooks else 0.0
            # A CLI with a transcript is let finish its turn (its Stop hook
            # says when), so that its last response is counted, not cut off.
            self.terminal_at = time.time()
            self.turn_until = now + self.timing.finish_grace if self.meter else 0.0
        now = time.monotonic()
        drained = run.journal_confirmed >= len(run.phases) or now >= self.drain_until
        finished = now >= self.turn_until or (self._turn_ended() and self._transcript_quiet(now))
        if drained and finished:
            return self.terminal
        return None

    @property
    def waiting(self) -> bool:
        """Whether the run waits out an API error now."""
        return self.run.waiting_until is not None

    def _api_error(self) -> MonitorExit | None:
        """Judge a new API-error record: fail the run, or begin a wait (None)."""
        if self.judge is None:
            return None
        verdict = judge_api_error(self.run, self.agent, self.judge)
        if isinstance(verdict, ApiFailure):
            self.on_wait(self.run, verdict)
            return None
        return verdict

    def _wait_check(self, cancelled_by: str | None) -> WatchEnd | None:
        """While the run waits: a cancel, the lease, and the end of the wait."""
        if cancelled_by:
            return MonitorExit(outcomes.CANCELLED, f"cancelled by {cancelled_by}")
        ended = self.limits.check(waiting=True)
        if ended is not None:
            return ended
        run = self.run
        assert run.waiting_until is not None
        if time.time() < run.waiting_until:
            return None
        end_wait(run)
        return WaitOver()

    def _transcript_quiet(self, now: float) -> bool:
        """Whether the transcript stopped growing: the CLI writes its last lines after
        its Stop hook now and then (measured with 2.1.197)."""
        if not self.run.transcript:
            return True
        try:
            info = os.stat(self.run.transcript)
        except OSError:
            return True
        stamp = (info.st_size, info.st_mtime_ns)
        if stamp != self.transcript_stamp:
            self.transcript_stamp, self.transcript_since = stamp, now
        return now - self.transcript_since >= TRANSCRIPT_QUIET_SECONDS

    def _turn_ended(self) -> bool:
        try:
            return (self.run_dir / IDLE).stat().st_mtime >= self.terminal_at - 1.0
        except OSError:
            return False

    def exited(self) -> bool:
        """Whether the run directory says the agent's process has ended."""
        return (self.run_dir / EXITED).exists() or (
            self.session.exit_file is not None and self.session.exit_file.exists()
        )

    def ended_reason(self, how: str | None) -> str:
        """Why the session ended: how, and the last lines of its screen (kept by remain-on-exit)."""
        screen = ""
        if how != "its tmux session is gone":
            with contextlib.suppress(SessionError):
                screen = self.session.capture()
        return self.explain(f"the agent's session ended ({how})", screen)

    def count(self, now: bool = False) -> None:
        """Count what the transcript gained since the last look (and report it).

        A look every ``usage_interval`` seconds (``now``: at once): a line a
        second costs about as much to read as five lines every five seconds.
        """
        if self.meter is None:
            return
        at = time.monotonic()
        if not now and at < self.next_count:
            return
        self.next_count = at + self.timing.usage_interval
        fresh = self.meter.update()
        if fresh:
            self.on_usage(self.run, fresh)

    def check(self, alive: bool, how: str | None, cancelled_by: str | None) -> WatchEnd | None:
        """The periodic check: liveness, a cancel request, the idle prompt, budget, limits.

        While the run waits for the API its session may end (or be ended, so
        that a long wait holds no CLI in memory): the wait goes on, and the
        conversation is resumed when it is over.
        """
        if not alive:
            ended = self.scan()  # it may have written its phase on the way out
            if ended is not None or self.terminal is not None:
                return ended or self.terminal
            if not self.waiting:
                return MonitorExit(outcomes.CRASHED, self.ended_reason(how))
        if self.waiting:
            return self._wait_check(cancelled_by)
        if cancelled_by:
            return MonitorExit(outcomes.CANCELLED, f"cancelled by {cancelled_by}")
        idle = self.run.final_phase is None and (self.run_dir / IDLE).exists()
        self.idle_checks = self.idle_checks + 1 if idle else 0
        if self.idle_checks >= IDLE_PROMPT_CHECKS:
            return MonitorExit(
                outcomes.FAILED,
                "idle_prompt: the agent returned to its prompt without writing a phase",
            )
        spent = over_budget(
            self.run.usage, self.run.cost_usd, self.agent.max_tokens, self.agent.max_cost_usd
        )
        if spent:
            return MonitorExit(outcomes.OVER_BUDGET, spent)
        return self.limits.check()


def judge_api_error(
    run: Run, agent: AgentConfig, judge: Callable[[str, str, float], ApiFailure]
) -> MonitorExit | ApiFailure | None:
    """A new API-error record in the run directory, judged by the agent's driver.

    A permanent error, tries spent or a reset too far away: the MonitorExit
    that ends the run. A transient one: the wait begins (``run.waiting_until``
    and a new entry in ``run.api_waits``) and the failure is returned, for the
    caller to publish. None: no record that was not judged before.
    """
    assert run.run_dir is not None
    record = read_record(run.run_dir)
    if record is None or record.at <= run.api_error_seen:
        return None
    run.api_error_seen = record.at
    now = time.time()
    failure = judge(record.kind, record.message, now)
    what = failure.describe()
    if not failure.transient:
        return MonitorExit(outcomes.FAILED, f"api_error: {what} ({failure.fix})")
    if run.api_retries >= agent.api_retries:
        return MonitorExit(
            outcomes.FAILED,
            f"api_error: {what}; gave up after {run.api_retries} wait(s) for the API "
            f"(api_retries = {agent.api_retries})",
        )
    if failure.reset_at is not None:
        until = max(now, failure.reset_at) + RESET_MARGIN
    else:
        until = now + retry_delay(agent.api_retry_delay, run.api_retries + 1)
    if until - now > agent.max_runtime:
        # A weekly limit is not waited out by one run: new runs are skipped
        # until it resets (workers.quota), and this one says when that is.
        return MonitorExit(
            outcomes.FAILED,
            f"api_error: {what}; it resets at {format_time(until)}, longer away than "
            f"max_runtime ({agent.max_runtime:g} s)",
        )
    run.api_retries += 1
    run.waiting_until = until
    run.api_waits.append(
        {
            "at": now_iso(),
            "since": now,
            "error": what,
            "kind": failure.kind,
            "try": run.api_retries,
            "of": agent.api_retries,
            "until": until,
            "until_text": format_time(until),
            "reset_stated": failure.reset_at is not None,
        }
    )
    return failure


def end_wait(run: Run) -> None:
    """The run's wait is over: its time goes to ``waited_seconds`` (not working time)."""
    now = time.time()
    since = float(run.api_waits[-1].get("since", now)) if run.api_waits else now
    run.waited_seconds += max(0.0, now - since)
    run.waiting_until = None


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


def started_epoch(run: Run) -> float:
    """When the run started, as a Unix time."""
    return dt.datetime.fromisoformat(run.started_at).timestamp()
