"""`formulabeat up` on the embedded default, and `run --wait --json` from the CLI.

The agent here is not formulabeat's scripted agent: it is a POSIX sh script
that shares no code with it. It shows a prompt, reads the pasted prompt line
by line, and runs the prompt's own ``echo 'PHASE:done' > '…'`` line, as an
agent's shell tool would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import commit_files, tmux_sessions, wait_until
from workers import embedded

SH_AGENT = r"""#!/bin/sh
printf '\342\235\257 '
while IFS= read -r line; do
  case "$line" in
    "echo 'PHASE:done' > '"*) sleep 0.2; eval "$line" ;;
  esac
done
"""

FORMULA = """name = "shell"
[[steps]]
id = "one"
title = "Write the phase"
description = "Follow the phase protocol."
"""

FORMULABEAT = [sys.executable, "-m", "tasks.cli"]


def test_up_then_run_wait_json_with_an_agent_we_did_not_write(
    tmp_path: Path, tmux_socket: str
) -> None:
    agent = tmp_path / "agent.sh"
    agent.write_text(SH_AGENT)
    agent.chmod(0o755)
    commit_files(tmp_path / "repo", {"formulas/shell.toml": FORMULA, "README.md": "x\n"})
    config = tmp_path / "formulabeat.toml"
    config.write_text(
        f"""state_dir = "state"
[tmux]
socket = "{tmux_socket}"
[[projects]]
name = "proj"
repo_root = "repo"
[[agents]]
name = "shell"
project = "proj"
formula = "repo/formulas/shell.toml"
schedule = "0 0 1 1 *"
command = "{agent}"
min_memory_mb = 0
"""
    )
    env = {**os.environ, "FORMULABEAT_CONFIG": str(config)}
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [*FORMULABEAT, "up", "--no-flower"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        state = tmp_path / "state"
        url = wait_until(lambda: embedded.published_url(state), 30, "embedded Redis")
        assert url.startswith("redis://:") and "@127.0.0.1:" in url
        # The password is in a 0600 file, not on redis-server's command line.
        assert oct((state / "embedded-redis.json").stat().st_mode & 0o777) == "0o600"
        proc = subprocess.run(
            [*FORMULABEAT, "run", "proj", "shell", "--wait", "--json", "--timeout", "60"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1
        result = json.loads(lines[0])
        assert result["outcome"] == "done"
        assert result["final_phase"] == "PHASE:done"
        run_id = proc.stderr.splitlines()[0]
        assert result["run_id"] == run_id
        status = subprocess.run(
            [*FORMULABEAT, "status", run_id, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert json.loads(status.stdout)["outcome"] == "done"
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        log.close()
    # Ctrl-C stopped everything: Redis gone, its record removed, no session left.
    assert not (tmp_path / "state" / "embedded-redis.json").exists()
    assert tmux_sessions(tmux_socket) == []
    assert up.returncode == 0


def test_run_wait_exit_status_for_skipped_and_errors(tmp_path: Path) -> None:
    config = tmp_path / "formulabeat.toml"
    config.write_text('[[agents]]\nname = "x"\n')
    proc = subprocess.run(
        [*FORMULABEAT, "--config", str(config), "run", "p", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 4
    assert proc.stderr.strip() == (f"formulabeat: {config}: agents[0].project: is required")


def test_run_without_a_broker_says_how_to_start_one(tmp_path: Path) -> None:
    commit_files(tmp_path / "repo", {"formulas/shell.toml": FORMULA})
    config = tmp_path / "formulabeat.toml"
    config.write_text(
        'state_dir = "state"\n[[projects]]\nname = "p"\nrepo_root = "repo"\n'
        '[[agents]]\nname = "a"\nproject = "p"\nformula = "repo/formulas/shell.toml"\n'
        'schedule = "* * * * *"\n'
    )
    proc = subprocess.run(
        [*FORMULABEAT, "--config", str(config), "run", "p", "a"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 4
    assert "[broker] url is not set and no embedded Redis runs on this host" in proc.stderr
    assert "formulabeat up" in proc.stderr
