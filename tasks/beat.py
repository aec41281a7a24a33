"""Beat's scheduler: redbeat's, following the config file while beat runs.

An agent added, removed or rescheduled in the file is scheduled from the next
tick (at most ``beat_max_loop_interval``, 5 s, away); ``SIGHUP`` asks for the
same at once, and no longer stops beat.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any

from redbeat import RedBeatScheduler

from beat_schedule import build_schedule
from tasks.app import config

log = logging.getLogger("formulabeat.beat")


class Scheduler(RedBeatScheduler):
    """RedBeatScheduler whose static entries are the current config's agents."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._hangup = False
        super().__init__(*args, **kwargs)
        self._following = config()
        # Outside beat's main thread (an embedded beat) no handler can be set:
        # the file is still followed.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._hangup = True

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Reschedule first if the config changed, then redbeat's tick."""
        self._follow_config()
        interval: float = super().tick(*args, **kwargs)
        return interval

    def _follow_config(self) -> None:
        cfg = config()
        if cfg is self._following and not self._hangup:
            return
        self._hangup = False
        self._following = cfg
        self.app.conf.beat_schedule = build_schedule(cfg)
        # Drops the entries of agents no longer there, adds and updates the rest.
        self.setup_schedule()
        log.info("beat: schedule of %s now has %d agents", cfg.path, len(cfg.agents))
