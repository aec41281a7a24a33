"""The real agent CLIs in tests: where they are, a HOME each ran in, their agent config.

``make test`` installs the pinned Claude Code CLI into ``.claude-cli/`` and
the pinned Codex and Gemini CLIs into ``.agent-clis/`` of the checkout.
Without them the real-CLI tests skip, saying why, unless
``FORMULABEAT_REQUIRE_REAL_CLI=1`` (set by ``.ci/run``) makes that a failure.
Each CLI talks to an API stand-in the tests start (tests/messages_api.py,
tests/responses_api.py, tests/gemini_api.py); nothing reaches the internet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
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


# -- Codex CLI and Gemini CLI --------------------------------------------------------

# `make test` installs both, pinned, into .agent-clis/ (the Makefile's versions).
AGENT_CLIS = ROOT / ".agent-clis" / "node_modules" / ".bin"
# What Codex is told to use (its config's model, the stand-in's answer) and the
# model Gemini CLI's router picks for a simple task (measured with 0.61.0).
CODEX_MODEL = "stub-model"
GEMINI_MODEL = "gemini-3.8-flash"
OPENAI_KEY = "sk-standin-openai-0123456789"
GEMINI_KEY = "standin-gemini-key-0123456789"
CODEX_BYPASS = "--dangerously-bypass-approvals-and-sandbox"
GEMINI_YOLO = "--approval-mode yolo"


def agent_binary(name: str) -> Path:
    """Codex's or Gemini CLI's binary, or a skip (a failure where the CI requires it)."""
    override = os.environ.get(f"FORMULABEAT_{name.upper()}")
    binary = Path(override) if override else AGENT_CLIS / name
    if binary.exists():
        return binary
    why = f"the {name} CLI is not installed at {binary}: `make agent-clis` installs it with npm" + (
        "" if shutil.which("npm") else " (npm not found: apt-get install npm)"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(why)
    pytest.skip(why)


def codex_setup(home: Path, base_url: str) -> Path:
    """Set HOME up as a person does for Codex: a model provider that takes an API key.

    ``~/.codex/config.toml`` names the stand-in as the provider (the
    Responses API, its key from OPENAI_API_KEY); nothing else: formulabeat
    records the trust of each repository itself.
    """
    codex = home / ".codex"
    codex.mkdir(parents=True, exist_ok=True)
    (codex / "config.toml").write_text(
        f'model = "{CODEX_MODEL}"\nmodel_provider = "standin"\n\n'
        "[model_providers.standin]\n"
        'name = "standin"\n'
        f'base_url = "{base_url}"\n'
        'env_key = "OPENAI_API_KEY"\n'
        'wire_api = "responses"\n'
    )
    return home


def codex_env(home: Path, **extra: str) -> dict[str, str]:
    """The agent environment of a Codex run: its HOME and the key its provider reads."""
    return {"HOME": str(home), "OPENAI_API_KEY": OPENAI_KEY, **extra}


def gemini_setup(home: Path) -> Path:
    """Set HOME up as a person does for Gemini CLI with an API key: its auth type chosen."""
    gemini = home / ".gemini"
    gemini.mkdir(parents=True, exist_ok=True)
    settings = {"security": {"auth": {"selectedType": "gemini-api-key"}}}
    (gemini / "settings.json").write_text(json.dumps(settings))
    return home


def gemini_env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    """The agent environment of a Gemini CLI run: its HOME, the stand-in, the key."""
    return {
        "HOME": str(home),
        "GOOGLE_GEMINI_BASE_URL": api_url,
        "GEMINI_API_KEY": GEMINI_KEY,
        **extra,
    }


@dataclass
class AgentCLI:
    """One real agent CLI, set up for tests: the same scenario runs on each of them."""

    driver: str
    binary: Path
    # A HOME where its user set it up (tests/conftest.py makes one per session).
    home: Path
    # Its API stand-in: ``for_run``, ``main_exchanges``, ``exchanges``.
    api: Any
    # The model its transcript names (what a price is keyed by).
    model: str
    # Its command line, beyond the binary.
    flags: str
    # The agent environment for a HOME.
    env: Callable[[Path], dict[str, str]]
    # What the stand-in billed for some exchanges, by formulabeat's kinds.
    billed: Callable[[list[Any]], dict[str, int]]
    # Words the reason of a run in a HOME where the CLI never ran must have.
    fresh_reason: tuple[str, ...]

    def options(self, home: Path | None = None, **env: str) -> dict[str, Any]:
        """``[[agents]]`` options for a Fleet agent that runs this CLI."""
        return {
            "command": f"{self.binary} {self.flags}",
            "driver": self.driver,
            "env": {**self.env(home or self.home), **env},
        }

    def price_table(self) -> str:
        """A ``[prices."<model>"]`` table for its model (the same prices for each CLI)."""
        return (
            f'\n[prices."{self.model}"]\ninput = 15\noutput = 75\ncache_read = 1.5\n'
            "cache_creation = 18.75\n"
        )
