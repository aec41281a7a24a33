"""The real Claude Code CLI in tests: where it is, a HOME it ran in, and its agent config.

``make test`` installs the pinned CLI into ``.claude-cli/`` of the checkout.
Without it the real-CLI tests skip, saying why, unless
``FORMULABEAT_REQUIRE_REAL_CLI=1`` (set by ``.ci/run``) makes that a failure.
The CLI talks to the Messages API stand-in (tests/messages_api.py) the tests
start; nothing reaches the internet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.conftest import Fleet
    from tests.messages_api import MessagesAPI

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = ROOT / ".claude-cli" / "node_modules" / ".bin" / "claude"
REQUIRE_ENV = "FORMULABEAT_REQUIRE_REAL_CLI"
# Any key the stand-in accepts; the CLI keeps its last 20 characters when approved.
API_KEY = "sk-ant-standin-0123456789abcdefghijklmnop"
# Offline and quiet: no updater, no telemetry, no fetches beyond the API.
QUIET = {"DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
BYPASS = "--dangerously-skip-permissions"


def find_claude() -> tuple[Path | None, str]:
    """The CLI to test (``$FORMULABEAT_CLAUDE``, else the pinned one), or None and why not."""
    override = os.environ.get("FORMULABEAT_CLAUDE")
    binary = Path(override) if override else INSTALLED
    if binary.exists():
        return binary, ""
    return None, (
        f"the Claude Code CLI is not installed at {binary}: `make claude-cli` installs it "
        "with npm" + ("" if shutil.which("npm") else " (npm not found: apt-get install npm)")
    )


def claude_binary() -> Path:
    """The CLI to test, or a skip (a failure where the CI requires it) that says why."""
    binary, why = find_claude()
    if binary is not None:
        return binary
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(why)
    pytest.skip(why)


def sandbox_env() -> dict[str, str]:
    """IS_SANDBOX=1 when the tests run as root: the CLI refuses bypass mode as root otherwise."""
    return {"IS_SANDBOX": "1"} if os.geteuid() == 0 else {}


def cli_env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    """The agent environment of a real-CLI run: its HOME, the stand-in, the key."""
    return {
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": api_url,
        "ANTHROPIC_API_KEY": API_KEY,
        **QUIET,
        **sandbox_env(),
        **extra,
    }


def agent_options(binary: Path, home: Path, api_url: str, **env: str) -> dict[str, Any]:
    """``[[agents]]`` options for a Fleet agent that runs the real CLI."""
    return {
        "command": f"{binary} {BYPASS}",
        "driver": "claude-code",
        "env": cli_env(home, api_url, **env),
    }


def run_by_hand_once(binary: Path, home: Path, api_url: str, tmux_socket: str) -> None:
    """Set HOME up as a person does: run ``claude`` once and answer its questions.

    Onboarding checks api.anthropic.com, which this machine cannot reach, so
    it is marked done first, as it would be after a person's first run
    online; then the CLI really runs in tmux and its trust, API-key and
    bypass-mode dialogs are answered with the keys a person presses.
    """
    home.mkdir(parents=True, exist_ok=True)
    (home / ".claude.json").write_text(json.dumps({"hasCompletedOnboarding": True}))
    tmux = ["tmux", "-L", tmux_socket]
    env = {**cli_env(home, api_url), "PATH": os.environ["PATH"], "TERM": "xterm-256color"}
    command = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), str(binary), BYPASS]
    new = [*tmux, "new-session", "-d", "-s", "by-hand", "-x", "200", "-y", "50", "-c", str(home)]
    subprocess.run([*new, *command], check=True, timeout=10)
    answers = {
        "Yes, I trust this folder": "1",
        "Detected a custom API key": "1",
        "Yes, I accept": "2",
    }
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "by-hand"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            if any(line.startswith("❯") for line in screen.splitlines()):
                return
            for words, key in answers.items():
                if words in screen:
                    subprocess.run(
                        [*tmux, "send-keys", "-t", "by-hand", key], timeout=10, check=True
                    )
                    time.sleep(0.5)
                    break
            time.sleep(0.2)
        raise AssertionError(f"claude did not reach its input box by hand; screen:\n{screen}")
    finally:
        subprocess.run([*tmux, "kill-session", "-t", "by-hand"], timeout=10, check=False)


def real_agent(
    fleet: Fleet,
    name: str,
    scenario: str,
    claude: Path,
    home: Path,
    api: MessagesAPI,
    **options: object,
) -> None:
    """Add an agent that runs the real CLI in ``home`` against the stand-in."""
    settings = agent_options(claude, home, api.url)
    settings["env"].update(options.pop("env", {}))  # type: ignore[union-attr]
    for variable in options.pop("drop_env", ()):  # type: ignore[attr-defined]
        settings["env"].pop(variable, None)
    fleet.add_agent(name, scenario, **{**settings, **options})
