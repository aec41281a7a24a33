"""The run, as two thin Celery tasks: ``run`` on any host, ``session`` on its host.

``formulabeat.run`` (its task id is the run id) guards, takes the lease and
prepares the worktree and prompt on whichever host took it, then replaces
itself with ``formulabeat.session`` (same task id) on that host's own queue, because the
worktree and the tmux session live there. ``session`` starts the agent,
delivers the prompt and hands the session to the host's watcher
(tasks.watching), which publishes every phase and, when the run ends,
stores its result dict under the run id: ``AsyncResult(run_id)`` ends with
it. Neither task holds a worker slot while the agent works.

Each step claims itself in Redis before acting, so a message delivered twice
(a visibility timeout, a restart) does nothing the second time. No task
raises for a run that goes wrong: the outcome is recorded on the run, and
whatever ends it cleans up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ParamSpec

import redis
from celery import Task, signals, states
from celery.exceptions import Ignore
from kombu.exceptions import OperationalError

# libtmux must be imported before Celery swaps sys.stdout (see STACK notes).
import workers.tmux  # noqa: F401
from tasks import metrics, watching
from tasks.app import SESSION_TASK, app, config, host_queue, redis_client, stale_config
from workers import lifecycle, registry
from workers import run as outcomes
from workers.config import Config
from workers.errors import ConfigError, FormulabeatError
from workers.lanes import with_redis
from workers.phases import state_name
from workers.run import Run

log = logging.getLogger("formulabeat.runs")
P = ParamSpec("P")


def _guarded(
    run: Run, step: str, func: Callable[P, None], *args: P.args, **kwargs: P.kwargs
) -> None:
    """Run one step; an error ends the run as failed with a readable reason."""
    try:
        func(*args, **kwargs)
    except Exception as exc:
        _fail(run, step, exc)


def _fail(run: Run, step: str, exc: Exception) -> None:
    """End the run as failed for ``exc``, with the reason the user needs."""
    if isinstance(exc, ConfigError):
        stale = stale_config()
        run.end(outcomes.FAILED, f"{exc}; {stale}" if stale else str(exc))
    elif isinstance(exc, FormulabeatError):
        run.end(outcomes.FAILED, str(exc))
    elif isinstance(exc, OSError):
        # The path is what the operator needs; repr() of the error hides it.
        log.error("run %s: %s failed", run.id, step, exc_info=exc)
        where = f" {exc.filename}" if exc.filename else ""
        run.end(outcomes.FAILED, f"{step}:{where}: {exc.strerror or exc}")
    else:
        log.error("run %s: %s failed", run.id, step, exc_info=exc)
        run.end(outcomes.FAILED, f"internal error in {step}: {exc!r}")


@signals.task_postrun.connect
def _forget_ignored_traceback(retval: object = None, state: str | None = None, **_: object) -> None:
    """Drop the traceback of the Ignore every run step ends with.

    It holds Celery's tracer frame, whose locals hold the ExceptionInfo made
    of it: a cycle left to the garbage collector, some 50 KB a step (billiard
    copies the tracer's code positions), churned through on every run.
    """
    if state == states.IGNORED and isinstance(retval, BaseException):
        retval.__traceback__ = None


def _claim(step: str, take: Callable[[redis.Redis], bool]) -> None:
    """Take this step of the run, or ignore a repeated delivery."""
    if not with_redis(lambda: take(redis_client(config()))):
        # The first delivery owns the step; this one must leave no trace.
        log.warning("run %s: delivered again; ignored", step)
        raise Ignore()


# Acked when it returns: a worker killed before it claimed the run leaves the
# message to come back after the visibility timeout (see tasks.app). It is
# short; a copy redelivered while it waits for a slot finds the claim.
@app.task(name="formulabeat.run", bind=True, acks_late=True)
def run(self: Task, project: str, agent: str, trigger: str = "manual") -> None:
    """Start a run of ``project``/``agent``: guards, lease, worktree, prompt."""
    cfg = config()
    current = Run(id=self.request.id, project=project, agent=agent, host=cfg.host, state="CLAIMED")
    state = current.to_dict()
    owner = watching.claim_owner()
    _claim(current.id, lambda client: registry.claim_run(client, state, owner))
    sink = watching.sink()
    sink.progress(current, "CLAIMED")
    log.info("run %s: %s/%s (%s) taken by %s", current.id, project, agent, trigger, cfg.host)
    current = _prepare(current, cfg, sink)
    if not current.ended:
        # The session step takes the run id as its task id, as Task.replace
        # would; sent by hand so that a Redis restart is waited out.
        data = current.to_dict()
        try:
            with_redis(
                lambda: session.apply_async((data,), task_id=current.id, queue=host_queue(cfg.host))
            )
        except (OperationalError, redis.exceptions.RedisError) as exc:
            current.end(outcomes.FAILED, f"could not queue the session step: {exc}")
    if current.ended:
        watching.conclude(current)
    raise Ignore()


# Redis going away while a run is prepared is waited out, and the run prepared
# again from the start (its lease, slot and run directory given back first).
PREPARE_TRIES = 3
_REDIS_AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)


def _prepare(current: Run, cfg: Config, sink: lifecycle.ProgressSink) -> Run:
    """Prepare the run (guards, lease, slot, formula, worktree, prompt); the run prepared."""
    pristine = current.to_dict()
    for attempt in range(1, PREPARE_TRIES + 1):
        try:
            lifecycle.prepare(current, cfg, redis_client(cfg), sink)
            return current
        except _REDIS_AWAY as exc:
            if attempt == PREPARE_TRIES:
                current.end(outcomes.FAILED, f"Redis kept going away while it was prepared: {exc}")
                return current
            log.warning("run %s: Redis went away while preparing (%s); again", current.id, exc)
            with_redis(lambda: redis_client(cfg).ping())
            lifecycle.undo_prepare(current, cfg, redis_client(cfg))
            current = Run.from_dict(pristine)
        except Exception as exc:
            _fail(current, "prepare", exc)
            return current
    return current


@app.task(name=SESSION_TASK, bind=True)
def session(self: Task, data: dict[str, Any]) -> None:
    """Start the agent and deliver the prompt; hand the session to the watcher."""
    current = Run.from_dict(data)
    cfg = config()
    step = registry.session_step(current.id)
    owner = watching.claim_owner()
    _claim(step, lambda client: registry.claim(client, step, owner))
    client = redis_client(cfg)
    ended = (with_redis(lambda: registry.get(client, current.id)) or {}).get("outcome")
    if ended:
        # Reaped (its host was silent) or cancelled before this message came:
        # its verdict stands, and no session may outlive it.
        log.warning("run %s: already ended %s; no session started", current.id, ended)
        lifecycle.finish(current, cfg, client)
        raise Ignore()
    sink = watching.sink()
    if current.mode == "oneshot":

        def on_phase(changed: Run) -> None:
            assert changed.final_phase is not None
            metrics.phase_seen(changed)
            sink.progress(changed, state_name(changed.final_phase))

        metrics.LIVE.inc()
        try:
            _guarded(
                current,
                "oneshot",
                lifecycle.monitor_oneshot,
                current,
                cfg,
                client,
                on_phase,
                watching.begin_wait,
                sink,
            )
        finally:
            metrics.LIVE.dec()
        if current.usage:
            watching.count_usage(current, current.usage)
    elif with_redis(lifecycle.renewer(current, cfg, client)) is False:
        # The queue held the step longer than the lease lasts, and another run
        # took the agent meanwhile: this one must not start a second agent.
        current.end(outcomes.LOST_LEASE, "the agent's lease is no longer ours")
    else:
        _guarded(current, "session", lifecycle.start, current, cfg, sink)
        if not current.ended:
            _guarded(current, "monitor", watching.follow, current)
    if current.ended:
        watching.conclude(current)
    # The watcher stores the run's result; this task stores nothing.
    raise Ignore()
