"""Running as a service account: a nologin shell, repositories it does not own or cannot write.

Root bypasses file permissions, so the unwritable repository is a read-only
bind mount in a private mount namespace that the worker runs in.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.stack import Stack
from tests.conftest import Fleet, held_claims, tmux_sessions
from workers.config import load_config

NOLOGIN = shutil.which("nologin") or "/usr/sbin/nologin"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mount namespaces)")


def read_only(path: Path) -> list[str]:
    """A command prefix that runs its command with ``path`` mounted read-only."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(path)]


def worker(fleet: Fleet, wrap: list[str]) -> Stack:
    cfg = dataclasses.replace(load_config(fleet.config_path), host="host-a")
    stack = Stack(cfg, flower=False, beat=False, log_dir=fleet.root / "logs", wrap=wrap)
    stack.start()
    fleet.stacks.append(stack)
    return stack


@pytest.mark.skipif(not os.path.exists(NOLOGIN), reason="no nologin on this system")
def test_agents_start_when_the_login_shell_is_nologin(fleet: Fleet) -> None:
    # The worker and the tmux server it starts see SHELL=nologin, as a
    # service account's do: tmux would run a one-string command through it.
    fleet.add_agent("planner", "phase=awaiting_ci phase=done")
    fleet.write_config()
    worker(fleet, ["env", f"SHELL={NOLOGIN}"])
    result = fleet.run("planner")
    assert result["outcome"] == "done", result
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]


@as_root
def test_a_repository_owned_by_another_user_fails_the_run_with_both_fixes(
    fleet: Fleet, redis_client
) -> None:
    fleet.add_agent("planner")
    fleet.write_config()
    subprocess.run(["chown", "-R", "12345:12345", str(fleet.repo)], check=True, timeout=30)
    fleet.start_worker()
    result = fleet.run("planner")
    assert result["outcome"] == "failed"
    reason = result["reason"]
    assert f"git refuses {fleet.repo}" in reason and "dubious ownership" in reason, reason
    assert f"chown -R root {fleet.repo}" in reason
    assert f"git config --global --add safe.directory {fleet.repo}" in reason
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


@as_root
def test_a_repository_the_worker_cannot_write_fails_the_run_naming_path_and_fix(
    fleet: Fleet, redis_client
) -> None:
    fleet.add_agent("planner")
    fleet.write_config()
    worker(fleet, read_only(fleet.repo))
    result = fleet.run("planner")
    assert result["outcome"] == "failed"
    reason = result["reason"]
    assert f"{fleet.repo}/.git" in reason and "is not writable by root" in reason, reason
    assert f"chown -R root {fleet.repo}" in reason
    assert "internal error" not in reason
    assert held_claims(redis_client) == []
    assert list((fleet.root / "state" / "runs").iterdir()) == []


def test_runs_leave_nothing_in_the_temp_dir(fleet: Fleet) -> None:
    # The scripted agent once left an empty /tmp/scripted-agent-* per run.
    tmp = fleet.root / "tmpdir"
    tmp.mkdir()
    fleet.add_agent("planner", "phase=awaiting_ci phase=done")
    fleet.add_agent("fragile", "crash")
    fleet.write_config()
    worker(fleet, ["env", f"TMPDIR={tmp}"])
    assert fleet.run("planner")["outcome"] == "done"
    assert fleet.run("fragile")["outcome"] == "crashed"
    assert list(tmp.iterdir()) == []
