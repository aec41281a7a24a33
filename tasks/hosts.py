"""Hosts: heartbeats, adopting a host's runs after a worker restart, reaping dead hosts.

A worker sends a heartbeat every third of ``[monitor] host_timeout``. When it
starts, it adopts its host's live runs (a previous worker was killed): their
sessions go to its watcher, which finds each still running, or ended, and
reports the right outcome; tmux sessions of runs that no longer
exist are killed, so no session outlives its run record. Any host's worker
reaps the runs of hosts whose heartbeat stopped: they end as ``lost`` and
their leases are freed, so the next schedule runs the agent elsewhere. A
host stopped with its runs (``formulabeat up``) ends what its worker left
live once that worker is gone. The reaper also sends again a run step (the
run, or its session step) whose message the broker lost: unclaimed a
visibility timeout after it was sent, in no queue and not unacked; and it
sends the runs deferred past a credential's reset (``on_limit = "defer"``)
when they are due.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import worker_init, worker_ready

from beat_schedule import DEFAULT_QUEUE, REAP_TASK, RUN_TASK
from tasks import watching
from tasks.app import VISIBILITY_TIMEOUT, app, client_app, config, redis_client
from tasks.reporting import Reporter, worker_name
from workers import lifecycle, quota, registry
from workers import run as outcomes
from workers.config import Config
from workers.lifecycle import release_claims
from workers.run import FINAL_STATES, Run, now_iso
from workers.tmux import TmuxServer

log = logging.getLogger("formulabeat.hosts")
# A message waits in a queue, or unacked while a worker holds it (and for a
# visibility timeout after that worker died); a run in neither place and
# unclaimed this long after it was sent will never be taken.
RESEND_AFTER = VISIBILITY_TIMEOUT
# Seconds between tries while Redis does not answer a heartbeat.
HEARTBEAT_RETRY = 1.0


class _HostDuty:
    """Whether this worker serves its host, decided once Redis first answers."""

    decided = threading.Event()
    others = False


def _serve_host() -> None:
    """Decide whether another worker serves this host, then heartbeat for good.

    It starts with the worker process, before Celery connects to the broker:
    a worker started while Redis is away must heartbeat the moment Redis
    returns, or its host's runs are reaped as lost while it waits to connect.
    """
    cfg = config()
    ttl = max(1, int(cfg.monitor.host_timeout))
    while not _HostDuty.decided.is_set():
        try:
            # Read before this worker's first heartbeat replaces the pid in it.
            _HostDuty.others = _another_worker_serves_this_host()
            _HostDuty.decided.set()
        except redis.exceptions.RedisError:
            time.sleep(HEARTBEAT_RETRY)
        except Exception:
            log.exception("cannot tell whether another worker serves this host")
            _HostDuty.others = True
            _HostDuty.decided.set()
    while True:
        try:
            registry.heartbeat(redis_client(cfg), cfg.host, ttl, os.getpid())
            time.sleep(max(0.5, cfg.monitor.host_timeout / 3))
        except redis.exceptions.RedisError:
            time.sleep(HEARTBEAT_RETRY)


def _another_worker_serves_this_host() -> bool:
    """Whether a live worker process on this machine already heartbeats for this host."""
    cfg = config()
    pid = registry.heartbeat_pid(redis_client(cfg), cfg.host)
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # killed: its runs are ours to adopt
    except PermissionError:
        return True
    return True


def adopt_orphans() -> list[str]:
    """Take this host's live runs over again; kill sessions no run owns."""
    cfg = config()
    client = redis_client(cfg)
    adopted = []
    states = registry.live_states(client, cfg.host)
    for state in states:
        run = Run.from_dict(state)
        log.warning("run %s: adopting it after a worker restart", run.id)
        watching.adopt(run)
        adopted.append(run.id)
    owned = {s["id"][:8] for s in states}
    agents = {(a.project, a.name) for a in cfg.agents}
    server = TmuxServer(cfg.tmux_socket)
    for name in server.session_names():
        found = re.fullmatch(r"(.+)-([0-9a-f]{8})", name)
        if not found or found.group(2) in owned:
            continue
        if any(found.group(1) == f"{project}-{agent}" for project, agent in agents):
            log.warning("killing tmux session %s: no live run owns it", name)
            server.cmd("kill-session", "-t", f"={name}")
    return adopted


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    threading.Thread(target=_serve_host, name="formulabeat-heartbeat", daemon=True).start()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    def adopt() -> None:
        _HostDuty.decided.wait()
        if _HostDuty.others:
            log.warning("another worker serves host %s: not adopting its runs", config().host)
            return
        try:
            adopt_orphans()
        except Exception:
            log.exception("adopting this host's runs failed")

    threading.Thread(target=adopt, name="formulabeat-adopt", daemon=True).start()


@app.task(name=REAP_TASK, bind=True, send_events=False)
def reap(self: Task) -> dict[str, Any]:
    """End the runs of hosts whose heartbeat stopped as ``lost``; free their leases."""
    cfg = config()
    client = redis_client(cfg)
    reporter = Reporter(self.app, cfg, self.request.hostname)
    lost = []
    for host in registry.hosts_with_live_runs(client):
        if registry.host_alive(client, host):
            continue
        for state in registry.live_states(client, host):
            run = Run.from_dict(state)
            if (registry.get(client, run.id) or {}).get("outcome"):
                # Ended, but its host went before it forgot the run: the
                # verdict stands, and only its claims are left to free.
                release_claims(run, client, cfg)
                registry.forget(client, run.id, host)
                continue
            run.end(outcomes.LOST, f"host {host} stopped sending heartbeats")
            run.finished_at = now_iso()
            run.state = "LOST"
            release_claims(run, client, cfg)
            result = run.result()
            reporter.record(run, result)
            reporter.finished(run, result)
            log.warning("run %s on host %s: lost", run.id, host)
            lost.append(run.id)
    return {
        "lost": lost,
        "resent": resend_lost(self.app, client),
        "deferred": send_deferred(self.app, client),
    }


def send_deferred(app: Celery, client: redis.Redis) -> list[str]:
    """Send the runs deferred past their credential's reset, once due (workers.quota).

    Sent before they leave the list: a reaper killed in between leaves one to
    be sent again, under the same run id, whose claim then drops the copy.
    """
    sent = []
    for run_id, message in quota.due(client).items():
        log.info("run %s: deferred past a limit's reset; sending it now", run_id)
        app.send_task(
            RUN_TASK,
            [message["project"], message["agent"]],
            {"trigger": "deferred"},
            task_id=run_id,
            queue=DEFAULT_QUEUE,
        )
        quota.sent(client, run_id)
        sent.append(run_id)
    return sent


def resend_lost(app: Celery, client: redis.Redis) -> list[str]:
    """Send again the run steps whose message the broker lost (see FormulabeatCelery)."""
    resent = []
    waiting = registry.unclaimed(client, RESEND_AFTER)
    held = _broker_messages(client) if waiting else []
    for step, message in waiting.items():
        # A run's steps share its id: the message must also name the task.
        needles = (message["task_id"].encode(), message["task"].encode())
        if any(all(needle in text for needle in needles) for text in held):
            continue
        log.warning("run step %s: never taken and gone from the broker; sending it again", step)
        app.send_task(
            message["task"],
            message["args"],
            message["kwargs"],
            task_id=message["task_id"],
            queue=message["queue"],
        )
        resent.append(step)
    return resent


def _broker_messages(client: redis.Redis) -> list[bytes]:
    """Every message kombu holds for formulabeat: in a queue's list, or unacked."""
    held = [client.hvals("unacked")]
    for key in client.scan_iter(match=f"{DEFAULT_QUEUE}*", _type="list"):
        held.append(client.lrange(key, 0, -1))
    return [m if isinstance(m, bytes) else m.encode() for part in held for m in part]


def end_runs_left(cfg: Config, who: str) -> list[str]:
    """End the runs still live on this host once its worker has stopped; their ids.

    Each ends as its watcher would have ended it: session killed (also one
    its worker began but did not record), lease and slot freed, worktree
    removed, outcome ``cancelled`` stored under the run id. A run the worker
    had decided but not finished reporting keeps that verdict, and what is
    missing of its end is done. Only for a host whose worker is gone: a live
    watcher would end the same runs at once.
    """
    client = redis_client(cfg)
    sender = client_app(cfg)
    reporter = Reporter(sender, cfg, worker_name(cfg.host))
    ended = []
    try:
        for state in registry.live_states(client, cfg.host):
            run = Run.from_dict(state)
            lifecycle.kill_session(run, cfg)
            earlier = registry.get(client, run.id) or {}
            if earlier.get("outcome"):
                run.end(earlier["outcome"], earlier.get("reason"))
                lifecycle.finish(run, cfg, client)
                if sender.AsyncResult(run.id).state in FINAL_STATES:
                    registry.forget(client, run.id, run.host)
                else:
                    reporter.finished(run, earlier)
            else:
                run.end(outcomes.CANCELLED, f"cancelled by {who}, after the worker stopped")
                reporter.finished(run, reporter.conclude(run))
            log.warning("run %s: ended %s after this host's worker stopped", run.id, run.outcome)
            ended.append(run.id)
    finally:
        sender.close()
    return ended
