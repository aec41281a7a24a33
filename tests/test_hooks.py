"""Claude Code hooks: installation, each handler, the guard, and whole runs through them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Fleet
from workers.hooks import NAMES, guard_reason, hook_command, settings, writes_phase_file

HOOK = [sys.executable, "-m", "tasks.cli", "hook"]
WORKTREE = "/srv/state/runs/abc/worktree"


def call(
    name: str, run_dir: Path, payload: object, *extra: str
) -> subprocess.CompletedProcess[str]:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return subprocess.run(
        [*HOOK, name, "--run-dir", str(run_dir), *extra],
        input=data,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- installation ----------------------------------------------------------


def test_the_settings_file_holds_every_hook_and_runs_them_as_fast_scripts(
    tmp_path: Path,
) -> None:
    data = settings(hook_command(), tmp_path / "run", "trunk")
    commands = [
        hook["command"] for groups in data["hooks"].values() for g in groups for hook in g["hooks"]
    ]
    for name in NAMES:
        assert any(f"hooks.py {name} --run-dir" in c for c in commands), name
    # No site packages: a hook starts on every tool call of every agent.
    assert all(" -I -S " in c and "--primary-branch trunk" in c for c in commands)
    assert data["hooks"]["PostToolUse"][0]["matcher"] == "Bash|Write"
    assert data["hooks"]["SessionStart"][0]["matcher"] == "compact"
    assert data["hooks"]["SessionEnd"][0]["hooks"][0]["timeout"] == 1


def test_a_hook_run_as_its_installed_command_works_without_site_packages(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "phase").write_text("")
    (run / "prompt.md").write_text("Do the work.\nThen say so.\n")
    payload = json.dumps(base("UserPromptSubmit", prompt="Do the work.\r\nThen say so."))
    proc = subprocess.run(
        [*hook_command(), "user-prompt-submit", "--run-dir", str(run)],
        input=payload,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "prompt-submitted").read_text())["bytes"] > 0


# -- handlers, through the real entry point ---------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "phase").write_text("")
    (run / "context.md").write_text("## Phase protocol (REQUIRED)\n")
    return run


def base(event: str, **fields: object) -> dict[str, object]:
    return {
        "session_id": "s",
        "transcript_path": "/t",
        "cwd": WORKTREE,
        "hook_event_name": event,
        **fields,
    }


def test_stop_writes_the_idle_marker(run_dir: Path) -> None:
    (run_dir / "phase").write_text("PHASE:awaiting_ci\n")
    assert call("stop", run_dir, base("Stop", stop_hook_active=False)).returncode == 0
    assert (run_dir / "idle").exists()


def test_stop_nudges_twice_through_the_cli_then_marks_idle(run_dir: Path) -> None:
    # The nudge is Claude Code's Stop-hook answer: the CLI gives the reason to
    # the model; nothing is typed into the agent's pane.
    answers = [call("stop", run_dir, base("Stop", stop_hook_active=False)) for _ in range(3)]
    assert all(proc.returncode == 0 for proc in answers)
    for nudge in answers[:2]:
        decision = json.loads(nudge.stdout)
        assert decision["decision"] == "block"
        assert "without writing the phase file" in decision["reason"]
        assert f"echo 'PHASE:done' > '{run_dir / 'phase'}'" in decision["reason"]
    assert answers[2].stdout == ""
    assert (run_dir / "idle").exists()
    assert (run_dir / "nudges").read_text() == "2"


def test_the_prompt_submitted_is_recorded_only_when_it_is_this_runs(run_dir: Path) -> None:
    (run_dir / "prompt.md").write_text("Work on run 1234.\n\nWrite the phase.\n")
    call("user-prompt-submit", run_dir, base("UserPromptSubmit", prompt="a nudge"))
    assert not (run_dir / "prompt-submitted").exists()
    pasted = "Work on run 1234.\r\rWrite the phase."  # a terminal's CRs, trimmed
    call("user-prompt-submit", run_dir, base("UserPromptSubmit", prompt=pasted))
    assert (run_dir / "prompt-submitted").exists()


def test_post_tool_use_journals_phase_writes_and_ignores_reads(run_dir: Path) -> None:
    phase = str(run_dir / "phase")
    for payload in (
        base("PostToolUse", tool_name="Bash", tool_input={"command": f"cat '{phase}'"}),
        base("PostToolUse", tool_name="Bash", tool_input={"command": f"grep PHASE {phase}"}),
    ):
        assert call("post-tool-use", run_dir, payload).returncode == 0
    assert not (run_dir / "phase-journal").exists()
    writes = [
        base(
            "PostToolUse",
            tool_name="Bash",
            tool_input={
                "command": f"echo 'PHASE:awaiting_ci' > '{phase}' && echo 'PHASE:done' > '{phase}'"
            },
        ),
        base(
            "PostToolUse",
            tool_name="Write",
            tool_input={"file_path": phase, "content": "PHASE:merged\n"},
        ),
    ]
    for payload in writes:
        assert call("post-tool-use", run_dir, payload).returncode == 0
    journal = [
        json.loads(line)["phase"] for line in (run_dir / "phase-journal").read_text().splitlines()
    ]
    assert journal == ["PHASE:awaiting_ci", "PHASE:done", "PHASE:merged"]
    assert (run_dir / "phase-changed").exists()


@pytest.mark.parametrize(
    ("tool", "tool_input", "wrote"),
    [
        ("Bash", {"command": "echo 'PHASE:done' > '{p}'"}, True),
        ("Bash", {"command": "printf 'PHASE:failed\\nReason: %s\\n' 'x' > \"{p}\""}, True),
        ("Bash", {"command": "echo PHASE:done >> $PHASE_FILE"}, True),
        ("Bash", {"command": "echo PHASE:done | tee {p}"}, True),
        ("Bash", {"command": "echo PHASE:done 1> ${{PHASE_FILE}}"}, True),
        ("Bash", {"command": "cat {p}"}, False),
        ("Bash", {"command": "head -1 '{p}' > /tmp/copy"}, False),
        ("Write", {"file_path": "{p}", "content": "PHASE:done"}, True),
        ("Write", {"file_path": "/elsewhere", "content": "PHASE:done"}, False),
        ("Read", {"file_path": "{p}"}, False),
    ],
)
def test_what_counts_as_a_phase_write(tool: str, tool_input: dict[str, str], wrote: bool) -> None:
    phase = "/srv/runs/x/phase"
    filled = {k: v.format(p=phase) for k, v in tool_input.items()}
    assert writes_phase_file(tool, filled, "/srv/runs/x/worktree", phase) is wrote


def test_stop_failure_records_the_api_error_unless_already_ended(run_dir: Path) -> None:
    # What Claude Code 2.1.197 sends for a 429: the kind, and its text as its last message.
    text = "API Error: Request rejected (429) · rate limited"
    payload = base("StopFailure", error="rate_limit", last_assistant_message=text)
    call("stop-failure", run_dir, payload)
    record = json.loads((run_dir / "api-error").read_text())
    assert (record["kind"], record["message"]) == ("rate_limit", text)
    assert (run_dir / "phase").read_text() == ""  # not a phase: the watcher decides
    # Older versions sent the text as error_details; nothing at all is "unknown".
    call("stop-failure", run_dir, base("StopFailure", error_details="overloaded"))
    record = json.loads((run_dir / "api-error").read_text())
    assert (record["kind"], record["message"]) == ("unknown", "overloaded")
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []
    (run_dir / "api-error").unlink()
    (run_dir / "phase").write_text("PHASE:done\n")
    call("stop-failure", run_dir, base("StopFailure", error="server_error"))
    assert not (run_dir / "api-error").exists()


def test_session_end_marks_the_exit_and_session_start_prints_the_context(run_dir: Path) -> None:
    assert call("session-end", run_dir, base("SessionEnd", reason="logout")).returncode == 0
    assert json.loads((run_dir / "exited").read_text())["reason"] == "logout"
    shown = call("session-start", run_dir, base("SessionStart", source="compact"))
    assert shown.stdout == "## Phase protocol (REQUIRED)\n"
    assert call("session-start", run_dir, base("SessionStart", source="startup")).stdout == ""


@pytest.mark.parametrize("payload", ["not json", "[1, 2]", "", '{"tool_input": 5}'])
@pytest.mark.parametrize(
    "name", ["stop", "post-tool-use", "stop-failure", "guard", "session-end", "user-prompt-submit"]
)
def test_bad_payloads_never_traceback_nor_block(run_dir: Path, name: str, payload: str) -> None:
    proc = call(name, run_dir, payload)
    assert proc.returncode in (0, 1)
    assert "Traceback" not in proc.stderr


@given(st.text(max_size=300))
def test_the_guard_never_raises(command: str) -> None:
    result = guard_reason(command, WORKTREE, "main")
    assert result is None or isinstance(result, str)


# -- the guard ------------------------------------------------------------

DENY = [
    "git push --force origin main",
    "git push -f origin main",
    "git push origin +main",
    "git push --force-with-lease origin main",
    "git push --force-with-lease=main:abc origin main",
    "git push -f",
    "git push --force",
    "git push -fu origin",
    "git -C /x push -f origin main",
    "git -c user.name=x push --force origin HEAD:main",
    "git push origin +HEAD:refs/heads/main",
    "cd sub && git push --force origin main",
    "true; git push -f origin main",
    "false || git push --force origin main",
    "sudo git push -f origin main",
    "env GIT_TRACE=1 git push -f origin main",
    "rm -rf /",
    "rm -fr /home/user",
    "rm -r -f ~/x",
    'rm -rf "$HOME"',
    "rm -rf $HOME/projects",
    "rm -Rf /etc",
    "rm --recursive --force /var/lib",
    "sudo rm -rf /etc",
    "rm -rf ../../other",
    "rm -rf $SOME_DIR",
    "rm -rf /tmp",
    "curl -X POST -H 'Authorization: token ${FORGE_TOKEN}' https://forge/api/v1/repos/a/b/pulls/12/merge",
    "curl -sf -X POST 'https://forge/api/v1/repos/a/b/pulls/7/merge' -d '{}'",
    'curl -X PATCH -d \'{"state": "closed"}\' https://forge/api/v1/repos/a/b/issues/5',
    'curl -X PATCH https://forge/api/v1/repos/a/b/issues/5 -d \'{"state":"closed"}\'',
    "git checkout main",
    "git switch main",
    "git -C . checkout main",
]

ALLOW = [
    "git push origin feature",
    "git push --force origin feature",
    "git push -u origin fix/123",
    "git push origin HEAD:feature",
    "rm -rf /tmp/scratch",
    "rm -rf ./build",
    f"rm -rf {WORKTREE}/build",
    "rm -rf node_modules",
    "rm -f /etc/nothing-recursive",
    "rm -r /dev/shm/x",
    "git checkout -b main-fix",
    "git checkout -- README.md",
    "git checkout main -- README.md",
    "git checkout feature",
    "git switch -c topic",
    "git checkout -B main origin/main",
    "curl -sf https://forge/api/v1/repos/a/b/issues/5",
    'curl -X PATCH -d \'{"state":"open"}\' https://forge/api/v1/repos/a/b/issues/5',
    "echo hello > /tmp/out",
    # An argument that merely spells a command is not the command.
    'echo "git push -f"',
]


@pytest.mark.parametrize("command", DENY)
def test_the_guard_denies(command: str) -> None:
    assert guard_reason(command, WORKTREE, "main") is not None, command


@pytest.mark.parametrize("command", ALLOW)
def test_the_guard_allows(command: str) -> None:
    assert guard_reason(command, WORKTREE, "main") is None, command


def test_a_denial_is_exit_2_with_the_reason_on_stderr(run_dir: Path) -> None:
    payload = base(
        "PreToolUse", tool_name="Bash", tool_input={"command": "git push -f origin main"}
    )
    proc = call("guard", run_dir, payload, "--primary-branch", "main")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "force-pushing to the primary branch 'main' is not allowed" in proc.stderr
    allowed = base("PreToolUse", tool_name="Bash", tool_input={"command": "git status"})
    ok = call("guard", run_dir, allowed)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")


# -- whole runs through the hooks' settings file -------------------------------


def test_two_phase_writes_in_the_same_millisecond_are_both_seen_in_order(fleet: Fleet) -> None:
    # One tool call writes three phases back to back: the phase file alone
    # shows only the last; the PostToolUse journal has all three, in order.
    fleet.add_agent("quick", "phases=awaiting_ci,awaiting_review,done")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("quick")
    assert result["outcome"] == "done"
    assert [p["phase"] for p in result["phases"]] == [
        "PHASE:awaiting_ci",
        "PHASE:awaiting_review",
        "PHASE:done",
    ]


def test_the_guard_stops_a_force_push_inside_a_run(fleet: Fleet) -> None:
    # The crash keeps the run directory, so the agent's own log can be read.
    fleet.add_agent("pusher", "bash=git_push_--force_origin_main bash=git_status crash")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("pusher")
    assert result["outcome"] == "crashed"
    log = Path(result["worktree"]).parent / "phase.agent.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    denied = [e["command"] for e in events if e["event"] == "denied"]
    assert denied == ["git push --force origin main"] * 2  # once per session
    guard_runs = [e for e in events if e["event"] == "hook" and e["hook"] == "PreToolUse"]
    assert sorted({e["code"] for e in guard_runs}) == [0, 2]


def test_a_session_that_ends_is_seen_at_once_through_session_end(fleet: Fleet) -> None:
    fleet.add_agent("quitter", "exit", idle_timeout=120)
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("quitter")
    assert result["outcome"] == "crashed"
    assert result["recoveries"] == 1
