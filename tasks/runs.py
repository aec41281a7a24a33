"""The run, as a chain of thin Celery tasks: run → session → monitor → report.

``formulabeat.run`` (its task id is the run id) guards, takes the lease and
prepares the worktree and prompt on whichever host took it, then replaces
itself with the rest of the chain routed to that host's own queue, because
the worktree and the tmux session live there. The chain's last task inherits
the run id, so ``AsyncResult(run_id)`` ends with the run's result dict.

No task raises for a run that goes wrong: each step records the outcome on
the run and passes it on, and ``report`` always cleans up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ParamSpec

from celery import Task, chain
from celery.exceptions import Ignore

# libtmux must be imported before Celery swaps sys.stdout (see STACK notes).
import workers.tmux  # noqa: F401
from tasks import metrics
from tasks.app import app, config, host_queue, redis_client
from tasks.reporting import Reporter
from workers import lifecycle, registry
from workers import run as outcomes
from workers.errors import FormulabeatError
from workers.phases import state_name
from workers.run import Run

log = logging.getLogger("formulabeat.runs")
P = ParamSpec("P")


def _reporter(task: Task) -> Reporter:
    return Reporter(task.app, config(), task.request.hostname)


def _guarded(
    run: Run, step: str, func: Callable[P, None], *args: P.args, **kwargs: P.kwargs
) -> None:
    """Run one step; an error ends the run as failed with a readable reason."""
    try:
        func(*args, **kwargs)
    except FormulabeatError as exc:
        run.end(outcomes.FAILED, str(exc))
    except Exception as exc:
        log.exception("run %s: %s failed", run.id, step)
        run.end(outcomes.FAILED, f"internal error in {step}: {exc!r}")


@app.task(name="formulabeat.run", bind=True)
def run(self: Task, project: str, agent: str, trigger: str = "manual") -> dict[str, Any] | None:
    """Start a run of ``project``/``agent``: guards, lease, worktree, prompt."""
    cfg = config()
    if not registry.claim(redis_client(cfg), self.request.id, cfg.host):
        # The same message delivered again (a restart, a visibility timeout):
        # the first delivery owns the run; this one must leave no trace.
        log.warning("run %s: delivered again; ignored", self.request.id)
        raise Ignore()
    current = Run(id=self.request.id, project=project, agent=agent, host=cfg.host)
    reporter = _reporter(self)
    log.info("run %s: %s/%s (%s) taken by %s", current.id, project, agent, trigger, cfg.host)
    _guarded(current, "prepare", lifecycle.prepare, current, cfg, redis_client(cfg), reporter)
    if current.ended:
        return finish(current, reporter)
    queue = host_queue(cfg.host)
    steps = chain(
        session.si(current.to_dict()).set(queue=queue),
        monitor.s().set(queue=queue),
        report.s().set(queue=queue),
    )
    raise self.replace(steps)


@app.task(name="formulabeat.session", bind=True)
def session(self: Task, data: dict[str, Any]) -> dict[str, Any]:
    """Start the agent's tmux session and deliver the prompt."""
    current = Run.from_dict(data)
    if not current.ended:
        reporter = _reporter(self)
        _guarded(current, "session", lifecycle.start, current, config(), reporter)
    return current.to_dict()


@app.task(name="formulabeat.monitor", bind=True)
def monitor(self: Task, data: dict[str, Any]) -> dict[str, Any]:
    """Follow the session until it ends; publish every phase as it appears."""
    current = Run.from_dict(data)
    if not current.ended:
        reporter = _reporter(self)

        def on_phase(changed: Run) -> None:
            assert changed.final_phase is not None
            reporter.progress(changed, state_name(changed.final_phase))
            metrics.phase_seen(changed)

        cfg = config()
        client = redis_client(cfg)
        metrics.LIVE.inc()
        try:
            _guarded(
                current, "monitor", lifecycle.monitor, current, cfg, client, on_phase, reporter
            )
        finally:
            metrics.LIVE.dec()
    return current.to_dict()


@app.task(name="formulabeat.report", bind=True)
def report(self: Task, data: dict[str, Any]) -> dict[str, Any]:
    """Release the lease, clean up, and return the run's result dict."""
    return finish(Run.from_dict(data), _reporter(self))


def finish(current: Run, reporter: Reporter) -> dict[str, Any]:
    """End the run on this host and publish its result."""
    cfg = config()
    try:
        lifecycle.finish(current, cfg, redis_client(cfg))
    except Exception:
        log.exception("run %s: cleanup failed", current.id)
    result = current.result()
    metrics.run_ended(current)
    reporter.record(current, result)
    reporter.event(current, current.outcome or "ended")
    log.info("run %s: %s (%s)", current.id, current.outcome, current.reason or "no reason")
    return result
