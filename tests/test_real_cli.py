"""The real Claude Code CLI, end to end: started, readied, prompted, watched and ended.

Every run here is the pinned CLI (tests/real_cli.py) in tmux, talking to the
Messages API stand-in (tests/messages_api.py), which plays the model from the
formula's ``SCENARIO:`` line: the tool calls it asks for are really run by
the CLI, and formulabeat's hooks are really called by it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import git
import pytest

from tests.conftest import Fleet, commit_files, held_claims, tmux_sessions
from tests.messages_api import MessagesAPI
from tests.real_cli import agent_options, real_agent


def test_a_formula_run_ends_done_with_every_phase_in_order_and_the_whole_prompt(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI, redis_client
) -> None:
    fleet.add_agent(
        "planner",
        "phase=awaiting_ci phase=done",
        **agent_options(claude, claude_home, messages_api.url),
    )
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("planner", timeout=120)
    assert result["outcome"] == "done", result
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    exchanges = messages_api.for_run(result["run_id"])
    assert exchanges, "the model was never asked"
    received = exchanges[0].prompt or ""
    assert hashlib.sha256(received.encode()).hexdigest() == result["prompt_sha256"]
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_a_turn_without_a_phase_is_nudged_by_the_real_stop_hook_then_idle_prompt(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(fleet, "quiet", "idle", claude, claude_home, messages_api)
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("quiet", timeout=120)
    assert result["outcome"] == "failed", result
    assert result["reason"].startswith("idle_prompt")
    assert result["nudges"] == 2
    # The model was asked three times: the prompt, then each nudge the CLI gave it.
    exchanges = messages_api.for_run(result["run_id"])
    assert [e.action for e in exchanges] == ["idle", "end", "end"]


def test_a_crash_of_the_real_cli_is_recovered_once(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    # The model's first tool call kills the CLI (SIGKILL); the recovered
    # session gets the prompt again and finishes.
    real_agent(fleet, "fragile", "crash_once phase=done", claude, claude_home, messages_api)
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("fragile", timeout=180)
    assert result["outcome"] == "done", result
    assert result["recoveries"] == 1
    # Killed this early the CLI may leave a transcript it cannot resume
    # ("No conversation found"): the prompt is then given again.
    assert result["recovered_by"] in (["resumed"], ["reinjected"])
    assert [p["phase"] for p in result["phases"]] == ["PHASE:done"]


def test_the_guards_denial_reaches_the_model_as_the_tools_error(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(
        fleet,
        "pusher",
        "bash=git_push_--force_origin_main phase=done",
        claude,
        claude_home,
        messages_api,
    )
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("pusher", timeout=120)
    assert result["outcome"] == "done", result
    exchanges = messages_api.for_run(result["run_id"])
    denied = [r for e in exchanges for r in e.tool_results if r["is_error"]]
    assert len(denied) == 1, [e.tool_results for e in exchanges]
    assert (
        "formulabeat guard: force-pushing to the primary branch 'main' is not allowed"
        in (denied[0]["content"])
    )


def test_a_fresh_home_ends_the_run_within_60_s_naming_the_setup(
    fleet: Fleet, claude: Path, messages_api: MessagesAPI, tmp_path: Path
) -> None:
    home = tmp_path / "fresh-home"
    home.mkdir()
    real_agent(fleet, "newcomer", "phase=done", claude, home, messages_api)
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("newcomer", timeout=60)
    assert result["outcome"] == "failed"
    assert "first-run setup" in result["reason"] and str(home) in result["reason"]
    assert result["phases"] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI refuses bypass mode as root only")
def test_root_without_a_sandbox_setting_quotes_the_clis_refusal(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(
        fleet, "rooted", "phase=done", claude, claude_home, messages_api, drop_env=["IS_SANDBOX"]
    )
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("rooted", timeout=60)
    assert result["outcome"] == "failed"
    assert (
        "--dangerously-skip-permissions cannot be used with root/sudo privileges for security "
        "reasons" in result["reason"]
    )


def test_oneshot_runs_the_real_cli_with_p_to_its_phase(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(fleet, "batch", "phase=escalate", claude, claude_home, messages_api, mode="oneshot")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("batch", timeout=120)
    assert result["outcome"] == "escalate", result
    assert result["mode"] == "oneshot"
    assert [p["phase"] for p in result["phases"]] == ["PHASE:escalate"]


def test_what_the_agent_commits_holds_none_of_formulabeats_files(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    # The repository has its own Claude Code settings, whose hook must still
    # run beside formulabeat's; the agent then commits everything it sees.
    marker = fleet.root / "repo-hook-ran"
    hook = {"type": "command", "command": f"touch {marker}"}
    settings = {"hooks": {"UserPromptSubmit": [{"hooks": [hook]}]}}
    commit_files(fleet.repo, {".claude/settings.json": json.dumps(settings)})
    commit = (
        "echo_work_>_work.txt_&&_git_add_-A_&&_git_-c_user.name=agent_-c_user.email=a@b"
        "_commit_-qm_work_&&_git_branch_agent-work"
    )
    real_agent(fleet, "committer", f"bash={commit} phase=done", claude, claude_home, messages_api)
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("committer", timeout=120)
    assert result["outcome"] == "done", result
    repo = git.Repo(fleet.repo)
    assert repo.git.show("--name-only", "--format=", "agent-work").split() == ["work.txt"]
    assert marker.exists(), "the repository's own hook did not run"
