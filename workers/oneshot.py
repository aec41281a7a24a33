"""One-shot runs: the agent as a child process with the prompt on stdin.

The original moved its planner, predictor, gardener and supervisor to
``claude -p`` runs; here the same lock, guards, timeouts and reporting apply.
The child runs in its own process group (killed whole on a timeout), its
output goes to ``output.log`` in the run directory, and its tail goes into
the result. A terminal phase in the phase file decides the outcome; without
one, the exit status does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from workers import run as outcomes
from workers.config import AgentConfig, MonitorConfig
from workers.errors import PhaseFileError
from workers.monitor import (
    Limits,
    MonitorExit,
    RunDirWake,
    check_phase,
    end_wait,
    merge_journal,
)
from workers.phases import TERMINAL, read_phase
from workers.run import Run
from workers.rundir import LAUNCH, OUTPUT

TAIL_BYTES = 2000


def run_oneshot(
    run: Run,
    agent: AgentConfig,
    timing: MonitorConfig,
    on_phase: Callable[[Run], None],
    renew: Callable[[], bool | None],
    cancelled: Callable[[], str | None] = lambda: None,
    stdin_file: Path | None = None,
) -> MonitorExit:
    """Run the agent to completion (or a timeout); the way it ended.

    It reads the prompt on stdin, or ``stdin_file`` (the go-on message of a
    run resumed after a wait for the API).
    """
    assert run.run_dir and run.prompt_file and run.phase_file
    run_dir = Path(run.run_dir)
    spec = json.loads((run_dir / LAUNCH).read_text())
    # The launch file holds the agent's whole environment (workers.environment).
    env = {str(k): str(v) for k, v in spec["env"].items()}
    output = run_dir / OUTPUT
    with open(stdin_file or run.prompt_file, "rb") as stdin, open(output, "wb") as out:
        try:
            # Below the worker's priority, as in a session (workers.launcher);
            # nice(1) rather than a preexec_fn, which is unsafe in a threaded worker.
            proc = subprocess.Popen(
                ["nice", "-n", str(spec.get("nice", 0)), *spec["argv"]],
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=spec["cwd"],
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            return MonitorExit(outcomes.FAILED, f"cannot start {spec['argv'][0]!r}: {exc.strerror}")
    try:
        ended = _follow(run, proc, output, agent, timing, on_phase, renew, cancelled)
    finally:
        _kill_group(proc)
        run.output_tail = _tail(output)
    return ended


def _follow(
    run: Run,
    proc: subprocess.Popen[bytes],
    output: Path,
    agent: AgentConfig,
    timing: MonitorConfig,
    on_phase: Callable[[Run], None],
    renew: Callable[[], bool | None],
    cancelled: Callable[[], str | None],
) -> MonitorExit:
    assert run.run_dir and run.phase_file
    limits = Limits(run, agent, timing, renew, idle_what="output or phase change")
    wake = RunDirWake(Path(run.run_dir))
    try:
        last_size = 0
        while True:
            try:
                if check_phase(run, on_phase):
                    limits.changed()
            except PhaseFileError as exc:
                return MonitorExit(outcomes.FAILED, str(exc))
            if merge_journal(run):
                on_phase(run)
            code = proc.poll()
            if code is not None:
                # Its last writes may have come between the read above and the exit.
                with contextlib.suppress(PhaseFileError):
                    check_phase(run, on_phase)
                if merge_journal(run):
                    on_phase(run)
                return _judge(run, code)
            size = output.stat().st_size
            if size != last_size:
                last_size = size
                limits.changed()
            who = cancelled()
            if who:
                return MonitorExit(outcomes.CANCELLED, f"cancelled by {who}")
            limit = limits.check()
            if limit is not None:
                return limit
            wake.wait(timing.poll_interval)
    finally:
        wake.close()


def wait_out(
    run: Run,
    agent: AgentConfig,
    timing: MonitorConfig,
    renew: Callable[[], bool | None],
    cancelled: Callable[[], str | None],
) -> MonitorExit | None:
    """Sleep until the run's wait for the API is over, keeping its lease; a cancel or a
    lost lease ends it (the MonitorExit), else None when the wait is over."""
    limits = Limits(run, agent, timing, renew)
    while run.waiting_until is not None and time.time() < run.waiting_until:
        who = cancelled()
        if who:
            return MonitorExit(outcomes.CANCELLED, f"cancelled by {who}")
        ended = limits.check(waiting=True)
        if ended is not None:
            return ended
        time.sleep(min(timing.liveness_interval, max(0.01, run.waiting_until - time.time())))
    end_wait(run)
    return None


def _judge(run: Run, code: int) -> MonitorExit:
    """A terminal phase wins; else exit status 0 is done and anything else failed."""
    assert run.phase_file
    reading = read_phase(run.phase_file)
    if reading is not None and reading.phase in TERMINAL:
        return MonitorExit(TERMINAL[reading.phase], reading.reason)
    if code == 0:
        return MonitorExit(outcomes.DONE, None)
    return MonitorExit(outcomes.FAILED, f"the agent exited with status {code}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _tail(output: Path) -> str:
    try:
        with output.open("rb") as handle:
            handle.seek(max(0, output.stat().st_size - TAIL_BYTES))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
