"""`formulabeat doctor`: a line per check, ok or what to fix."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from workers.embedded import EmbeddedRedis
from workers.statedir import new_run_dir


def doctor(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--config", str(config), "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def write_config(tmp_path: Path, url: str, command: str = "sh") -> Path:
    config = tmp_path / "formulabeat.toml"
    config.write_text(
        f'state_dir = "state"\n[broker]\nurl = "{url}"\n'
        '[[projects]]\nname = "p"\nrepo_root = "repo"\n'
        f'[[agents]]\nname = "a"\nproject = "p"\nformula = "f.toml"\nschedule = "* * * * *"\n'
        f'command = "{command}"\nmin_memory_mb = 0\n'
    )
    return config


def test_a_healthy_host_is_all_ok(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    proc = doctor(write_config(tmp_path, redis_server.url))
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    names = [line.split()[1] for line in lines]
    for name in ("tmux", "git", "agent", "redis", "clock", "memory", "state"):
        assert name in names, name
    assert all(line.startswith("ok") for line in lines)
    redis_line = next(line for line in lines if line.split()[1] == "redis")
    assert "Redis " in redis_line and "***@" in redis_line
    password = redis_server.url.split(":")[2].split("@")[0]
    assert password not in proc.stdout


def test_problems_say_what_to_fix(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    wrong = redis_server.url.replace("://:", "://:wrong")
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    proc = doctor(write_config(tmp_path, wrong, command="no-such-agent"))
    assert proc.returncode == 1
    out = proc.stdout
    assert "FIX  agent p/a" in out and "'no-such-agent' not found on PATH" in out
    assert "FIX  redis" in out and "wrong password" in out
    assert f"FIX  state dir              {state} has mode 755: run chmod 700 {state}" in out


def test_a_state_dir_formulabeat_made_is_private_however_it_came_to_exist(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    # A worker's first run makes the state dir as the parent of runs/ (and,
    # with the default, ~/.local/state above it): each one made is 0700.
    state = tmp_path / "made" / "by" / "formulabeat"
    config = write_config(tmp_path, redis_server.url)
    config.write_text(config.read_text().replace('state_dir = "state"', f'state_dir = "{state}"'))
    run_dir = new_run_dir(state, "0123456789abcdef")
    for made in (run_dir, state / "runs", state, state.parent, state.parent.parent):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    lines = doctor(config).stdout.splitlines()
    assert any(line.startswith("ok") and "state dir" in line for line in lines), lines
