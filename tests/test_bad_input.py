"""The bad input corpus: each bad input gives its exact error and leaves nothing behind.

After every bad run: no lease in Redis, no tmux session, no run directory
(except a crash's preserved one), and the same worker still serves a good run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import Fleet, commit_files, held_claims, tmux_sessions
from workers.embedded import EmbeddedRedis, free_port

# A POSIX sh agent that shows a prompt, waits for the pasted prompt's phase
# line, then does to the phase file what its first argument says.
SH_AGENT = r"""#!/bin/sh
printf '\342\235\257 '
while IFS= read -r line; do
  case "$line" in
    "echo 'PHASE:done' > '"*) break ;;
  esac
done
case "$1" in
  binary) printf 'PHASE:\377\376\n' > "$PHASE_FILE" ;;
  huge) truncate -s 100M "$PHASE_FILE" ;;
  symlink) rm -f "$PHASE_FILE"; ln -s /etc/hostname "$PHASE_FILE" ;;
  fifo) rm -f "$PHASE_FILE"; mkfifo "$PHASE_FILE" ;;
esac
sleep 60
"""

BIG = "x" * (250 * 1024) + "\n"

# agent name -> (agent options, files to commit, expected outcome, expected reason)
CASES: dict[str, tuple[dict[str, object], dict[str, str], str, str]] = {
    "formula-missing": (
        {"formula": "project/formulas/nope.toml"},
        {},
        "failed",
        "formula {root}/project/formulas/nope.toml not found",
    ),
    "formula-malformed": (
        {},
        {"formulas/formula-malformed.toml": "name = \n"},
        "failed",
        "formula {root}/project/formulas/formula-malformed.toml: not valid TOML: "
        "Invalid value (at line 1, column 8)",
    ),
    "formula-stepless": (
        {},
        {"formulas/formula-stepless.toml": 'name = "x"\n'},
        "failed",
        "formula {root}/project/formulas/formula-stepless.toml: has no steps: "
        "add at least one [[steps]] table",
    ),
    "formula-step-without-title": (
        {},
        {"formulas/formula-step-without-title.toml": 'name = "x"\n[[steps]]\nid = "a"\n'},
        "failed",
        "formula {root}/project/formulas/formula-step-without-title.toml:2: "
        "steps[0] needs 'title' as a non-empty string",
    ),
    "context-dotdot": (
        {"context": ["../secret.txt"]},
        {},
        "failed",
        "context '../secret.txt': '..' may not leave the repository",
    ),
    "context-absolute": (
        {"context": ["/etc/passwd"]},
        {},
        "failed",
        "context '/etc/passwd': must be a path relative to its repository",
    ),
    "context-symlink": (
        {"context": ["escape.md"]},
        {},
        "failed",
        "context 'escape.md': resolves outside its repository (symlink)",
    ),
    "context-ops-dotdot": (
        {"context": ["ops:../secret.txt"]},
        {},
        "failed",
        "context 'ops:../secret.txt': '..' may not leave the repository",
    ),
    "prompt-too-big": (
        {"context": [f"big{i}.md" for i in range(5)]},
        {f"big{i}.md": BIG for i in range(5)},
        "failed",
        "the prompt is",
    ),
    "command-missing": (
        {"command": "no-such-agent-cli --flag"},
        {},
        "failed",
        "agent command 'no-such-agent-cli' (agents proj/command-missing: command) "
        "not found on PATH",
    ),
    "command-exits-at-once": (
        {"command": "sh -c 'echo starting; exit 3'"},
        {},
        "failed",
        "the agent ended (exit status 3) before it was ready; its screen: starting",
    ),
    "no-ready-prompt": (
        {"command": "sh -c 'echo Please log in:; sleep 60'"},
        {},
        "failed",
        "the agent did not become ready within 3 s (no ready prompt '❯' at a line start); "
        "its screen: Please log in:",
    ),
    "phase-binary": ({"command": "{agent} binary"}, {}, "failed", "is not UTF-8 text (byte 6)"),
    "phase-100mb": ({"command": "{agent} huge"}, {}, "failed", "is 104857600 bytes (limit 65536)"),
    "phase-symlink": ({"command": "{agent} symlink"}, {}, "failed", "is a symlink"),
    "phase-fifo": ({"command": "{agent} fifo"}, {}, "failed", "is not a regular file"),
    "disabled": ({"enabled": False}, {}, "skipped", "agent proj/disabled is disabled"),
    "low-memory": ({"min_memory_mb": 10**9}, {}, "skipped", "low memory:"),
}


@pytest.fixture
def corpus(fleet: Fleet) -> Fleet:
    agent = fleet.root / "sh-agent"
    agent.write_text(SH_AGENT)
    agent.chmod(0o755)
    (fleet.root / "secret.txt").write_text("outside\n")
    os.symlink(fleet.root / "secret.txt", fleet.repo / "escape.md")
    files: dict[str, str] = {}
    for name, (options, extra, _, _) in CASES.items():
        fleet.add_agent(name)
        files.update(extra)
        resolved = {
            k: (v.format(agent=agent) if isinstance(v, str) else v) for k, v in options.items()
        }
        fleet.agents[name].update(resolved)
    commit_files(fleet.repo, files)
    fleet.add_agent("good")
    fleet.write_config()
    text = fleet.config_path.read_text().replace(
        "ready_quiet = 0.2", "ready_quiet = 0.2\nready_timeout = 3"
    )
    fleet.config_path.write_text(text)
    fleet.start_worker()
    return fleet


def test_each_bad_input_gives_its_error_and_leaves_nothing(
    corpus: Fleet, redis_client: redis.Redis
) -> None:
    assert len(CASES) >= 18
    for name, (_, _, outcome, reason) in CASES.items():
        result = corpus.run(name)
        expected = reason.format(root=corpus.root)
        assert (result["outcome"], name) == (outcome, name)
        assert expected in (result["reason"] or ""), (name, result["reason"])
        assert held_claims(redis_client) == [], name
        assert tmux_sessions(corpus.tmux_socket) == [], name
        runs = corpus.root / "state" / "runs"
        assert not runs.exists() or list(runs.iterdir()) == [], name
    # The same worker still serves.
    assert corpus.run("good")["outcome"] == "done"


def test_a_missing_or_non_git_repo_fails_the_run_clearly(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("planner")
    fleet.write_config()
    for repo, problem in (("missing", "does not exist"), ("plain", "is not a git repository")):
        if repo == "plain":
            (fleet.root / "plain").mkdir()
        text = fleet.config_path.read_text()
        fleet.config_path.write_text(text.replace('repo_root = "project"', f'repo_root = "{repo}"'))
        stack = fleet.start_worker(f"host-{repo}")
        result = fleet.run("planner")
        assert result["outcome"] == "failed"
        assert result["reason"] == f"repository {fleet.root / repo} {problem}" or (
            result["reason"] == f"{fleet.root / repo} {problem}"
        )
        assert held_claims(redis_client) == []
        stack.stop()
        fleet.stacks.remove(stack)
        fleet.config_path.write_text(text)


def _path_without(tmp_path: Path, missing: str) -> str:
    """A PATH with sh, python and git/tmux, less ``missing``."""
    bin_dir = tmp_path / f"bin-without-{missing}"
    bin_dir.mkdir()
    for tool in ("sh", "git", "tmux", "env", "ls", "cat"):
        found = shutil.which(tool)
        if tool != missing and found:
            os.symlink(found, bin_dir / tool)
    return str(bin_dir)


@pytest.mark.parametrize(
    ("missing", "reason"),
    [
        ("tmux", "tmux not found on PATH: install tmux"),
        ("git", "git not found on PATH: install git (apt-get install git)"),
    ],
)
def test_tmux_or_git_missing_from_path(
    fleet: Fleet,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    missing: str,
    reason: str,
) -> None:
    fleet.add_agent(
        "planner", command=f"{sys.executable} -m workers.scripted_agent", driver="scripted"
    )
    fleet.write_config()
    monkeypatch.setenv("PATH", _path_without(fleet.root, missing))
    fleet.start_worker()
    monkeypatch.undo()
    result = fleet.run("planner")
    assert result["outcome"] == "failed"
    assert reason in result["reason"]
    assert held_claims(redis_client) == []
    runs = fleet.root / "state" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


def test_unreachable_redis_and_a_wrong_password_are_one_clear_line(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    commit_files(
        tmp_path / "repo", {"f.toml": 'name = "x"\n[[steps]]\nid="a"\ntitle="t"\ndescription="d"\n'}
    )
    wrong = redis_server.url.replace("://:", "://:wrong")
    for url, expected in (
        (f"redis://127.0.0.1:{free_port()}/0", "cannot reach Redis at redis://127.0.0.1:"),
        (wrong, "refused the password: fix the password in [broker] url"),
    ):
        config = tmp_path / "formulabeat.toml"
        config.write_text(
            f'state_dir = "state"\n[broker]\nurl = "{url}"\n'
            '[[projects]]\nname = "p"\nrepo_root = "repo"\n'
            '[[agents]]\nname = "a"\nproject = "p"\nformula = "repo/f.toml"\n'
            'schedule = "* * * * *"\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "--config", str(config), "run", "p", "a"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 4, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("formulabeat: "), proc.stderr
        assert expected in lines[0]
        assert "wrong" not in lines[0] or "***" in lines[0]
        assert "Traceback" not in proc.stderr


def test_a_worktree_path_already_taken_is_refused_and_left_alone(tmp_path: Path) -> None:
    from workers.errors import RepoError
    from workers.worktrees import add_worktree

    commit_files(tmp_path / "repo", {"README.md": "x\n"})
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine\n")
    with pytest.raises(RepoError, match=f"worktree path {taken} is already taken"):
        add_worktree(tmp_path / "repo", taken)
    assert (taken / "keep.txt").read_text() == "mine\n"
