"""A run end to end: real Celery worker, Redis, tmux and git, scripted agent."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from tasks.reporting import result_of
from tests.conftest import Fleet, tmux_sessions, wait_result, wait_until
from workers import registry
from workers.locks import Lease, agent_lock_key


def _worktrees(fleet: Fleet) -> list[str]:
    import git

    listing = git.Repo(fleet.repo).git.worktree("list", "--porcelain")
    return [line for line in listing.splitlines() if line.startswith("worktree ")]


def test_done_run_reports_each_phase_and_cleans_up(fleet: Fleet, redis_client: redis.Redis) -> None:
    fleet.add_agent("planner", "phase=awaiting_ci sleep=1.5 phase=done")
    fleet.write_config()
    fleet.start_worker()
    sent = fleet.send("planner")

    # While it lives, the run id shows the phase as a custom state with meta.
    # One read of the backend for both: `sent.state` then `sent.info` are two,
    # and on a busy machine the run moved on between them.
    def awaiting() -> dict[str, object] | None:
        stored = sent.backend.get_task_meta(sent.id)
        info = stored["result"]
        return info if stored["status"] == "AWAITING_CI" and isinstance(info, dict) else None

    meta = wait_until(awaiting, 60, "state AWAITING_CI")
    assert meta["host"] == "host-a"
    assert str(meta["session"]).startswith("proj-planner-")
    assert [p["phase"] for p in meta["phases"]] == ["PHASE:awaiting_ci"]

    result = wait_until(lambda: result_of(sent), 60, "result")
    assert result["outcome"] == "done"
    assert result["final_phase"] == "PHASE:done"
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    assert result["host"] == "host-a"
    assert result["reason"] is None
    for key in ("session", "worktree", "started_at", "finished_at"):
        assert result[key], key
    assert result["phases"][0]["at"] <= result["phases"][1]["at"]
    # Cleaned up: no session, no worktree, no lease.
    assert tmux_sessions(fleet.tmux_socket) == []
    assert not Path(result["worktree"]).exists()
    assert len(_worktrees(fleet)) == 1
    assert redis_client.get(agent_lock_key("proj", "planner")) is None
    assert registry.get(redis_client, sent.id)["outcome"] == "done"


def test_failed_phase_carries_its_reason(fleet: Fleet) -> None:
    fleet.add_agent("gardener", "phase=failed:tests_are_red")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("gardener")
    assert result["outcome"] == "failed"
    assert result["final_phase"] == "PHASE:failed"
    assert result["reason"] == "tests are red"


def test_escalate_and_merged_end_the_run(fleet: Fleet) -> None:
    fleet.add_agent("supervisor", "phase=escalate")
    fleet.add_agent("merger", "phase=merged")
    fleet.write_config()
    fleet.start_worker()
    assert fleet.run("supervisor")["outcome"] == "escalate"
    assert fleet.run("merger")["outcome"] == "merged"


def test_crash_keeps_the_worktree_with_a_marker(fleet: Fleet) -> None:
    fleet.add_agent("predictor", "sleep=0.2 crash")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("predictor")
    assert result["outcome"] == "crashed"
    assert "session ended" in result["reason"]
    worktree = Path(result["worktree"])
    assert worktree.is_dir()
    assert result["worktree_preserved"] is True
    marker = json.loads((worktree.parent / "PRESERVED.json").read_text())
    assert "session ended" in marker["reason"]
    assert tmux_sessions(fleet.tmux_socket) == []


def test_idle_session_is_killed_after_idle_timeout(fleet: Fleet) -> None:
    fleet.add_agent("idler", "sleep=60", idle_timeout=1.5)
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("idler")
    assert result["outcome"] == "idle_timeout"
    assert "no phase change for 1.5 s" in result["reason"]
    assert tmux_sessions(fleet.tmux_socket) == []


def test_agent_held_by_a_live_run_is_skipped_with_the_holder(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("planner")
    fleet.write_config()
    fleet.start_worker()
    key = agent_lock_key("proj", "planner")
    lease = Lease.acquire(redis_client, key, "other-run-id", "host-z", 60)
    assert lease is not None
    result = fleet.run("planner")
    assert result["outcome"] == "skipped"
    assert "other-run-id" in result["reason"] and "host-z" in result["reason"]
    # The skipped run did not take or drop someone else's lease.
    assert redis_client.get(key) == lease.token.encode()
    assert tmux_sessions(fleet.tmux_socket) == []


def test_disabled_and_low_memory_agents_are_skipped_with_reasons(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("off", enabled=False)
    fleet.add_agent("hungry", min_memory_mb=10**9)
    fleet.write_config()
    fleet.start_worker()
    off = fleet.run("off")
    assert off["outcome"] == "skipped" and "disabled" in off["reason"]
    hungry = fleet.run("hungry")
    assert hungry["outcome"] == "skipped"
    assert "low memory" in hungry["reason"] and "1000000000" in hungry["reason"]


def test_bad_formula_fails_the_run_and_leaves_nothing(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("broken")
    (fleet.repo / "formulas" / "broken.toml").write_text('name = "broken"\n')
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("broken")
    assert result["outcome"] == "failed"
    assert result["reason"].endswith("has no steps: add at least one [[steps]] table")
    assert "broken.toml" in result["reason"]
    assert redis_client.get(agent_lock_key("proj", "broken")) is None
    runs = fleet.root / "state" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_missing_agent_command_fails_clearly(fleet: Fleet, redis_client: redis.Redis) -> None:
    fleet.add_agent("ghost", command="no-such-agent-cli --flag")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("ghost")
    assert result["outcome"] == "failed"
    assert "'no-such-agent-cli'" in result["reason"] and "not found on PATH" in result["reason"]
    assert redis_client.get(agent_lock_key("proj", "ghost")) is None


def test_an_agent_back_at_its_prompt_is_nudged_into_writing_its_phase(fleet: Fleet) -> None:
    fleet.add_agent("forgetful", "idle")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("forgetful")
    assert result["outcome"] == "done"
    assert result["nudges"] == 1


def test_an_agent_that_ignores_two_nudges_ends_as_idle_prompt(fleet: Fleet) -> None:
    fleet.add_agent("deaf", "deaf idle")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("deaf")
    assert result["outcome"] == "failed"
    assert result["reason"].startswith("idle_prompt")
    assert result["nudges"] == 2
    assert tmux_sessions(fleet.tmux_socket) == []


def test_a_crashed_session_is_recovered_once_with_the_prompt_again(fleet: Fleet) -> None:
    # crash_once: the first session dies, the recovered one finishes.
    fleet.add_agent("flaky", "phase=awaiting_ci crash_once phase=done")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("flaky")
    assert result["outcome"] == "done"
    assert result["recoveries"] == 1
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    assert result["worktree_preserved"] is False


def test_a_second_crash_ends_the_run_as_crashed(fleet: Fleet) -> None:
    fleet.add_agent("doomed", "phase=awaiting_ci crash")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("doomed")
    assert result["outcome"] == "crashed"
    assert result["recoveries"] == 1
    assert result["worktree_preserved"] is True


def test_cancel_from_another_host_kills_the_session_and_frees_the_lease(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    import os
    import subprocess
    import sys

    fleet.add_agent("stuck", "phase=awaiting_ci sleep=120")
    fleet.write_config()
    fleet.start_worker("host-a")
    sent = fleet.send_live("stuck")
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--config", str(fleet.config_path), "cancel", sent.id],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "FORMULABEAT_HOST": "host-b"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("cancelled (cancelled by formulabeat cancel on host host-b)")
    result = wait_result(sent)
    assert result["outcome"] == "cancelled"
    assert tmux_sessions(fleet.tmux_socket) == []
    assert redis_client.get(agent_lock_key("proj", "stuck")) is None


def test_the_same_run_delivered_twice_starts_one_session(fleet: Fleet) -> None:
    from tasks.app import client_app
    from workers.config import load_config

    fleet.add_agent("once", "phase=awaiting_ci sleep=1 phase=done")
    fleet.write_config()
    fleet.start_worker("host-a")
    fleet.start_worker("host-b")
    app = client_app(load_config(fleet.config_path))
    first = app.send_task("formulabeat.run", args=["proj", "once"], queue="formulabeat")
    app.send_task("formulabeat.run", args=["proj", "once"], queue="formulabeat", task_id=first.id)
    result = wait_result(first)
    assert result["outcome"] == "done"
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]

    def logs() -> str:
        return "".join(
            (fleet.root / f"logs-{host}" / "worker.log").read_text()
            for host in ("host-a", "host-b")
        )

    wait_until(lambda: f"run {first.id}: delivered again; ignored" in logs(), 30, "the duplicate")
    assert logs().count(f"run {first.id}: delivered again; ignored") == 1
    assert logs().count(f"run {first.id}: proj/once") == 1
