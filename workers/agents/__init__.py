"""The agent CLIs formulabeat drives, by name: one module per CLI.

A config's ``[[agents]] driver`` names one; without it, a command whose
program is ``claude`` gets ``claude-code`` and any other ``plain``. Another
CLI (Codex, Gemini, Aider) is one more module and one more entry here.
"""

from __future__ import annotations

from workers.agents.base import AgentDriver, Launch, PromptDriver
from workers.agents.claude_code import ClaudeCode
from workers.agents.scripted import Scripted

DRIVERS: dict[str, AgentDriver] = {
    driver.name: driver for driver in (ClaudeCode(), Scripted(), PromptDriver())
}

__all__ = ["DRIVERS", "AgentDriver", "Launch", "driver_for"]


def driver_for(name: str) -> AgentDriver:
    """The driver called ``name`` (config validation keeps unknown names out)."""
    return DRIVERS[name]
