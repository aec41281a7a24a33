"""`formulabeat doctor`: a line per check, ok or what to fix."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import commit_files, formula_text
from tests.real_cli import AgentCLI, cli_env, codex_setup
from tests.test_service_user import NOLOGIN, as_root, read_only
from workers.embedded import EmbeddedRedis
from workers.statedir import new_run_dir


def doctor(
    config: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--config", str(config), "doctor", *(args or [])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def write_config(tmp_path: Path, url: str, command: str = "sh") -> Path:
    """A healthy config: its repository and formula exist, the agent is ``command``."""
    commit_files(tmp_path / "repo", {"README.md": "# p\n"})
    (tmp_path / "f.toml").write_text(formula_text("f", "phase=done"))
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
    for name in ("tmux", "git", "shell", "repo", "agent", "redis", "clock", "memory", "state"):
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


def claude_config(tmp_path: Path, url: str, claude: Path, home: Path, api_url: str) -> Path:
    """A config whose one agent runs the real Claude Code CLI in ``home``."""
    config = write_config(tmp_path, url, command=f"{claude} --dangerously-skip-permissions")
    env = ", ".join(f'{k} = "{v}"' for k, v in cli_env(home, api_url).items())
    config.write_text(config.read_text() + f"env = {{ {env} }}\n")
    return config


def test_a_home_where_claude_ran_by_hand_is_all_ok(
    tmp_path: Path, redis_server: EmbeddedRedis, claude: Path, claude_home: Path, messages_api
) -> None:
    proc = doctor(claude_config(tmp_path, redis_server.url, claude, claude_home, messages_api.url))
    lines = proc.stdout.splitlines()
    claude_lines = [line for line in lines if " claude p/a " in line]
    names = {line.split()[3] for line in claude_lines}
    assert {"setup", "login", "bypass", "trust"} <= names, lines
    assert proc.returncode == 0 and all(line.startswith("ok") for line in lines), proc.stdout


def test_doctor_names_each_missing_setup_step_and_fix_applies_them(
    tmp_path: Path, redis_server: EmbeddedRedis, claude: Path, messages_api
) -> None:
    home = tmp_path / "fresh-home"
    home.mkdir()
    config = claude_config(tmp_path, redis_server.url, claude, home, messages_api.url)
    before = doctor(config)
    assert before.returncode == 1
    out = before.stdout
    assert "FIX  claude p/a setup" in out and "onboarding not done" in out
    assert "FIX  claude p/a login" in out and "ANTHROPIC_API_KEY not approved" in out
    assert "FIX  claude p/a bypass" in out and "accept_bypass_mode = true" in out
    fixed = doctor(config, args=["--fix"])
    assert "fixed " in fixed.stdout and "onboarding marked done" in fixed.stdout
    assert "Bypass Permissions mode accepted" in fixed.stdout
    lines = [line for line in fixed.stdout.splitlines() if " claude p/a " in line]
    assert lines and all(line.startswith("ok") for line in lines), fixed.stdout
    # What doctor --fix wrote is what the CLI itself keeps: a second --fix changes nothing.
    again = doctor(config, args=["--fix"])
    assert "fixed " not in again.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI refuses bypass mode as root only")
def test_doctor_says_root_needs_a_sandbox_setting(
    tmp_path: Path, redis_server: EmbeddedRedis, claude: Path, claude_home: Path, messages_api
) -> None:
    config = claude_config(tmp_path, redis_server.url, claude, claude_home, messages_api.url)
    config.write_text(
        config.read_text().replace('IS_SANDBOX = "1", ', "").replace(', IS_SANDBOX = "1"', "")
    )
    proc = doctor(config)
    assert "FIX  claude p/a root" in proc.stdout and 'IS_SANDBOX = "1"' in proc.stdout


def test_a_nologin_shell_is_named_and_agents_get_a_usable_one(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    proc = doctor(write_config(tmp_path, redis_server.url), env={"SHELL": NOLOGIN})
    line = next(line for line in proc.stdout.splitlines() if line.split()[1] == "shell")
    assert line.startswith("ok") and f"{NOLOGIN} runs no commands: agents get " in line, line


def test_each_repository_and_formula_problem_names_its_fix(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    config = write_config(tmp_path, redis_server.url)
    (tmp_path / "plain").mkdir()
    (tmp_path / "bad.toml").write_text('name = "bad"\n[[steps]]\nid = 1\n')
    config.write_text(
        config.read_text()
        + '[[projects]]\nname = "gone"\nrepo_root = "nowhere"\n'
        + '[[projects]]\nname = "plain"\nrepo_root = "plain"\n'
        + '[[agents]]\nname = "b"\nproject = "p"\nformula = "bad.toml"\n'
        + 'schedule = "* * * * *"\ncommand = "sh"\nmin_memory_mb = 0\n'
        + '[[agents]]\nname = "c"\nproject = "p"\nformula = "missing.toml"\n'
        + 'schedule = "* * * * *"\ncommand = "sh"\nmin_memory_mb = 0\n'
    )
    proc = doctor(config)
    assert proc.returncode == 1
    out = proc.stdout
    assert "FIX  repo gone" in out and f"repository {tmp_path}/nowhere does not exist" in out
    assert "FIX  repo plain" in out and f"{tmp_path}/plain is not a git repository" in out
    assert "FIX  agent p/b formula" in out and "bad.toml" in out
    assert "FIX  agent p/c formula" in out and f"formula {tmp_path}/missing.toml not found" in out
    assert next(line for line in out.splitlines() if " repo p " in line).startswith("ok")


@as_root
def test_a_repository_of_another_owner_or_read_only_names_the_fix(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    config = write_config(tmp_path, redis_server.url)
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [*read_only(repo), sys.executable, "-m", "tasks.cli", "--config", str(config), "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = next(line for line in proc.stdout.splitlines() if " repo p " in line)
    assert line.startswith("FIX") and f"{repo}/.git is not writable by root" in line, proc
    assert f"chown -R root {repo}" in line
    subprocess.run(["chown", "-R", "12345:12345", str(repo)], check=True, timeout=30)
    line = next(line for line in doctor(config).stdout.splitlines() if " repo p " in line)
    assert line.startswith("FIX") and "dubious ownership" in line, line
    assert f"git config --global --add safe.directory {repo}" in line


def agent_cli_config(tmp_path: Path, url: str, cli: AgentCLI, home: Path) -> Path:
    """A config whose one agent runs a real Codex or Gemini CLI in ``home``."""
    config = write_config(tmp_path, url, command=f"{cli.binary} {cli.flags}")
    env = ", ".join(f'{k} = "{v}"' for k, v in cli.env(home).items())
    config.write_text(config.read_text() + f"env = {{ {env} }}\n")
    return config


def cli_lines(proc: subprocess.CompletedProcess[str], driver: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if f" {driver} p/a " in line]


def test_codex_set_up_with_a_provider_key_is_all_ok_and_fix_trusts_the_repository(
    tmp_path: Path, redis_server: EmbeddedRedis, codex: AgentCLI
) -> None:
    home = codex_setup(tmp_path / "home", codex.api.base_url)
    config = agent_cli_config(tmp_path, redis_server.url, codex, home)
    before = doctor(config)
    lines = cli_lines(before, "codex")
    assert {line.split()[3] for line in lines} == {"login", "trust", "hooks"}, before.stdout
    assert before.returncode == 0 and all(line.startswith("ok") for line in lines), before.stdout
    assert "authenticates with OPENAI_API_KEY" in before.stdout
    assert "is trusted before the first run" in before.stdout
    fixed = doctor(config, args=["--fix"])
    repo = (tmp_path / "repo").resolve()
    assert f"trusted {repo}" in fixed.stdout
    assert "ok   codex p/a trust" in fixed.stdout and f"{repo} trusted" in fixed.stdout
    again = doctor(config, args=["--fix"])
    assert "fixed " not in again.stdout


def test_codex_never_logged_in_names_the_fix(
    tmp_path: Path, redis_server: EmbeddedRedis, codex: AgentCLI
) -> None:
    home = tmp_path / "fresh"
    home.mkdir()
    config = write_config(tmp_path, redis_server.url, command=f"{codex.binary} {codex.flags}")
    config.write_text(config.read_text() + f'env = {{ HOME = "{home}" }}\n')
    proc = doctor(config, env={"OPENAI_API_KEY": ""})
    assert proc.returncode == 1
    assert "FIX  codex p/a login" in proc.stdout and "codex login" in proc.stdout


def test_gemini_with_a_key_and_no_auth_type_is_fixed_by_doctor_fix(
    tmp_path: Path, redis_server: EmbeddedRedis, gemini: AgentCLI
) -> None:
    home = tmp_path / "fresh"
    home.mkdir()
    config = agent_cli_config(tmp_path, redis_server.url, gemini, home)
    before = doctor(config)
    assert before.returncode == 1
    assert "FIX  gemini p/a login" in before.stdout
    assert "sets no security.auth.selectedType" in before.stdout
    fixed = doctor(config, args=["--fix"])
    assert "security.auth.selectedType = gemini-api-key" in fixed.stdout
    lines = cli_lines(fixed, "gemini")
    assert lines and all(line.startswith("ok") for line in lines), fixed.stdout
    settings = json.loads((home / ".gemini" / "settings.json").read_text())
    assert settings["security"]["auth"]["selectedType"] == "gemini-api-key"
