"""Periodic upkeep that every host does for itself.

Beat sends it to a broadcast queue, so each worker (each host) gets a copy:
run directories are host-local, so no other host can clean them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from beat_schedule import CLEANUP_TASK
from tasks.app import app, config
from workers.statedir import runs_dir
from workers.tmux import TmuxServer
from workers.worktrees import cleanup_stale

log = logging.getLogger("formulabeat.maintenance")


@app.task(name=CLEANUP_TASK, bind=True)
def cleanup(self: Task) -> dict[str, Any]:
    """Remove this host's stale run worktrees (not preserved, not in use), then prune."""
    cfg = config()
    hours = cfg.monitor.stale_worktree_hours
    removed = cleanup_stale(
        runs_dir(cfg.state_dir),
        [p.repo_root for p in cfg.projects],
        max_age=hours * 3600,
        preserved_max_age=cfg.monitor.preserved_worktree_hours * 3600,
        in_use=TmuxServer(cfg.tmux_socket).pane_paths(),
        now=time.time(),
    )
    for path in removed:
        log.info("removed stale run directory %s", path)
    return {"host": cfg.host, "removed": [str(p) for p in removed]}
