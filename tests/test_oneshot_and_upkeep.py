"""One-shot agents, max_runtime, enable/disable, and the per-host cleanup of run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import git
import redis

from tests.conftest import Fleet, commit_files, tmux_sessions
from workers.rundir import PRESERVED
from workers.worktrees import add_worktree, cleanup_stale


def test_oneshot_agent_runs_from_origin_primary_with_the_prompt_on_stdin(fleet: Fleet) -> None:
    # The project's origin is a bare repository one commit ahead of the local clone.
    origin = fleet.root / "origin.git"
    git.Repo(fleet.repo).clone(origin, bare=True)
    git.Repo(fleet.repo).create_remote("origin", str(origin))
    ahead = git.Repo.clone_from(origin, fleet.root / "other")
    commit_files(fleet.root / "other", {"NEW.md": "from origin\n"})
    ahead.remotes.origin.push("main")
    fleet.add_agent("planner", "ls phase=done", mode="oneshot")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("planner")
    assert result["outcome"] == "done"
    assert result["mode"] == "oneshot"
    assert [p["phase"] for p in result["phases"]] == ["PHASE:done"]
    assert "wrote PHASE:done" in result["output_tail"]
    assert "NEW.md" in result["output_tail"]  # the worktree is origin/main, fetched
    assert tmux_sessions(fleet.tmux_socket) == []


def test_oneshot_exit_status_decides_without_a_phase(fleet: Fleet) -> None:
    fleet.add_agent("crasher", "crash", mode="oneshot")
    fleet.add_agent("failer", "apifail=authentication_failed", mode="oneshot")
    fleet.write_config()
    fleet.start_worker()
    crashed = fleet.run("crasher")
    assert crashed["outcome"] == "failed"
    assert crashed["reason"] == "the agent exited with status 1"
    failed = fleet.run("failer")
    assert failed["outcome"] == "failed"
    # The CLI said why it exited: a permanent API error, not waited out.
    assert failed["reason"].startswith("api_error: authentication_failed")


def test_oneshot_idle_and_max_runtime_kill_the_child(fleet: Fleet) -> None:
    fleet.add_agent("sleepy", "sleep=60", mode="oneshot", idle_timeout=1.5)
    fleet.add_agent("slow", "phase=awaiting_ci sleep=60", mode="oneshot", max_runtime=2.5)
    fleet.write_config()
    fleet.start_worker()
    assert fleet.run("sleepy")["outcome"] == "idle_timeout"
    slow = fleet.run("slow")
    assert slow["outcome"] == "failed"
    assert slow["reason"] == "max_runtime of 2.5 s reached"


def test_session_max_runtime_caps_a_busy_run(fleet: Fleet) -> None:
    fleet.add_agent("busy", "phase=awaiting_ci sleep=60", max_runtime=3)
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("busy")
    assert result["outcome"] == "failed"
    assert result["reason"] == "max_runtime of 3 s reached"
    assert tmux_sessions(fleet.tmux_socket) == []


def test_disable_and_enable_hold_for_every_host(fleet: Fleet, redis_client: redis.Redis) -> None:
    fleet.add_agent("planner")
    fleet.write_config()
    cli = [sys.executable, "-m", "tasks.cli", "--config", str(fleet.config_path)]
    out = subprocess.run(
        [*cli, "disable", "proj", "planner"], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "proj/planner: disabled"
    fleet.start_worker("host-a")
    fleet.start_worker("host-b")
    for _ in range(2):
        result = fleet.run("planner")
        assert result["outcome"] == "skipped" and "is disabled" in result["reason"]
    subprocess.run([*cli, "enable", "proj", "planner"], check=True, timeout=60, capture_output=True)
    assert fleet.run("planner")["outcome"] == "done"


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    for entry in [path, *path.iterdir()]:
        os.utime(entry, (old, old), follow_symlinks=False)


def test_cleanup_removes_stale_run_dirs_but_not_preserved_or_in_use(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    commit_files(repo, {"README.md": "x\n"})
    runs = tmp_path / "runs"
    runs.mkdir()
    dirs = {}
    for name in ("stale", "fresh", "preserved", "in-use", "old-preserved"):
        run_dir = runs / name
        run_dir.mkdir()
        add_worktree(repo, run_dir / "worktree")
        dirs[name] = run_dir
    (dirs["preserved"] / PRESERVED).write_text(json.dumps({"reason": "crashed"}))
    (dirs["old-preserved"] / PRESERVED).write_text(json.dumps({"reason": "crashed"}))
    for name in ("stale", "preserved", "in-use"):
        _age(dirs[name], 25 * 3600)
    _age(dirs["old-preserved"], 200 * 3600)
    removed = cleanup_stale(
        runs,
        [repo],
        max_age=24 * 3600,
        preserved_max_age=168 * 3600,
        in_use={dirs["in-use"] / "worktree" / "src"},
        now=time.time(),
    )
    assert sorted(p.name for p in removed) == ["old-preserved", "stale"]
    assert sorted(p.name for p in runs.iterdir()) == ["fresh", "in-use", "preserved"]
    listed = git.Repo(repo).git.worktree("list")
    assert str(dirs["stale"]) not in listed and str(dirs["old-preserved"]) not in listed
    assert str(dirs["fresh"]) in listed


def test_the_cleanup_task_reaches_every_worker(fleet: Fleet) -> None:
    from beat_schedule import CLEANUP_TASK, build_schedule
    from tasks.app import client_app
    from tests.conftest import wait_until
    from workers.config import load_config

    fleet.add_agent("planner")
    cfg = fleet.write_config()
    entry = build_schedule(cfg)["formulabeat/cleanup"]
    assert entry["task"] == CLEANUP_TASK
    # Two hosts, each with its own state dir and a stale run directory in it.
    stale = []
    for host in ("host-a", "host-b"):
        state = fleet.root / f"state-{host}"
        fleet.config_path.write_text(
            fleet.config_path.read_text().replace('state_dir = "state"', f'state_dir = "{state}"')
            if host == "host-a"
            else fleet.config_path.read_text().replace(str(fleet.root / "state-host-a"), str(state))
        )
        run_dir = state / "runs" / "deadbeef-stale"
        run_dir.mkdir(parents=True)
        (run_dir / "phase").write_text("PHASE:done\n")
        _age(run_dir, 30 * 3600)
        stale.append(run_dir)
        fleet.start_worker(host)
    app = client_app(load_config(fleet.config_path))
    app.send_task(CLEANUP_TASK, **entry["options"])
    wait_until(lambda: not any(p.exists() for p in stale), 30, "both hosts to clean up")
