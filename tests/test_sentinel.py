"""Redis behind Sentinel: runs go on through a failover and a killed master."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from redis.sentinel import MasterNotFoundError

from tests.conftest import (
    Fleet,
    get_json,
    held_claims,
    tmux_sessions,
    wait_result,
    wait_until,
)
from tests.sentinels import MASTER_NAME, SentinelLab, doctor
from workers import registry, sentinel
from workers.locks import Lease


def test_a_run_through_sentinel_ends_done(ha_fleet: Fleet, sentinel_lab: SentinelLab) -> None:
    ha_fleet.add_agent("planner", "phase=awaiting_ci phase=done")
    ha_fleet.write_config()
    ha_fleet.start_worker()
    result = ha_fleet.run("planner", timeout=120)
    assert result["outcome"] == "done", result
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    assert held_claims(sentinel_lab.master()) == []


@pytest.mark.sentinel  # make sentinel
@pytest.mark.parametrize("fault", ["failover", "kill_master"])
def test_live_runs_come_through_a_new_master(
    ha_fleet: Fleet, sentinel_lab: SentinelLab, fault: str
) -> None:
    for name in ("first", "second"):
        ha_fleet.add_agent(name, "phase=awaiting_ci sleep=8 phase=done")
    ha_fleet.write_config()
    ha_fleet.start_worker()
    live = [ha_fleet.send_live(name, timeout=120) for name in ("first", "second")]
    old = sentinel_lab.master_port()
    assert getattr(sentinel_lab, fault)() != old
    for sent in live:
        result = wait_result(sent, 180)
        assert result["outcome"] == "done", result
        assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
        assert result["recoveries"] == 0 and result.get("restarts", 0) == 0
    assert held_claims(sentinel_lab.master()) == []
    assert tmux_sessions(ha_fleet.tmux_socket) == []
    # The worker still serves on the new master.
    assert ha_fleet.run("first", timeout=120)["outcome"] == "done"


def test_doctor_names_the_master_the_sentinels_agree_on_and_fails_an_unknown_one(
    tmp_path: Path, sentinel_lab: SentinelLab
) -> None:
    known = doctor(tmp_path, sentinel_lab.url, MASTER_NAME)
    port = sentinel_lab.master_port()
    line = f"master '{MASTER_NAME}' at 127.0.0.1:{port}: 3 of 3 Sentinels answered"
    assert line in known.stdout and "3 agree; 2 replicas" in known.stdout, known.stdout
    assert sentinel_lab.password not in known.stdout + known.stderr
    unknown = doctor(tmp_path, sentinel_lab.url, "nope")
    assert unknown.returncode == 4, unknown.stdout + unknown.stderr
    assert "knows no master 'nope'" in unknown.stdout
    assert "Traceback" not in unknown.stderr


def test_a_lease_is_on_a_replica_before_it_counts_and_a_demoted_master_never_keeps_one(
    sentinel_lab: SentinelLab,
) -> None:
    # A client as formulabeat's, but without the thread that leaves a demoted
    # master within a second: its pooled connection still reaches the old one.
    group = sentinel.EpochSentinel(  # type: ignore[no-untyped-call]
        [("127.0.0.1", port) for port in sentinel_lab.sentinel_ports],
        socket_timeout=5,
        password=sentinel_lab.password,
    )
    client: redis.Redis = group.master_for(MASTER_NAME)  # type: ignore[no-untyped-call]
    first = Lease.acquire(client, "formulabeat:lock:p:first", "run-1", "host-a", 60)
    assert first is not None
    replicas = [
        redis.Redis(port=port, password=sentinel_lab.password, socket_timeout=5)
        for port in sentinel_lab.data_ports
        if port != sentinel_lab.master_port()
    ]
    # On a replica (WAIT 1: one at least), where a failover finds it.
    assert first.token.encode() in [replica.get(first.key) for replica in replicas]
    sentinel_lab.failover()
    try:
        second = Lease.acquire(client, "formulabeat:lock:p:second", "run-2", "host-a", 60)
    except redis.ConnectionError as exc:
        # The old master took it and its replicas were gone: refused, not lost.
        assert "no longer the master" in str(exc)
        second = Lease.acquire(client, "formulabeat:lock:p:second", "run-2", "host-a", 60)
    assert second is not None
    master = sentinel_lab.master()
    assert master.get(second.key) == second.token.encode()
    assert master.get(first.key) == first.token.encode()
    client.close()


def test_no_client_is_sent_to_the_old_master_once_a_new_one_is_promoted(
    sentinel_lab: SentinelLab,
) -> None:
    # The Sentinel that leads a failover names the old master (with the new
    # epoch) until the replicas have moved; for about a second after the
    # promotion every Sentinel does. A client sent there writes what the old
    # master loses once it is made a replica.
    group = sentinel.group(
        [("127.0.0.1", port) for port in sentinel_lab.sentinel_ports], socket_timeout=5
    )
    old = ("127.0.0.1", sentinel_lab.master_port())
    others = [
        redis.Redis(port=port, password=sentinel_lab.password, socket_timeout=5)
        for port in sentinel_lab.data_ports
        if port != old[1]
    ]
    failing_over = threading.Thread(target=sentinel_lab.failover)
    failing_over.start()
    answers: collections.Counter[str] = collections.Counter()
    while failing_over.is_alive():
        promoted = any(other.info("replication")["role"] == "master" for other in others)
        try:
            master = group.discover_master(MASTER_NAME)
        except MasterNotFoundError:
            answers["none, while a failover is under way"] += 1
            continue
        if promoted:
            assert master != old, answers
            answers["the new master"] += 1
    failing_over.join()
    # (The lab's first Sentinel named the new master; another may still move its replicas.)
    sentinel_lab.wait_for(
        lambda: group.discover_master(MASTER_NAME) != old, 30, "the new master named"
    )


def _prompts(log: Path) -> dict[str, set[int]]:
    """Each run's agents that were given its prompt, from the scripted agents' log."""
    prompted: dict[str, set[int]] = collections.defaultdict(set)
    for line in log.read_text().splitlines() if log.exists() else []:
        event = json.loads(line)
        if event.get("event") == "prompt" and event.get("run"):
            prompted[event["run"]].add(event["pid"])
    return prompted


@pytest.mark.sentinel
def test_twenty_runs_started_across_a_failover_each_start_one_agent(
    ha_fleet: Fleet, sentinel_lab: SentinelLab, tmp_path: Path
) -> None:
    log = tmp_path / "agents.jsonl"
    names = [f"a{index:02d}" for index in range(20)]
    for name in names:
        ha_fleet.add_agent(name, f"log={log} phase=awaiting_ci sleep=3 phase=done")
    ha_fleet.write_config()
    ha_fleet.start_worker()
    # Its reaper sends again a step whose message went to the demoted master.
    beat, _ = ha_fleet.start_beat()
    try:
        sent = [ha_fleet.send(name) for name in names]
        sentinel_lab.failover()
        results = [wait_result(one, 240) for one in sent]
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(timeout=30)
    assert [r["outcome"] for r in results] == ["done"] * 20, [r.get("reason") for r in results]
    for result in results:
        assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    prompted = _prompts(log)
    assert {r["run_id"]: len(prompted[r["run_id"]]) for r in results} == {
        r["run_id"]: 1 for r in results
    }
    assert held_claims(sentinel_lab.master()) == []
    assert sentinel_lab.master().zcard("formulabeat:slots:default") == 0
    assert tmux_sessions(ha_fleet.tmux_socket) == []


@pytest.mark.sentinel
def test_a_beat_entry_due_during_a_failover_is_sent_once(
    ha_fleet: Fleet, sentinel_lab: SentinelLab
) -> None:
    ha_fleet.add_agent("minutely", "phase=done", schedule="* * * * *")
    ha_fleet.write_config("\n[beat]\nlock_timeout = 6\n")
    ha_fleet.start_worker()
    beat, beat_log = ha_fleet.start_beat()
    try:
        wait_until(lambda: "beat: Starting..." in beat_log.read_text(), 60, "beat to start")
        # The failover starts a second before the minute's entry is due.
        time.sleep(60 - time.time() % 60 - 1 + (60 if time.time() % 60 > 50 else 0))
        due = int(time.time() // 60 + 1) * 60
        before = len(beat_log.read_text())
        sentinel_lab.failover()
        # That minute's run and the next one's: each sent once.
        wait_until(lambda: time.time() > due + 75, 120, "the minute after")
        text = beat_log.read_text()
        assert text[before:].count("Sending due task proj/minutely") == 2, text[-3000:]
        sends = text.count("Sending due task proj/minutely")
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(timeout=30)
    client = sentinel_lab.master()

    def mine() -> list[dict[str, object]]:
        return [r for r in registry.recent(client) if r.get("agent") == "minutely"]

    wait_until(lambda: all(r.get("outcome") for r in mine()), 120, "the runs to end")
    assert len(mine()) == sends, mine()
    assert all(r.get("outcome") == "done" for r in mine()), mine()
    assert held_claims(client) == []


@pytest.mark.sentinel
def test_flower_shows_the_runs_before_and_after_a_failover(
    ha_fleet: Fleet, sentinel_lab: SentinelLab
) -> None:
    for name in ("before", "after"):
        ha_fleet.add_agent(name, "phase=done")
    _, api = ha_fleet.start_flower()

    def shown(run_id: str) -> bool:
        task = get_json(f"{api}/task/info/{run_id}")
        return isinstance(task, dict) and task.get("state") == "SUCCESS"

    first = ha_fleet.send("before")
    assert wait_result(first, 120)["outcome"] == "done"
    wait_until(lambda: shown(first.id), 60, "Flower to show the first run")
    sentinel_lab.failover()
    second = ha_fleet.send("after")
    assert wait_result(second, 120)["outcome"] == "done"
    # Flower's event receiver found the new master by itself.
    wait_until(lambda: shown(second.id), 120, "Flower to show the run after the failover")
