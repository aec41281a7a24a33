"""Reporting a run while it lives: result backend, Celery events, registry.

Progress is stored under the run id (the task id beat's message carried) as
a custom state whose meta is the run's snapshot, and sent as a task event
named for the phase, because Flower builds its task pages from events and
shows an event ``task-<name>`` as the state ``<NAME>`` (it drops the event's
other fields).
"""

from __future__ import annotations

import logging

from celery import Celery

from tasks.app import redis_client
from workers import registry
from workers.config import Config
from workers.run import Run

log = logging.getLogger("formulabeat.report")


class Reporter:
    """Publishes one host's view of its runs."""

    def __init__(self, app: Celery, cfg: Config, hostname: str | None) -> None:
        self.app = app
        self.cfg = cfg
        self.hostname = hostname

    def progress(self, run: Run, state: str) -> None:
        """Publish ``state`` (PREPARING, RUNNING, AWAITING_CI, …) with the run's snapshot."""
        run.state = state
        meta = run.progress()
        try:
            self.app.backend.store_result(run.id, meta, state)
        except Exception:  # the run goes on; the next report carries the same data
            log.exception("run %s: could not store state %s", run.id, state)
        self.event(run, state.lower())
        self.record(run, meta)

    def event(self, run: Run, name: str) -> None:
        """Send the task event ``task-<name>`` for the run (Flower shows ``<NAME>``)."""
        try:
            with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                dispatcher.send(f"task-{name}", uuid=run.id, phase=run.final_phase, host=run.host)
        except Exception:
            log.exception("run %s: could not send event task-%s", run.id, name)

    def record(self, run: Run, snapshot: dict[str, object]) -> None:
        """Store the snapshot in the run registry; keep or drop the live run's state."""
        try:
            client = redis_client(self.cfg)
            registry.record(client, dict(snapshot))
            if run.ended and run.finished_at:
                registry.forget(client, run.id, run.host)
            elif not run.ended:
                registry.save_state(client, run.to_dict())
        except Exception:
            log.exception("run %s: could not update the registry", run.id)
