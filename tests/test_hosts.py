"""Worker kill -9 and restart: the run is adopted; a host that disappears: its runs are lost."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import redis

from beat_schedule import REAP_TASK, RUN_TASK
from tasks.app import SESSION_TASK, client_app, host_queue
from tasks.hosts import RESEND_AFTER, resend_lost
from tasks.reporting import result_of
from tests.conftest import Fleet, held_claims, tmux_sessions, wait_result, wait_until
from workers import lifecycle, registry
from workers.config import load_config
from workers.locks import Lease, agent_lock_key
from workers.run import Run
from workers.slots import Slots


def _kill_worker(fleet: Fleet, host: str) -> None:
    stack = next(s for s in fleet.stacks if s.cfg.host == host)
    for name, proc in stack.procs:
        if name == "worker":
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    stack.procs.clear()
    fleet.stacks.remove(stack)


def _run(number: int, agent: str = "planner", host: str = "host-a", **fields: Any) -> Run:
    """A run of project ``proj`` made up by a test (its id says so)."""
    run_id = f"0badc1a1-0000-4000-8000-{number:012d}"
    return Run(id=run_id, project="proj", agent=agent, host=host, **fields)


def test_a_killed_worker_comes_back_and_adopts_its_run(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("planner", "phase=awaiting_ci sleep=6 phase=done")
    fleet.write_config()
    fleet.start_worker("host-a")
    sent = fleet.send_live("planner")
    _kill_worker(fleet, "host-a")
    assert len(tmux_sessions(fleet.tmux_socket)) == 1  # the session outlives the worker
    fleet.start_worker("host-a")
    result = wait_result(sent, 90)
    assert result["outcome"] == "done"
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    assert tmux_sessions(fleet.tmux_socket) == []
    assert redis_client.get(agent_lock_key("proj", "planner")) is None
    log = (fleet.root / "logs-host-a" / "worker.log").read_text()
    assert f"run {sent.id}: adopting it after a worker restart" in log


def test_a_run_claimed_by_a_worker_killed_at_once_is_adopted_not_lost(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    # The claim saves the run's live state in the same step, so a worker
    # killed right after it leaves a run its host's next worker takes up.
    fleet.add_agent("planner")
    fleet.write_config()
    state = _run(1, state="CLAIMED")
    assert registry.claim_run(redis_client, state.to_dict(), "host-a:1:first")
    # Its reply lost (Redis restarting), the same delivery asks again: still its own.
    assert registry.claim_run(redis_client, state.to_dict(), "host-a:1:first")
    again = {**state.to_dict(), "state": "PREPARING"}
    assert not registry.claim_run(redis_client, again, "host-a:1:second")
    assert [s["state"] for s in registry.live_states(redis_client, "host-a")] == ["CLAIMED"]
    # Killed after taking the lease and a slot, before either was published.
    assert Lease.acquire(redis_client, agent_lock_key("proj", "planner"), state.id, "host-a", 300)
    assert Slots(redis_client, "default", 300).try_acquire(state.id, 64)
    # No agent had started: the next worker prepares the run again, and it runs.
    _prepared_again_and_done(fleet, redis_client, state.id)


def _prepared_again_and_done(fleet: Fleet, redis_client: redis.Redis, run_id: str) -> None:
    """The host's next worker prepares the run again; it ends done, nothing left held."""
    fleet.start_worker("host-a")
    result = wait_result(client_app(load_config(fleet.config_path)).AsyncResult(run_id), 60)
    assert result["outcome"] == "done", result
    assert result["restarts"] == 1
    assert registry.live_states(redis_client, "host-a") == []
    assert held_claims(redis_client) == []


def test_a_run_whose_state_names_an_older_lease_token_is_prepared_again_not_skipped(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    # Its worker took the lease and published PREPARING, gave the lease back
    # (Redis went away: the preparation starts over), took it again and died
    # before the new token was published. The saved state names a token no
    # longer held; the lease is still the run's own (make chaos REDIS=sentinel
    # found two runs skipped "already running" by themselves).
    fleet.add_agent("planner")
    fleet.write_config()
    run = _run(7, state="CLAIMED")
    assert registry.claim_run(redis_client, run.to_dict(), "host-a:1:first")
    key = agent_lock_key("proj", "planner")
    first = Lease.acquire(redis_client, key, run.id, "host-a", 300)
    assert first is not None and first.release(redis_client)
    published = {**run.to_dict(), "state": "PREPARING", "lease_key": key}
    registry.save_state(redis_client, {**published, "lease_token": first.token})
    assert Lease.acquire(redis_client, key, run.id, "host-a", 300)
    _prepared_again_and_done(fleet, redis_client, run.id)


def test_a_prepared_run_whose_session_step_waits_is_left_to_that_step(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    # The worker died right after it prepared the run and sent its session
    # step: the next worker's adopter must not fail the run under the step.
    log = fleet.root / "agent.jsonl"
    fleet.add_agent("planner", f"log={log} phase=done")
    cfg = dataclasses.replace(fleet.write_config(), host="host-a")
    run = _run(5)
    assert registry.claim_run(redis_client, {**run.to_dict(), "state": "CLAIMED"}, "dead:1:x")

    class Saved:
        def progress(self, changed: Run, state: str) -> None:
            changed.state = state
            registry.save_state(redis_client, changed.to_dict())

    lifecycle.prepare(run, cfg, redis_client, Saved())
    assert not run.ended and run.state == "PREPARING"
    app = client_app(cfg)
    app.send_task(SESSION_TASK, args=[run.to_dict()], task_id=run.id, queue=host_queue("host-a"))
    fleet.start_worker("host-a")
    result = wait_result(app.AsyncResult(run.id), 60)
    assert result["outcome"] == "done", result["reason"]
    prompts = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "prompt"]
    assert len(prompts) == 1
    worker_log = (fleet.root / "logs-host-a" / "worker.log").read_text()
    assert f"run {run.id}: its session step takes it from PREPARING" in worker_log
    assert tmux_sessions(fleet.tmux_socket) == []
    assert held_claims(redis_client) == []


def test_a_prompted_session_whose_running_state_was_not_published_is_followed(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    # A worker killed between pasting the prompt and publishing RUNNING leaves
    # the run recorded as STARTING: the adopter must not prompt a second agent.
    log = fleet.root / "agent.jsonl"
    fleet.add_agent("planner", f"log={log} sleep=6 phase=done")
    fleet.write_config()
    fleet.start_worker("host-a")
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RUNNING", 60, "the prompt to be delivered")
    _kill_worker(fleet, "host-a")
    key = f"formulabeat:state:{sent.id}"
    state = json.loads(redis_client.get(key) or b"{}")
    redis_client.set(key, json.dumps({**state, "state": "STARTING"}), keepttl=True)
    fleet.start_worker("host-a")
    result = wait_result(sent, 90)
    assert result["outcome"] == "done"
    assert result["recoveries"] == 0
    prompts = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "prompt"]
    assert len(prompts) == 1
    assert tmux_sessions(fleet.tmux_socket) == []


def test_the_runs_of_a_vanished_host_are_reaped_as_lost(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("planner", "phase=awaiting_ci sleep=120")
    fleet.write_config()
    text = fleet.config_path.read_text().replace(
        "ready_quiet = 0.2", "ready_quiet = 0.2\nhost_timeout = 2"
    )
    fleet.config_path.write_text(text)
    fleet.start_worker("host-a")
    fleet.start_worker("host-b")
    sent = fleet.send_live("planner")
    host = sent.info["host"]
    # The whole host goes: its worker and its tmux server.
    _kill_worker(fleet, host)
    subprocess.run(["tmux", "-L", fleet.tmux_socket, "kill-server"], timeout=10, check=False)
    app = client_app(load_config(fleet.config_path))
    # A run that ended there, but whose host went before it forgot the run.
    ended = _run(3, agent="gardener", host=host)
    registry.record(redis_client, {**ended.progress(), "outcome": "done"})
    registry.save_state(redis_client, ended.to_dict())
    reaped_ids: list[str] = []

    def reaped() -> bool:
        reaped_ids.extend(app.send_task(REAP_TASK, queue="formulabeat").get(timeout=30)["lost"])
        return sent.state == "FAILURE"

    wait_until(reaped, 60, "the reaper to mark the run lost")
    assert reaped_ids == [sent.id]
    assert (registry.get(redis_client, ended.id) or {})["outcome"] == "done"
    assert registry.live_states(redis_client, host) == []
    result = result_of(sent)
    assert result is not None and result["outcome"] == "lost"
    assert result["reason"] == f"host {host} stopped sending heartbeats"
    assert redis_client.get(agent_lock_key("proj", "planner")) is None
    record = json.loads(redis_client.get(f"formulabeat:run:{sent.id}") or b"{}")
    assert record["outcome"] == "lost"
    # The lease is free: the next run starts on the surviving host.
    survivor = next(s.cfg.host for s in fleet.stacks)
    sent_again = fleet.send("planner")
    wait_until(lambda: sent_again.state == "AWAITING_CI", 60, "the next run to start")
    assert sent_again.info["host"] == survivor


def test_a_run_the_broker_lost_is_sent_again_and_a_queued_one_is_not(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("planner")
    fleet.add_agent("gardener")
    app = client_app(fleet.write_config())
    lost, queued = fleet.send("planner"), fleet.send("gardener")
    # What kombu does for a worker killed right after its BRPOP: the message
    # has left the queue's list and never reached the unacked hash.
    popped = redis_client.rpop("formulabeat")
    assert isinstance(popped, bytes) and lost.id.encode() in popped
    long_ago = time.time() - 2 * RESEND_AFTER
    redis_client.zadd(registry.SENT_KEY, {lost.id: long_ago, queued.id: long_ago})
    assert resend_lost(app, redis_client) == [lost.id]
    assert resend_lost(app, redis_client) == []  # written down again as it was sent
    fleet.start_worker()
    assert wait_result(lost, 60)["outcome"] == "done"
    assert wait_result(queued, 60)["outcome"] == "done"
    assert redis_client.zcard(registry.SENT_KEY) == 0


def test_a_lost_session_step_is_sent_again_to_its_host_and_claiming_it_clears_the_ledger(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    # Redis stopped (or the worker died) between kombu's BRPOP of a session
    # step and its unacked record: the run is claimed, its session never starts.
    fleet.add_agent("planner")
    app = client_app(fleet.write_config())
    run = _run(4)
    step = registry.session_step(run.id)
    # The run's own message still waits as unacked: it names the run id too.
    redis_client.hset("unacked", "tag", json.dumps([{"headers": {"id": run.id, "task": RUN_TASK}}]))
    queue = host_queue("host-a")
    app.send_task(SESSION_TASK, args=[run.to_dict()], task_id=run.id, queue=queue)
    redis_client.zadd(registry.SENT_KEY, {step: time.time() - 2 * RESEND_AFTER})
    assert resend_lost(app, redis_client) == []  # still in its host's queue
    popped = redis_client.rpop(queue)
    assert isinstance(popped, bytes) and run.id.encode() in popped
    redis_client.zadd(registry.SENT_KEY, {step: time.time() - 2 * RESEND_AFTER})
    assert resend_lost(app, redis_client) == [step]
    again = redis_client.lrange(queue, 0, -1)
    assert len(again) == 1 and json.loads(again[0])["headers"]["task"] == SESSION_TASK
    assert json.loads(again[0])["headers"]["id"] == run.id
    assert registry.claim(redis_client, step, "host-a:1:first")
    assert redis_client.zscore(registry.SENT_KEY, step) is None
    assert registry.claim(redis_client, step, "host-a:1:first")  # asked again
    assert not registry.claim(redis_client, step, "host-a:1:second")  # delivered again


def test_a_session_step_arriving_after_its_run_was_reaped_starts_nothing(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    # Its worker was killed before taking the session step; the host was
    # silent long enough to be reaped; then a new worker gets the message.
    fleet.add_agent("planner")
    app = client_app(fleet.write_config())
    run = _run(2)
    registry.record(redis_client, {**run.progress(), "outcome": "lost"})
    fleet.start_worker("host-a")
    app.send_task(SESSION_TASK, args=[run.to_dict()], queue=host_queue("host-a"))
    log = fleet.root / "logs-host-a" / "worker.log"
    wait_until(lambda: "already ended lost; no session started" in log.read_text(), 30)
    assert tmux_sessions(fleet.tmux_socket) == []
    assert (registry.get(redis_client, run.id) or {})["outcome"] == "lost"


def test_an_ended_run_handed_to_the_watcher_again_keeps_its_outcome(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    # Adoption can read a run as live just before its watch ends; following
    # it again then finds its run dir gone. The first verdict must stand.
    fleet.add_agent("planner", "phase=awaiting_ci sleep=2 phase=done")
    fleet.write_config()
    fleet.start_worker("host-a")
    sent = fleet.send_live("planner")
    live = registry.live_states(redis_client, "host-a")
    assert wait_result(sent, 60)["outcome"] == "done"
    _kill_worker(fleet, "host-a")
    registry.save_state(redis_client, live[0])  # read as live by the adopter
    fleet.start_worker("host-a")
    log = fleet.root / "logs-host-a" / "worker.log"
    wait_until(lambda: f"run {sent.id}: already ended done" in log.read_text(), 30)
    assert (registry.get(redis_client, sent.id) or {})["outcome"] == "done"
    assert sent.result["outcome"] == "done"
    assert registry.live_states(redis_client, "host-a") == []
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_a_worker_killed_while_starting_the_agent_is_not_the_agents_crash(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    # The agent takes 4 s to start; its worker is killed during that, twice.
    # Each next worker starts it again without spending the run's one recovery.
    log = fleet.root / "agent.jsonl"
    slow = f"{sys.executable} -m workers.scripted_agent --startup-delay 4"
    fleet.add_agent("planner", f"log={log} phase=done", command=slow, driver="scripted")
    fleet.write_config()
    fleet.start_worker("host-a")
    sent = fleet.send("planner")
    for restarts in range(2):

        def starting(restarts: int = restarts) -> bool:
            state = json.loads(redis_client.get(f"formulabeat:state:{sent.id}") or b"{}")
            return state.get("state") == "STARTING" and state.get("restarts") == restarts

        wait_until(starting, 60, "the agent to be starting")
        _kill_worker(fleet, "host-a")
        fleet.start_worker("host-a")
    result = wait_result(sent, 90)
    assert result["outcome"] == "done", result
    assert (result["restarts"], result["recoveries"]) == (2, 0)
    prompts = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "prompt"]
    assert len(prompts) == 1
    assert tmux_sessions(fleet.tmux_socket) == []
    assert held_claims(redis_client) == []
