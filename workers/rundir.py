"""The files of a run's private directory, each named once.

The worker, the hooks and the launcher all read and write these. The hooks
and the launcher run in the agent's pane as plain scripts (``python -I -S
<file>``), so this module imports nothing but the standard library.
"""

from __future__ import annotations

# Written by formulabeat before the agent starts.
PHASE = "phase"
PROMPT = "prompt.md"
# What a resumed session is told instead of the whole prompt again.
RESUME = "resume.md"
CONTEXT = "context.md"
LAUNCH = "launch.json"
# The agent CLI's hook settings, given to it on its command line (--settings),
# so nothing of formulabeat's lands in the worktree the agent commits from.
AGENT_SETTINGS = "agent-settings.json"
OUTPUT = "output.log"

# Written by the launcher's shell parent when the agent exits (tmux 3.3
# sometimes marks a pane dead without its status).
EXIT_STATUS = "exit-status"

# Written by the hooks.
PROMPT_SUBMITTED = "prompt-submitted"  # UserPromptSubmit saw this run's prompt
JOURNAL = "phase-journal"
PHASE_CHANGED = "phase-changed"
HOOKS_LIVE = "hooks-live"
IDLE = "idle"
EXITED = "exited"
NUDGES = "nudges"
# The CLI started its session (SessionStart): a CLI that draws its input box
# before it takes input (Gemini CLI) is ready only once this is there.
SESSION_STARTED = "session-started"
# A turn ended on an API error (Claude Code's StopFailure hook): a JSON object
# {"at", "kind", "message"}, replaced whole by the next one. The watcher decides
# whether the run waits and goes on, or fails (workers.apierrors).
API_ERROR = "api-error"

# Written by the worker: the agent confirmed the prompt. A worker killed
# before it could publish RUNNING leaves this on the host, so the adopter
# follows the session instead of pasting a second copy of the prompt.
PROMPT_DELIVERED = "prompt-delivered"
PRESERVED = "PRESERVED.json"
# The transcript reader's place and counts (workers.usage), for an adopter.
USAGE = "usage.json"

# What the watcher wakes for: a write of any other file in a run directory
# (the prompt, the reader's state, a temporary file) tells it nothing.
WAKE_NAMES = frozenset(
    {
        PHASE,
        JOURNAL,
        PHASE_CHANGED,
        HOOKS_LIVE,
        IDLE,
        EXITED,
        EXIT_STATUS,
        PROMPT_SUBMITTED,
        API_ERROR,
    }
)

# Stale after a session ends: a recovered session must earn them again.
SESSION_MARKERS = (EXIT_STATUS, PROMPT_DELIVERED, PROMPT_SUBMITTED, EXITED, IDLE, SESSION_STARTED)
