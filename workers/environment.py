"""The agent's environment: all of it decided here, none of it inherited by accident.

A tmux pane inherits the environment of whoever started the tmux server (a
person's shell, another HOME, secrets exported there), so the launcher
replaces it with this one. It holds what a program needs to run as the
worker's user, the agent's credentials, and what the agent's config adds:
``env`` (literal values) and ``pass_env`` (names copied from the worker).
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Mapping
from pathlib import Path

from workers.config import AgentConfig

BASICS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR")
# Credentials an agent CLI needs, passed on when the worker has them: Claude
# Code's (and its stand-ins'); the other CLIs' drivers name their own.
CREDENTIALS = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")
# A login shell that runs no commands (a service account's) is no SHELL for
# an agent, whose tools start shells with it.
_NO_SHELLS = ("nologin", "false")


def agent_env(
    agent: AgentConfig,
    source: Mapping[str, str] | None = None,
    credentials: tuple[str, ...] = CREDENTIALS,
) -> dict[str, str]:
    """The agent's environment, from the worker's ``source`` (``os.environ``).

    ``credentials`` are the variables its CLI authenticates with (its
    driver's), passed on when the worker has them.
    """
    source = os.environ if source is None else source
    env = {name: source[name] for name in BASICS if name in source}
    env.update({name: value for name, value in source.items() if name.startswith("LC_")})
    env.setdefault("LANG", "C.UTF-8")
    env.setdefault("HOME", str(Path.home()))
    env["SHELL"] = usable_shell(source.get("SHELL") or login_shell())
    env.update({name: source[name] for name in credentials if name in source})
    if agent.forge_token_env in source:
        env["FORGE_TOKEN"] = source[agent.forge_token_env]
    env.update({name: source[name] for name in agent.pass_env if name in source})
    env.update(agent.env)
    return env


def missing_pass_env(agent: AgentConfig, source: Mapping[str, str] | None = None) -> list[str]:
    """The agent's ``pass_env`` names the worker's environment does not have."""
    source = os.environ if source is None else source
    return [name for name in agent.pass_env if name not in source]


def login_shell() -> str | None:
    """This user's login shell from the password database."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_shell or None
    except KeyError:
        return None


def usable_shell(shell: str | None) -> str:
    """``shell`` when it runs commands, else bash (or sh)."""
    if shell and os.access(shell, os.X_OK) and Path(shell).name not in _NO_SHELLS:
        return shell
    return shutil.which("bash") or "/bin/sh"
