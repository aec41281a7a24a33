"""formulabeat's scripted agent (``formulabeat-scripted-agent``): a test double of a driver.

It speaks Claude Code's hook protocol (settings from ``--settings``, the
UserPromptSubmit confirmation, the Stop hook's nudges) but draws a plain
prompt character and shows no dialogs: the tests, the demo and the benchmark
drive it through the same interface as the real CLI.
"""

from __future__ import annotations

import re

from workers.agents.base import EMPTY, OTHER_HELD, PROMPT_HELD, HookedDriver, Launch

_PASTED = re.compile(r"\[pasted (\d+) bytes\]")


class Scripted(HookedDriver):
    """The scripted stand-in for Claude Code (driver ``scripted``)."""

    name = "scripted"
    # It keeps no conversation: a crashed one starts again with the prompt. It
    # writes a transcript (scenario token chatter=S) as Claude Code does.
    resumes = False
    transcripts = True
    shows_input = True

    def input_state(self, screen: str, launch: Launch) -> str:
        """It prints ``[pasted N bytes]`` once a paste arrived (on its prompt's line)."""
        lines = [line for line in screen.splitlines() if line.strip()]
        shown = _PASTED.search(lines[-1]) if lines else None
        if shown is None:
            return EMPTY
        size = len(launch.prompt_file.read_bytes())
        return PROMPT_HELD if int(shown.group(1)) == size else OTHER_HELD


DRIVER = Scripted()
