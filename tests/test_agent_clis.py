"""Every agent CLI formulabeat drives, end to end, on the same scenarios.

Each test runs once per real CLI (Claude Code, Codex, Gemini CLI; the pinned
versions ``make test`` installs), each in tmux against its vendor's API
stand-in, which plays the model from the formula's ``SCENARIO:`` line
(tests/scenario.py): the tool calls it asks for are really run by the CLI,
formulabeat's hooks really called by it, its own transcript really written.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import git
import pytest

from tests.conftest import Fleet, commit_files, held_claims, tmux_sessions
from tests.real_cli import AgentCLI
from workers.usage import total_tokens


def agent(fleet: Fleet, cli: AgentCLI, name: str, scenario: str, **options: object) -> None:
    env = options.pop("env", {})
    home = options.pop("home", None)
    settings = cli.options(home, **env)  # type: ignore[arg-type]
    fleet.add_agent(name, scenario, **{**settings, **options})


def phase_file(result: dict[str, object]) -> str:
    return str(Path(str(result["worktree"])).parent / "phase")


def test_a_run_ends_done_with_both_phases_and_the_whole_prompt(
    fleet: Fleet, agent_cli: AgentCLI, redis_client
) -> None:
    agent(fleet, agent_cli, "planner", "phase=awaiting_ci phase=done")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("planner", timeout=120)
    assert result["outcome"] == "done", result
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    exchanges = agent_cli.api.for_run(result["run_id"])
    assert exchanges, "the model was never asked"
    received = exchanges[0].prompt or ""
    # Whole, as sent (a CLI may drop the final newline of what it was given).
    shas = {hashlib.sha256(text.encode()).hexdigest() for text in (received, received + "\n")}
    assert result["prompt_sha256"] in shas
    # The conversation the CLI named (or was given) is recorded, with its transcript.
    assert result["session_uuid"] and result["transcript"]
    # The driver saw its paste whole in the CLI's input (misread, every start
    # waits out PASTE_WAIT before its Enter).
    assert (
        "did not show the whole paste"
        not in (fleet.root / "logs-host-a" / "worker.log").read_text()
    )
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_a_quiet_stop_is_nudged_by_the_clis_stop_hook_then_idle_prompt(
    fleet: Fleet, agent_cli: AgentCLI
) -> None:
    agent(fleet, agent_cli, "quiet", "idle")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("quiet", timeout=120)
    assert result["outcome"] == "failed", result
    assert result["reason"].startswith("idle_prompt")
    assert result["nudges"] == 2
    # The model was asked three times: the prompt, then each nudge the CLI gave it.
    exchanges = agent_cli.api.for_run(result["run_id"])
    assert [e.action for e in exchanges] == ["idle", "end", "end"]


def test_a_crash_is_resumed_in_its_conversation_and_finishes(
    fleet: Fleet, agent_cli: AgentCLI
) -> None:
    # The model's third tool call kills the CLI (SIGKILL); the session is
    # started again on the same conversation and told to go on. Claude Code
    # writes its transcript a moment after each turn: the sleep lets the turns
    # before the crash reach it (on a busy machine a kill right after a turn
    # loses that turn, and the model, resumed, does it again).
    agent(fleet, agent_cli, "fragile", "phase=awaiting_ci sleep=2 crash_once phase=done")
    fleet.write_config(agent_cli.price_table())
    fleet.start_worker()
    result = fleet.run("fragile", timeout=180)
    assert result["outcome"] == "done", result
    assert result["recoveries"] == 1
    # Claude Code killed this early may leave a transcript it cannot resume
    # ("No conversation found"): the prompt is then given again. Codex and
    # Gemini CLI record the conversation before the model is asked.
    resumed = ["resumed"] if agent_cli.driver != "claude-code" else result["recovered_by"]
    assert result["recovered_by"] == resumed
    if result["recovered_by"] != ["resumed"]:
        return
    exchanges = agent_cli.api.main_exchanges(phase_file(result))
    # The first prompt was not given a second time: after the crash the model
    # saw the conversation so far, and the scenario went on from there.
    killed = next(i for i, e in enumerate(exchanges) if e.action == "crash_once")
    assert all(e.cursor > 0 for e in exchanges[killed + 1 :]), exchanges
    assert "phase=done" in [e.action for e in exchanges[killed + 1 :]]
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]


def test_the_guard_denies_a_destructive_command_and_the_model_reads_why(
    fleet: Fleet, agent_cli: AgentCLI
) -> None:
    agent(fleet, agent_cli, "pusher", "bash=git_push_--force_origin_main phase=done")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("pusher", timeout=120)
    assert result["outcome"] == "done", result
    results = [r for e in agent_cli.api.for_run(result["run_id"]) for r in e.tool_results]
    reason = "formulabeat guard: force-pushing to the primary branch 'main' is not allowed"
    assert [r for r in results if reason in r["content"]], results


def test_a_runs_tokens_are_the_stand_ins_bill(fleet: Fleet, agent_cli: AgentCLI) -> None:
    agent(fleet, agent_cli, "counted", "phase=awaiting_ci sleep=2 phase=done")
    fleet.write_config(agent_cli.price_table())
    fleet.start_worker()
    result = fleet.run("counted", timeout=120)
    assert result["outcome"] == "done", result
    exchanges = agent_cli.api.for_run(result["run_id"])
    assert len(exchanges) == 4  # awaiting_ci, sleep, done, and the closing words
    bill = agent_cli.billed(exchanges)
    assert result["usage"] == {agent_cli.model: {**dict.fromkeys(bill, 0), **bill}}
    price = {"input": 15.0, "output": 75.0, "cache_read": 1.5, "cache_creation": 18.75}
    assert result["cost_usd"] == pytest.approx(sum(bill[k] * price[k] for k in bill) / 1e6)


def test_a_home_where_the_cli_never_ran_fails_within_60_s_naming_the_fix(
    fleet: Fleet, agent_cli: AgentCLI, tmp_path: Path
) -> None:
    home = tmp_path / "fresh-home"
    home.mkdir()
    agent(fleet, agent_cli, "newcomer", "phase=done", home=home)
    fleet.write_config()
    fleet.start_worker()
    started = time.monotonic()
    result = fleet.run("newcomer", timeout=60)
    assert time.monotonic() - started < 60
    assert result["outcome"] == "failed", result
    for words in (*agent_cli.fresh_reason, str(home)):
        assert words in result["reason"], result["reason"]
    assert result["phases"] == []


# make long: in make test, each CLI's one-shot usage is checked by
# test_usage (Claude Code) and test_agent_cli_api_errors (Codex, Gemini CLI).
@pytest.mark.long
def test_a_oneshot_run_takes_its_usage_from_the_clis_own_report(
    fleet: Fleet, agent_cli: AgentCLI
) -> None:
    agent(fleet, agent_cli, "batch", "phase=escalate", mode="oneshot")
    fleet.write_config(agent_cli.price_table())
    fleet.start_worker()
    result = fleet.run("batch", timeout=120)
    assert result["outcome"] == "escalate", result
    assert result["mode"] == "oneshot"
    bill = agent_cli.billed(agent_cli.api.for_run(result["run_id"]))
    usage = result["usage"][agent_cli.model]
    assert {k: usage.get(k, 0) for k in bill} == bill
    assert result["output_tail"] == "Done."


# Each CLI's own hook file in a repository, and the event that runs it at a prompt.
REPO_HOOKS = {
    "claude-code": (".claude/settings.json", "UserPromptSubmit"),
    "codex": (".codex/hooks.json", "UserPromptSubmit"),
    "gemini": (".gemini/settings.json", "BeforeAgent"),
}


def test_the_repositorys_own_hooks_run_and_nothing_of_formulabeats_is_committed(
    fleet: Fleet, agent_cli: AgentCLI
) -> None:
    marker = fleet.root / "repo-hook-ran"
    path, event = REPO_HOOKS[agent_cli.driver]
    hook = {"type": "command", "command": f"touch {marker}", "name": "repo-hook"}
    commit_files(fleet.repo, {path: json.dumps({"hooks": {event: [{"hooks": [hook]}]}})})
    commit = (
        "echo_work_>_work.txt_&&_git_add_-A_&&_git_-c_user.name=agent_-c_user.email=a@b"
        "_commit_-qm_work_&&_git_branch_agent-work"
    )
    agent(fleet, agent_cli, "committer", f"bash={commit} phase=done")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("committer", timeout=120)
    assert result["outcome"] == "done", result
    repo = git.Repo(fleet.repo)
    assert repo.git.show("--name-only", "--format=", "agent-work").split() == ["work.txt"]
    assert marker.exists(), "the repository's own hook did not run"


def test_a_run_past_max_tokens_is_stopped_and_counted_in_the_days_usage(
    fleet: Fleet, agent_cli: AgentCLI, redis_client
) -> None:
    # Each response is about 1400 tokens; five sleeps would take 15 s.
    scenario = "sleep=3 sleep=3 sleep=3 sleep=3 sleep=3 phase=done"
    agent(fleet, agent_cli, "hungry", scenario, max_tokens=2500)
    fleet.write_config(agent_cli.price_table())
    fleet.start_worker()
    result = fleet.run("hungry", timeout=120)
    assert result["outcome"] == "over_budget", result
    assert "over max_tokens = 2500" in result["reason"]
    assert 2500 < total_tokens(result["usage"]) < 6000
    assert held_claims(redis_client) == [] and tmux_sessions(fleet.tmux_socket) == []
    # `formulabeat usage` shows the day's tokens of the model, from every host.
    command = ["usage", "--by", "model", "--json"]
    by_model = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--config", str(fleet.config_path), *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(by_model)[agent_cli.model]["tokens"] == total_tokens(result["usage"])
