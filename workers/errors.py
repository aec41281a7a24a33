"""Typed errors: each one carries the sentence the user must read.

Tasks turn these into run results (outcome ``failed`` or ``skipped`` with the
message as ``reason``); the CLI prints them without a traceback.
"""

from __future__ import annotations


class FormulabeatError(Exception):
    """Base of every error formulabeat reports to a user."""


class ConfigError(FormulabeatError):
    """The configuration file is missing, malformed or inconsistent."""

    def __init__(self, path: object, key: str | None, problem: str) -> None:
        where = f"{path}" if key is None else f"{path}: {key}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.key = key
        self.problem = problem


class FormulaError(FormulabeatError):
    """A formula file is missing or not a valid formula."""


class ContextError(FormulabeatError):
    """A context file path is unsafe (leaves its repository)."""


class RepoError(FormulabeatError):
    """A git operation on a project or ops repository failed."""


class SessionError(FormulabeatError):
    """The agent's tmux session could not be started or driven."""


class PhaseFileError(FormulabeatError):
    """The phase file cannot be read as a phase (binary, huge, not a file)."""


class BrokerError(FormulabeatError):
    """Redis (broker, backend or locks) is unreachable or misconfigured."""
