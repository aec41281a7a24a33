"""This worker's watcher: sessions handed to it, and what follows their end.

The ``monitor`` task hands a run whose session is up to the host's watcher
(workers.watcher) and returns its worker slot, so an idle session costs no
slot. Each phase the watcher sees is published in the run's lane, in order,
retried while Redis is away. When a session ends, a first crash is started
again (on a small pool, since waiting for the agent's prompt blocks);
anything else concludes the run in its lane: cleanup, then the result under
the run id, which is where ``AsyncResult(run_id)`` and the CLI look.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tasks import metrics
from tasks.app import app, config, redis_client
from tasks.reporting import Reporter, worker_name
from workers import lifecycle, quota, registry, spending, usage, waiting
from workers import run as outcomes
from workers.apierrors import RESET_MARGIN, ApiFailure, format_time
from workers.errors import FormulabeatError
from workers.lanes import REDIS_PATIENCE, RETRYABLE, Lanes, with_redis
from workers.monitor import MonitorExit, SessionWatch, WaitOver, WatchEnd
from workers.phases import state_name
from workers.run import Run
from workers.tmux import TmuxServer
from workers.usage import Usage
from workers.watcher import HostWatcher

log = logging.getLogger("formulabeat.watching")

# The watcher's Redis calls are cut short: it must not stall every session
# for one slow answer (the lease tells when an unreachable Redis ends a run).
WATCHER_REDIS_TIMEOUT = 3.0
# How often a run's tokens go to Redis (the day's counters, its live state).
USAGE_REPORT_SECONDS = 30.0
# States in which the run's session was being started when its worker died.
STARTING_STATES = ("STARTING", "RECOVERING")
# The run was telling its agent to go on after a wait for the API.
RESUMING = "RESUMING"
# Starts done again for a run whose worker kept dying while starting its agent.
MAX_RESTARTS = 3


@dataclass
class _Host:
    watcher: HostWatcher
    lanes: Lanes
    recoveries: ThreadPoolExecutor
    reporter: Reporter
    # Tokens counted and not yet reported, and when each run's were last reported.
    usage_lock: threading.Lock = field(default_factory=threading.Lock)
    pending_usage: dict[str, Usage] = field(default_factory=dict)
    usage_reported: dict[str, float] = field(default_factory=dict)


_host: _Host | None = None
_host_lock = threading.Lock()


def _this_host() -> _Host:
    global _host
    with _host_lock:
        if _host is None:
            cfg = config()
            watcher = HostWatcher(
                TmuxServer(cfg.tmux_socket),
                redis_client(cfg, WATCHER_REDIS_TIMEOUT),
                cfg.monitor,
                _ended,
            )
            _host = _Host(
                watcher=watcher,
                lanes=Lanes(name="report"),
                recoveries=ThreadPoolExecutor(4, thread_name_prefix="formulabeat-recover"),
                reporter=Reporter(app, cfg, worker_name(cfg.host)),
            )
            watcher.start()
        return _host


class _LaneSink:
    """A ProgressSink that publishes through the run's lane (in order, retried).

    STARTING, which names the run's session, is waited for: should the worker
    die, its adopter tells an agent that has its prompt (follow it) from a run
    to prepare again by that record, so the record must come before the
    prompt. (make chaos REDIS=sentinel: with the lane slow through a failover,
    an agent got its prompt, did its work, and its run was prepared again.)
    """

    def __init__(self, host: _Host) -> None:
        self.host = host

    def progress(self, run: Run, state: str) -> None:
        run.state = state
        snapshot = Run.from_dict(run.to_dict())
        reporter = self.host.reporter
        self.host.lanes.submit(run.id, lambda: reporter.progress(snapshot, state))
        if state == "STARTING" and not self.host.lanes.settle(run.id, REDIS_PATIENCE):
            log.warning("run %s: its session is not recorded yet; giving the prompt anyway", run.id)


def sink() -> lifecycle.ProgressSink:
    """Where this worker's run steps publish their progress: the run's lane."""
    return _LaneSink(_this_host())


def follow(run: Run) -> None:
    """Hand a run whose session is up to this host's watcher."""
    host = _this_host()
    cfg = config()
    sink = _LaneSink(host)

    def on_phase(changed: Run) -> None:
        assert changed.final_phase is not None
        metrics.phase_seen(changed)
        sink.progress(changed, state_name(changed.final_phase))

    watch = lifecycle.session_watch(
        run, cfg, redis_client(cfg, WATCHER_REDIS_TIMEOUT), on_phase, count_usage, begin_wait
    )
    # Handed over twice (adoption racing a late hand-off), it is followed once.
    if host.watcher.add(watch):
        metrics.LIVE.inc()


def begin_wait(run: Run, failure: ApiFailure) -> None:
    """A run's turn ended on a transient API error: publish its wait (Celery's RETRY).

    A reset time the CLI stated goes to Redis for every host (new runs of the
    credential are not started until then); a long wait ends the CLI's process.
    Called on the watcher's thread: the Redis work goes to the run's lane.
    """
    host = _this_host()
    cfg = config()
    wait = run.api_waits[-1]
    log.warning(
        "run %s: %s; waiting (try %s of %s) until %s",
        run.id,
        wait["error"],
        wait["try"],
        wait["of"],
        wait["until_text"],
    )
    metrics.api_wait(run, failure.kind)
    if failure.reset_at is not None:
        credential = cfg.agent(run.project, run.agent).credential
        reset, error = failure.reset_at, failure.describe()

        def note() -> None:
            quota.note_limited(redis_client(cfg), credential, reset, error, run.id, run.host)

        host.lanes.submit(run.id, note)
    _LaneSink(host).progress(run, "RETRY")
    waiting.park(run, cfg)


def count_usage(run: Run, fresh: Usage) -> None:
    """New tokens of a run: metrics at once; the day's counters and the live state in Redis
    at most every USAGE_REPORT_SECONDS per run (tokens come with every response: one
    report each would queue phase reports behind them)."""
    host = _this_host()
    metrics.tokens_counted(run, fresh)
    now = time.monotonic()
    with host.usage_lock:
        pending = host.pending_usage.setdefault(run.id, {})
        for model, kinds in fresh.items():
            usage.add(pending, model, kinds)
        if now - host.usage_reported.get(run.id, 0.0) < USAGE_REPORT_SECONDS:
            return
        host.usage_reported[run.id] = now
    _report_usage(host, run)
    meta, state = run.progress(), run.state
    host.lanes.submit(run.id, lambda: host.reporter.refresh(run.id, state, meta))


def _report_usage(host: _Host, run: Run) -> None:
    """Add the run's tokens not yet reported to the day's counters, in its lane."""
    with host.usage_lock:
        batch = host.pending_usage.pop(run.id, None)
    if not batch:
        return
    cfg = config()
    agent = cfg.agent(run.project, run.agent)
    number = time.time_ns()

    def add() -> None:
        # A lane step of its own, numbered: tried again, it adds the tokens once.
        client = redis_client(cfg)
        keep = cfg.history_keep_days
        spending.record(client, agent, batch, cfg.prices, keep, run_id=run.id, batch=number)

    host.lanes.submit(run.id, add)


def claimant() -> str:
    """Who takes run steps here: this host's worker process.

    An adopter tells a step its own worker runs from one a dead worker took.
    """
    return f"{config().host}:{os.getpid()}"


def claim_owner() -> str:
    """The owner of one delivery's claim of a step: this worker process and a nonce."""
    return f"{claimant()}:{uuid.uuid4().hex}"


def adopt(run: Run) -> None:
    """Take a live run of this host over after its worker died."""
    if run.mode == "oneshot" or not run.session_id:
        if _session_step_takes(run):
            log.info("run %s: its session step takes it from %s", run.id, run.state)
            return
        lifecycle.kill_session(run, config())  # one the dead worker began
        if run.mode == "oneshot":
            # The agent was the dead worker's child: it cannot be picked up.
            run.end(outcomes.FAILED, f"the worker on host {run.host} stopped during {run.state}")
            conclude(run)
        else:
            # No agent had started: the run is prepared again, here.
            _this_host().recoveries.submit(_prepare_again, run)
    elif run.state in STARTING_STATES and not lifecycle.prompt_delivered(run):
        # The agent never got its prompt: start the session again.
        _this_host().recoveries.submit(_start_again, run)
    elif run.state == RESUMING and not lifecycle.prompt_delivered(run):
        # It died telling the agent to go on after a wait: tell it again.
        _this_host().recoveries.submit(_go_on, run)
    else:
        if run.state in STARTING_STATES:
            # The prompt went in, but RUNNING died with the worker's lane.
            _LaneSink(_this_host()).progress(run, "RUNNING")
        follow(run)


def _session_step_takes(run: Run) -> bool:
    """Whether the run's session step will start it, or this worker starts it now.

    Otherwise the step is claimed here, so that its message, if the dead
    worker had it reserved and Redis delivers it again, does nothing.
    """
    client = redis_client(config())
    step = registry.session_step(run.id)
    if registry.awaits_claim(client, step):
        return True  # sent: it waits in a queue, or the reaper sends it again
    if registry.claim(client, step, claim_owner()):
        return False  # never sent: its worker died before
    owner = registry.claimed_by(client, step) or ""
    return owner.rpartition(":")[0] == claimant()


def conclude(run: Run) -> None:
    """Clean the ended run up and store its result, in its lane."""
    host = _this_host()
    _report_usage(host, run)
    with host.usage_lock:
        host.usage_reported.pop(run.id, None)
    host.lanes.submit(run.id, lambda: _store_end(host, run))


def _store_end(host: _Host, run: Run) -> None:
    client = redis_client(config())
    client.ping()  # Redis away: the lane tries again, so the end is not lost
    earlier = (registry.get(client, run.id) or {}).get("outcome")
    if earlier:
        # The run has its verdict already: the reaper gave it up while this
        # host was out of reach, or an ended run was handed to the watcher
        # once more (adoption racing its hand-off) and found its run dir
        # gone. The first verdict stands; this host only cleans up.
        log.warning("run %s: already ended %s; %s not reported", run.id, earlier, run.outcome)
        lifecycle.finish(run, config(), client)
        registry.forget(client, run.id, run.host)
        return
    host.reporter.finished(run, host.reporter.conclude(run))


def _ended(watch: SessionWatch, ended: WatchEnd) -> None:
    metrics.LIVE.dec()
    if isinstance(ended, WaitOver):
        # Delivering waits for the agent's prompt: not on the watcher's thread.
        _this_host().recoveries.submit(_go_on, watch.run)
        return
    _handle_end(watch.run, ended)


def _prepare_again(run: Run) -> None:
    """Its worker died while preparing it, before any agent started: prepare it anew.

    What the dead worker took (lease, slot, run directory) is given back
    first; then the run goes as its session step would have.
    """
    cfg = config()
    client = redis_client(cfg)
    log.warning("run %s: its worker stopped during %s; preparing it again", run.id, run.state)
    lifecycle.undo_prepare(run, cfg, client)
    fresh = Run(
        id=run.id,
        project=run.project,
        agent=run.agent,
        host=run.host,
        started_at=run.started_at,
        restarts=run.restarts + 1,
    )
    if run.restarts >= MAX_RESTARTS:
        fresh.end(outcomes.FAILED, f"the worker stopped while preparing it, {fresh.restarts} times")
        conclude(fresh)
        return
    sink = _LaneSink(_this_host())

    def prepare_and_start() -> None:
        lifecycle.prepare(fresh, cfg, client, sink)
        if not fresh.ended:
            lifecycle.start(fresh, cfg, sink)

    _then_follow(fresh, prepare_and_start, outcomes.FAILED, "preparing it again failed: ")


def _start_again(run: Run) -> None:
    """Its worker died while it started the agent: start it again, as it was starting it.

    The worker's death is not the agent's crash, so the run's one recovery
    is kept; a run whose start kills its worker again and again gives up.
    """
    cfg = config()
    lifecycle.kill_session(run, cfg)  # what the dead worker had started
    if run.restarts >= MAX_RESTARTS:
        run.end(outcomes.CRASHED, f"the worker stopped while starting it, {run.restarts + 1} times")
        conclude(run)
        return
    run.restarts += 1
    _then_follow(
        run,
        lambda: lifecycle.restart(run, cfg, _LaneSink(_this_host()), lifecycle.resumable(run, cfg)),
        outcomes.FAILED,
        "could not start it again after its worker stopped: ",
    )


def _go_on(run: Run) -> None:
    """The run's wait for the API is over: tell its agent to go on, and follow it again.

    A credential that another run learnt is limited for longer is waited out
    first, without counting a try.
    """
    cfg = config()
    credential = cfg.agent(run.project, run.agent).credential
    try:
        limit = with_redis(lambda: quota.limited(redis_client(cfg), credential))
    except RETRYABLE:
        limit = None  # Redis away: go on; the agent meets the limit again if it holds
    if limit is not None and run.api_waits:
        wait = run.api_waits[-1]
        run.waiting_until = limit.until + RESET_MARGIN
        wait.update(until=run.waiting_until, until_text=format_time(run.waiting_until))
        log.info("run %s: its credential stays limited until %s", run.id, wait["until_text"])
        _LaneSink(_this_host()).progress(run, "RETRY")
        follow(run)
        return

    def go_on() -> None:
        how = waiting.go_on(run, cfg, _LaneSink(_this_host()))
        log.info("run %s: went on after its wait (%s)", run.id, how)

    _then_follow(run, go_on, outcomes.FAILED, "could not go on after waiting for the API: ")


def _handle_end(run: Run, ended: MonitorExit) -> None:
    lifecycle.kill_session(run, config())
    if lifecycle.may_recover(run, ended):
        _this_host().recoveries.submit(_recover, run, ended)
        return
    run.end(ended.outcome, ended.reason)
    conclude(run)


def _recover(run: Run, ended: MonitorExit) -> None:
    _then_follow(
        run,
        lambda: lifecycle.recover(run, config(), _LaneSink(_this_host())),
        outcomes.CRASHED,
        f"{ended.reason}; recovery failed: ",
    )


def _then_follow(run: Run, step: Callable[[], object], outcome: str, failed: str) -> None:
    """Do ``step`` (it starts or prompts the run's agent), then follow the run; a step that
    fails ends the run with ``outcome``, the reason ``failed`` and the error."""
    try:
        step()
        if run.ended:  # (a run prepared again may be skipped)
            conclude(run)
        else:
            follow(run)
    except FormulabeatError as exc:
        lifecycle.kill_session(run, config())
        run.end(outcome, f"{failed}{exc}")
        conclude(run)
    except Exception as exc:
        log.exception("run %s: %s", run.id, failed.rstrip(": "))
        lifecycle.kill_session(run, config())
        run.end(outcome, f"{failed}{exc!r}")
        conclude(run)
