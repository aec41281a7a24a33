"""Three hosts as network namespaces on one Redis: failures a fleet meets.

Each scenario starts a worker per host (its own namespace, tmux socket and
state dir) and breaks one thing: a worker killed with -9, a whole host gone,
a host's link cut for longer than the lease, Redis restarted, a run
delivered twice, a run cancelled from another host. Every scenario ends with
no session left on any host and no lease or slot held.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from beat_schedule import REAP_TASK
from tasks.app import client_app
from tests.conftest import commit_files, formula_text, held_claims, tmux_sessions, wait_until
from tests.netlab import LabHost, NetLab, host_config, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

SCENARIOS = {
    "planner": "phase=awaiting_ci sleep=6 phase=done",
    "gardener": "phase=awaiting_ci sleep=120",
    "predictor": "sleep=2 phase=awaiting_ci sleep=5 phase=done",
}
LEASE_SECONDS = 10


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NetLab]:
    """Three hosts with a worker each, on a Redis of their own."""
    files = {f"formulas/{n}.toml": formula_text(n, s) for n, s in SCENARIOS.items()}
    commit_files(tmp_path / "project", {"README.md": "# proj\n", **files})
    commit_files(tmp_path / "ops", {"journal.md": "# journal\n"})
    net = NetLab(tmp_path)
    try:
        net.start()
        text = host_config(net.host_url, list(SCENARIOS), LEASE_SECONDS, host_timeout=3)
        for name in ("h1", "h2", "h3"):
            net.start_worker(net.add_host(name, text))
        yield net
    finally:
        net.close()


def _client(net: NetLab) -> redis.Redis:
    assert net.redis is not None
    return net.redis.client()


def _send(net: NetLab, agent: str, task_id: str | None = None) -> Any:
    app = client_app(net.hosts["h1"].config())
    return app.send_task(
        "formulabeat.run", args=["proj", agent], queue="formulabeat", task_id=task_id
    )


def _record(net: NetLab, run_id: str) -> dict[str, Any]:
    raw = _client(net).get(f"formulabeat:run:{run_id}")
    return json.loads(raw) if raw else {}


def _wait_live(net: NetLab, run_id: str, state: str = "AWAITING_CI") -> LabHost:
    wait_until(lambda: _record(net, run_id).get("state") == state, 60, f"run {run_id} {state}")
    return net.hosts[_record(net, run_id)["host"]]


def _wait_outcome(net: NetLab, run_id: str, timeout: float = 90) -> dict[str, Any]:
    return wait_until(
        lambda: _record(net, run_id) if _record(net, run_id).get("outcome") else None,
        timeout,
        f"run {run_id} to end",
    )


def _sessions(net: NetLab) -> dict[str, list[str]]:
    return {name: tmux_sessions(h.tmux_socket) for name, h in net.hosts.items()}


def _assert_clean(net: NetLab) -> None:
    wait_until(lambda: not any(_sessions(net).values()), 30, "every session to be gone")
    wait_until(lambda: held_claims(_client(net)) == [], 30, "every lease and slot to be free")


def _reap_until(net: NetLab, run_id: str, timeout: float = 60) -> dict[str, Any]:
    app = client_app(net.hosts["h1"].config())

    def reaped() -> dict[str, Any] | None:
        app.send_task(REAP_TASK, queue="formulabeat")
        time.sleep(1)
        record = _record(net, run_id)
        return record if record.get("outcome") else None

    result: dict[str, Any] = wait_until(reaped, timeout, f"the reaper to end run {run_id}")
    return result


def _log(host: LabHost) -> str:
    """What the host's workers logged (each worker started appends to it)."""
    path = host.config_path.parent / f"logs-{host.name}" / "worker.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _other(net: NetLab, host: LabHost) -> LabHost:
    return next(h for h in net.hosts.values() if h is not host)


def test_a_worker_killed_mid_run_is_restarted_and_adopts_it(lab: NetLab) -> None:
    sent = _send(lab, "planner")
    host = _wait_live(lab, sent.id)
    lab.kill_worker(host)
    assert len(tmux_sessions(host.tmux_socket)) == 1  # the agent lives on
    lab.start_worker(host)
    result = _wait_outcome(lab, sent.id)
    assert result["outcome"] == "done", result
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    assert sent.get(timeout=30)["outcome"] == "done"
    _assert_clean(lab)


def test_a_vanished_host_has_its_run_lost_and_the_agent_runs_elsewhere(lab: NetLab) -> None:
    sent = _send(lab, "gardener")
    host = _wait_live(lab, sent.id)
    lab.kill_host(host)
    result = _reap_until(lab, sent.id)
    assert result["outcome"] == "lost"
    assert result["reason"] == f"host {host.name} stopped sending heartbeats"
    assert held_claims(_client(lab)) == []
    again = _send(lab, "gardener")
    assert _wait_live(lab, again.id) is not host
    _client(lab).set(f"formulabeat:cancel:{again.id}", "test")
    assert _wait_outcome(lab, again.id)["outcome"] == "cancelled"
    _assert_clean(lab)


def test_a_host_cut_off_longer_than_the_lease_stops_its_own_run(lab: NetLab) -> None:
    sent = _send(lab, "gardener")
    host = _wait_live(lab, sent.id)
    lab.cut(host)
    try:
        # Unable to renew for a whole lease, the host kills its session itself,
        # with no word from anyone: no second copy can run beside it.
        wait_until(
            lambda: tmux_sessions(host.tmux_socket) == [],
            LEASE_SECONDS * 3,
            "the cut-off host to stop its session",
        )
        assert _reap_until(lab, sent.id)["outcome"] == "lost"
        again = _send(lab, "gardener")
        assert _wait_live(lab, again.id) is not host
        _client(lab).set(f"formulabeat:cancel:{again.id}", "test")
        assert _wait_outcome(lab, again.id)["outcome"] == "cancelled"
    finally:
        lab.restore(host)
    # Back on the network, the host finds its run given up and leaves it so.
    wait_until(
        lambda: f"run {sent.id}: already ended lost; lost_lease not reported" in _log(host),
        60,
        "the host to find its run given up",
    )
    assert _record(lab, sent.id)["outcome"] == "lost"
    _assert_clean(lab)


def test_a_redis_restart_loses_no_phase_on_any_host(lab: NetLab) -> None:
    sent = [_send(lab, "predictor"), _send(lab, "planner")]
    for result in sent:
        wait_until(
            lambda r=result: _record(lab, r.id).get("state") in ("RUNNING", "AWAITING_CI"),
            60,
            "the runs to start",
        )
    lab.restart_redis(down_seconds=3)  # phases are written while Redis is away
    for result in sent:
        record = _wait_outcome(lab, result.id, 120)
        assert record["outcome"] == "done", record
        assert [p["phase"] for p in record["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    _assert_clean(lab)


def test_a_run_delivered_twice_starts_one_session(lab: NetLab) -> None:
    first = _send(lab, "planner")
    _send(lab, "planner", task_id=first.id)
    host = _wait_live(lab, first.id)
    wait_until(
        lambda: any(
            f"run {first.id}: delivered again; ignored" in _log(h) for h in lab.hosts.values()
        ),
        60,
        "the second delivery to be taken and ignored",
    )
    sessions = _sessions(lab)
    assert sum(len(names) for names in sessions.values()) == 1, sessions
    assert len(sessions[host.name]) == 1
    assert _wait_outcome(lab, first.id)["outcome"] == "done"
    _assert_clean(lab)


def test_a_run_is_cancelled_from_another_host(lab: NetLab) -> None:
    sent = _send(lab, "gardener")
    host = _wait_live(lab, sent.id)
    other = _other(lab, host)
    proc = subprocess.run(
        [
            *other.wrap(),
            sys.executable,
            "-m",
            "tasks.cli",
            "--config",
            str(other.config_path),
            "cancel",
            sent.id,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = _wait_outcome(lab, sent.id)
    assert result["outcome"] == "cancelled"
    assert f"cancelled by {other.name}" in result["reason"] or "cancelled by" in result["reason"]
    _assert_clean(lab)
