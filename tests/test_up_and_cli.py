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

from tests.conftest import Fleet, commit_files, tmux_sessions, wait_result, wait_until
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


def test_status_logs_and_attach_from_another_host(fleet: Fleet) -> None:
    fleet.add_agent("watcher", "phase=awaiting_ci sleep=120")
    fleet.write_config()
    env = {**os.environ, "FORMULABEAT_HOST": "host-b"}
    cli = [*FORMULABEAT, "--config", str(fleet.config_path)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    sent = fleet.send("watcher")
    # Known from the moment it is sent, before any worker takes it.
    queued = run("status", sent.id, "--json")
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout) == {
        "run_id": sent.id,
        "project": "proj",
        "agent": "watcher",
        "state": "SENT",
    }
    fleet.start_worker("host-a")
    wait_until(lambda: sent.state == "AWAITING_CI", 60, "the run to be live")
    table = run("status")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:8] == [
        "run",
        "project",
        "agent",
        "host",
        "phase",
        "age",
        "tokens",
        "outcome",
    ]
    assert row.split()[:5] == [sent.id[:8], "proj", "watcher", "host-a", "PHASE:awaiting_ci"]
    assert row.split()[7] == "live"
    logs = run("logs", sent.id)
    assert logs.returncode == 0, logs.stderr
    assert "scripted agent" in logs.stdout and "wrote PHASE:awaiting_ci" in logs.stdout
    attach = run("attach", sent.id)
    assert attach.returncode == 0
    assert attach.stdout.startswith(f"run {sent.id} lives on host host-a; there, run: tmux -L ")
    assert run("cancel", sent.id).returncode == 0
    assert wait_result(sent)["outcome"] == "cancelled"


def test_flower_beyond_loopback_needs_basic_auth(tmp_path: Path) -> None:
    import dataclasses

    from tasks.stack import child_env
    from workers.config import parse_config
    from workers.errors import FormulabeatError

    cfg = parse_config('[flower]\naddress = "0.0.0.0"\n', tmp_path / "formulabeat.toml")
    saved = os.environ.pop("FLOWER_BASIC_AUTH", None)
    try:
        try:
            child_env(cfg, flower=True)
        except FormulabeatError as exc:
            assert "FLOWER_BASIC_AUTH=user:password" in str(exc)
        else:
            raise AssertionError("Flower would listen beyond loopback without auth")
        os.environ["FLOWER_BASIC_AUTH"] = "admin:s3cret"
        assert "FLOWER_UNAUTHENTICATED_API" not in child_env(cfg, flower=True)
        loopback = dataclasses.replace(cfg, flower_address="127.0.0.1")
        assert child_env(loopback, flower=True)["FLOWER_UNAUTHENTICATED_API"] == "true"
    finally:
        os.environ.pop("FLOWER_BASIC_AUTH", None)
        if saved is not None:
            os.environ["FLOWER_BASIC_AUTH"] = saved
