"""Reporting a run: result backend, Celery events, registry, metrics.

Progress is stored under the run id (the task id beat's message carried) as
a custom state whose meta is the run's snapshot, and sent as a task event
named for the phase, because Flower builds its task pages from events and
shows an event ``task-<name>`` as the state ``<NAME>`` (it drops the event's
other fields).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from tasks import metrics
from tasks.app import config, redis_client
from workers import lifecycle, registry
from workers.config import Config
from workers.run import FINAL_STATES, Run, RunEnded, RunWaiting, final_state

# Celery's own state for a task that will be tried again: a run waiting out an API error.
RETRY = "RETRY"


def snapshot_of(async_result: Any) -> dict[str, Any] | None:
    """A live run's snapshot from its AsyncResult (``RETRY`` keeps it in an exception)."""
    info = async_result.info
    if isinstance(info, RunWaiting):
        return info.result
    return info if isinstance(info, dict) and "run_id" in info else None


def _stored(meta: dict[str, Any], state: str) -> Any:
    """What the backend keeps for a live state: Celery keeps an exception for RETRY."""
    return RunWaiting(meta) if state == RETRY else meta


def result_of(async_result: Any) -> dict[str, Any] | None:
    """A finished run's result dict from its AsyncResult, whatever its state; else None."""
    if async_result.state not in FINAL_STATES:
        return None
    value = async_result.result
    if isinstance(value, RunEnded):
        return value.result
    return value if isinstance(value, dict) else None


log = logging.getLogger("formulabeat.report")


def worker_name(host: str) -> str:
    """The Celery node name of ``host``'s worker (events are sent in its name)."""
    return f"formulabeat@{host}"


class Reporter:
    """Publishes one host's view of its runs."""

    def __init__(self, app: Celery, cfg: Config, hostname: str | None) -> None:
        self.app = app
        self.cfg = cfg
        self.hostname = hostname

    def progress(self, run: Run, state: str) -> None:
        """Publish ``state`` (PREPARING, RUNNING, AWAITING_CI, …) with the run's snapshot.

        A failure is raised: the caller's lane tries again until Redis answers.
        """
        run.state = state
        meta = run.progress()
        self.app.backend.store_result(run.id, _stored(meta, state), state)
        if state == RETRY:
            # As Celery reports a task's retry: Flower shows RETRY and the error.
            with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                dispatcher.send(
                    "task-retried",
                    uuid=run.id,
                    exception=f"RunWaiting({str(RunWaiting(meta))!r})",
                    traceback="",
                    phase=run.final_phase,
                    host=run.host,
                )
        else:
            self._event(run, state.lower())
        self._record(run, meta)

    def refresh(self, run_id: str, state: str, meta: dict[str, Any]) -> None:
        """Publish a run's snapshot again in its current state (new token counts).

        No event: Flower would show it as a change of state.
        """
        self.app.backend.store_result(run_id, _stored(meta, state), state)
        registry.record(redis_client(self.cfg), meta)

    def conclude(self, run: Run) -> dict[str, Any]:
        """Clean the run up on this host and publish its end; return the result dict."""
        cfg = config()
        try:
            lifecycle.finish(run, cfg, redis_client(cfg))
        except Exception:
            log.exception("run %s: cleanup failed", run.id)
        result = run.result()
        metrics.run_ended(run)
        self.record(run, result)
        self.event(run, run.outcome or "ended")
        log.info("run %s: %s (%s)", run.id, run.outcome, run.reason or "no reason")
        return result

    def finished(self, run: Run, result: dict[str, Any]) -> None:
        """Store the result under the run id in the state its outcome calls for, say so
        as Celery does (``task-succeeded``, ``task-failed``, ``task-revoked``), and drop
        the run from its host's live runs."""
        state = final_state(run.outcome)
        with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
            if state == "SUCCESS":
                self.app.backend.store_result(run.id, result, state)
                dispatcher.send("task-succeeded", uuid=run.id, result=repr(result), runtime=0.0)
            else:
                ended = RunEnded(result)
                self.app.backend.store_result(run.id, ended, state)
                if state == "REVOKED":
                    dispatcher.send("task-revoked", uuid=run.id, terminated=False, expired=False)
                else:
                    dispatcher.send(
                        "task-failed",
                        uuid=run.id,
                        exception=f"RunEnded({str(ended)!r})",
                        traceback="",
                    )
        # Last: while its live state stands, whoever stops this host (`formulabeat
        # up`) sees a run whose end is not stored yet, and stores it.
        registry.forget(redis_client(self.cfg), run.id, run.host)

    def event(self, run: Run, name: str) -> None:
        """Send the task event ``task-<name>`` for the run (Flower shows ``<NAME>``)."""
        try:
            self._event(run, name)
        except Exception:
            log.exception("run %s: could not send event task-%s", run.id, name)

    def record(self, run: Run, snapshot: dict[str, object]) -> None:
        """Store the snapshot in the run registry, and a live run's state (:meth:`finished`
        drops an ended run's)."""
        try:
            self._record(run, snapshot)
        except Exception:
            log.exception("run %s: could not update the registry", run.id)

    def _event(self, run: Run, name: str) -> None:
        with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
            dispatcher.send(f"task-{name}", uuid=run.id, phase=run.final_phase, host=run.host)

    def _record(self, run: Run, snapshot: dict[str, object]) -> None:
        client = redis_client(self.cfg)
        registry.record(client, dict(snapshot))
        if not run.ended:
            registry.save_state(client, run.to_dict())
