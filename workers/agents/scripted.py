"""formulabeat's scripted agent (``formulabeat-scripted-agent``): a test double of a driver.

It speaks Claude Code's hook protocol (settings from ``--settings``, the
UserPromptSubmit confirmation, the Stop hook's nudges) but draws a plain
prompt character and shows no dialogs: the tests, the demo and the benchmark
drive it through the same interface as the real CLI.
"""

from __future__ import annotations

from workers.agents.base import HookedDriver


class Scripted(HookedDriver):
    """The scripted stand-in for Claude Code (driver ``scripted``)."""

    name = "scripted"

    def holds_text(self, screen: str) -> bool:
        """It prints ``[pasted N bytes]`` when a paste arrived and no Enter yet."""
        lines = [line for line in screen.splitlines() if line.strip()]
        return bool(lines) and lines[-1].startswith("[pasted ")
