"""Periodic upkeep that every host does for itself.

Run directories are host-local, so each host must clean its own. Beat sends
``formulabeat.cleanup`` to the shared queue; whichever worker takes it
broadcasts the ``formulabeat_cleanup`` remote-control command, which every
worker runs for its host (Celery's control channel reaches all workers on
Redis, where a fanout task queue does not reliably).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Task
from celery.worker.control import control_command

from beat_schedule import CLEANUP_TASK
from tasks.app import app, config
from workers.statedir import runs_dir
from workers.tmux import TmuxServer
from workers.worktrees import cleanup_stale

log = logging.getLogger("formulabeat.maintenance")
CLEANUP_COMMAND = "formulabeat_cleanup"


def cleanup_here() -> list[str]:
    """Remove this host's stale run directories (not preserved, not in use), then prune."""
    cfg = config()
    removed = cleanup_stale(
        runs_dir(cfg.state_dir),
        [p.repo_root for p in cfg.projects],
        max_age=cfg.monitor.stale_worktree_hours * 3600,
        preserved_max_age=cfg.monitor.preserved_worktree_hours * 3600,
        in_use=TmuxServer(cfg.tmux_socket).pane_paths(),
        now=time.time(),
    )
    for path in removed:
        log.info("removed stale run directory %s", path)
    return [str(p) for p in removed]


@control_command(name=CLEANUP_COMMAND)
def cleanup_command(state: Any) -> dict[str, str]:
    """Remote control: clean this host's run directories (in the background)."""
    threading.Thread(target=cleanup_here, name="formulabeat-cleanup", daemon=True).start()
    return {"ok": f"cleanup started on {config().host}"}


@app.task(name=CLEANUP_TASK, bind=True, send_events=False)
def cleanup(self: Task) -> dict[str, Any]:
    """Ask every worker to clean its host's stale run directories."""
    self.app.control.broadcast(CLEANUP_COMMAND, reply=False)
    return {"broadcast": CLEANUP_COMMAND}
