"""A run waiting out an API error: what its session does meanwhile, and how it goes on.

The watcher decides that a run waits (workers.monitor) and the task layer
publishes the wait (Celery's ``RETRY`` state). Here: a long wait ends the
CLI's process, whose conversation stays on disk, so that a run waiting hours
for a usage limit to reset holds no CLI in memory; when the wait is over the
agent is told to go on, in its live session with a short message, or, where
the session ended, in a new one that resumes the conversation. It is never
given the whole prompt again unless its CLI cannot resume a conversation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from workers import lifecycle, rundir
from workers.agents import driver_for
from workers.config import Config
from workers.errors import SessionError
from workers.run import Run
from workers.statedir import write_private

log = logging.getLogger("formulabeat.waiting")


def park(run: Run, cfg: Config) -> bool:
    """End the CLI's process for a wait of ``[monitor] park_after`` or more, when its
    conversation can be resumed after (an idle CLI holds hundreds of MiB)."""
    if run.mode == "oneshot" or run.waiting_until is None:
        return False
    if run.waiting_until - time.time() < cfg.monitor.park_after:
        return False
    if not lifecycle.resumable(run, cfg):
        return False
    lifecycle.kill_session(run, cfg)
    log.info("run %s: its CLI ended for the wait; resumed at the end of it", run.id)
    return True


def go_on(run: Run, cfg: Config, sink: lifecycle.ProgressSink) -> str:
    """Tell the agent to go on after its wait; how: "in its session", "resumed" or
    "reinjected" (raises SessionError when it cannot be done)."""
    assert run.run_dir and run.phase_file
    run_dir = Path(run.run_dir)
    wait = run.api_waits[-1] if run.api_waits else {}
    write_private(run_dir / rundir.RESUME, lifecycle.go_on_message(run) + "\n")
    sink.progress(run, "RESUMING")
    if _session_alive(run, cfg):
        # The confirmation must be this message's, not the prompt's.
        for marker in (rundir.PROMPT_SUBMITTED, rundir.PROMPT_DELIVERED, rundir.IDLE):
            (run_dir / marker).unlink(missing_ok=True)
        agent = cfg.agent(run.project, run.agent)
        driver = driver_for(agent)
        session = lifecycle.session_of(run, cfg)
        launch = lifecycle.launch_of(run, cfg, resume=True)
        driver.wait_ready(session, agent, launch, cfg.monitor)
        driver.deliver(session, agent, launch, cfg.monitor)
        (run_dir / rundir.PROMPT_DELIVERED).touch()
        sink.progress(run, "RUNNING")
        how = "in its session"
    else:
        lifecycle.kill_session(run, cfg)  # a dead pane tmux kept
        how = lifecycle.restart(run, cfg, sink, lifecycle.resumable(run, cfg))
    if wait:
        wait["went_on"] = how
    return how


def _session_alive(run: Run, cfg: Config) -> bool:
    if not run.session_id:
        return False
    try:
        return lifecycle.session_of(run, cfg).status()[0]
    except SessionError:
        return False
