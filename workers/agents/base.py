"""What every agent driver does, and the plain driver for any CLI that shows a prompt.

A driver knows one agent CLI: the command line it is started with, what it
needs in the run directory, what its screen says before it takes input
(ready, a dialog to answer, a dialog to report), how the prompt is delivered
and how its arrival is confirmed, and what ``formulabeat doctor`` checks for
it. Nothing here knows tmux beyond :class:`workers.tmux.AgentSession`, and
the session machinery knows nothing of any CLI.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from workers.apierrors import ApiErrorRecord, ApiFailure, classify
from workers.checks import Check
from workers.config import AgentConfig, MonitorConfig
from workers.environment import CREDENTIALS
from workers.errors import SessionError
from workers.hooks import HOOKS, hook_line, settings
from workers.rundir import AGENT_SETTINGS, PROMPT, PROMPT_SUBMITTED, RESUME
from workers.statedir import write_private
from workers.tmux import AgentSession, screen_tail
from workers.usage import CLAUDE_TRANSCRIPT, TranscriptFormat

log = logging.getLogger("formulabeat.agents")

POLL_MIN = 0.02
POLL_MAX = 0.25
# A CLI's screen stays the same for most of its start (node loading), then
# shows its prompt: for this long after the start the poll stays short, so
# the prompt is seen within POLL_START, not a backed-off POLL_MAX, late.
START_WINDOW = 2.0
POLL_START = 0.04
# A TUI may still be taking a paste in; an Enter inside it would be text.
PASTE_SETTLE = 0.02
# How long a CLI whose input shows what it holds may take to show the paste:
# a screen read right ends the wait at once, so it is long enough for a busy
# machine (a test fails when it runs out).
PASTE_WAIT = 10.0
# A paste still held this long after its Enter gets one more Enter.
ENTER_AGAIN_AFTER = 3.0
# How often one dialog may be answered before it counts as stuck.
MAX_ANSWERS = 2
_BOX_CHARS = "│┃|║ \t"


@dataclass(frozen=True)
class Launch:
    """What a driver knows of one run's session."""

    run_id: str
    run_dir: Path
    worktree: Path
    # Where formulabeat makes every worktree of this host (trusted as a whole).
    worktree_root: Path
    primary_branch: str
    hook_command: tuple[str, ...]
    # The agent's whole environment, as the launch file gives it (before the
    # driver's own additions, workers.agents.base.AgentDriver.launch_env).
    env: Mapping[str, str]
    # The conversation id formulabeat gives the CLI, and whether this session
    # resumes it (told to go on, not given the whole prompt again).
    session_uuid: str | None = None
    resume: bool = False
    # The project's repository (a CLI may trust it, rather than the worktree).
    repo_root: Path | None = None

    @property
    def prompt_file(self) -> Path:
        """What this session is given: the prompt, or the resume message."""
        return self.run_dir / (RESUME if self.resume else PROMPT)


@dataclass(frozen=True)
class Setup:
    """Where an agent's runs happen, for ``formulabeat doctor``."""

    # Where formulabeat makes every worktree of this host.
    worktree_root: Path
    # The agent's project repository.
    repo_root: Path


@dataclass(frozen=True)
class Ready:
    """The agent takes input now."""


@dataclass(frozen=True)
class Wait:
    """Not yet: look again."""


@dataclass(frozen=True)
class Answer:
    """A dialog formulabeat answers: press ``keys``."""

    keys: tuple[str, ...]
    what: str


@dataclass(frozen=True)
class Refuse:
    """A screen formulabeat will not type into: the run fails with ``reason``."""

    reason: str


Verdict = Ready | Wait | Answer | Refuse


@dataclass(frozen=True)
class OneshotReport:
    """A one-shot CLI's own account of its run."""

    usage: dict[str, dict[str, int]]
    cost_usd: float | None
    # The answer's text, for the result's output tail.
    text: str


# What an agent's input holds (PromptDriver.input_state).
EMPTY = "empty"
PROMPT_HELD = "prompt"
OTHER_HELD = "other"


class AgentDriver(Protocol):
    """One agent CLI, as formulabeat drives it."""

    name: str
    # The programs whose command gets this driver when the agent names none.
    programs: tuple[str, ...]
    hooks: bool
    # Whether the driver can read what the CLI's input holds off its screen.
    shows_input: bool
    # Whether a crashed session can be resumed with its conversation (else the
    # prompt is given to a new one); whether formulabeat names the
    # conversation before it starts (else the CLI does, and its hooks tell);
    # whether the CLI writes a transcript carrying the tokens used, and in
    # what format (workers.usage).
    resumes: bool
    names_sessions: bool
    transcripts: bool
    transcript_format: TranscriptFormat
    # The worker's variables the agent gets when the worker has them (its
    # vendor's keys), before its pass_env and env.
    credentials: tuple[str, ...]

    def command(self, agent: AgentConfig, launch: Launch, oneshot: bool) -> list[str]:
        """The agent's argument vector for this session."""

    def launch_env(self, agent: AgentConfig, launch: Launch) -> dict[str, str]:
        """Variables the driver adds to the agent's environment for this run."""

    def install(self, agent: AgentConfig, launch: Launch) -> None:
        """Put what the CLI needs for this run in place (hooks, trust); raises SessionError."""

    def wait_ready(
        self, session: AgentSession, agent: AgentConfig, launch: Launch, timing: MonitorConfig
    ) -> None:
        """Return once the agent takes input, answering the dialogs it may; else SessionError."""

    def deliver(
        self, session: AgentSession, agent: AgentConfig, launch: Launch, timing: MonitorConfig
    ) -> None:
        """Give the agent its prompt and return once it confirmed it; else SessionError."""

    def ended(self, how: str, screen: str, agent: AgentConfig, launch: Launch) -> str:
        """Why a session ended, from its last screen (with the fix when the screen is known)."""

    def checks(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[Check]:
        """What ``formulabeat doctor`` checks for this agent (empty when nothing applies)."""

    def fix(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[str]:
        """Apply the setup fixes a user may delegate; what was changed, a line each."""

    def oneshot_report(self, output: str, launch: Launch) -> OneshotReport | None:
        """What a one-shot run's output says it used and cost (None: it says nothing)."""

    def api_failure(self, kind: str, message: str, now: float) -> ApiFailure:
        """How an API error that ended a turn is judged: wait and go on, or fail with the fix."""

    def oneshot_api_error(self, output: str, launch: Launch) -> ApiErrorRecord | None:
        """The API error a one-shot run ended on, where no hook of the CLI records it."""

    def environment_defaults(self) -> Mapping[str, str]:
        """Variables the CLI gets unless the agent's ``env`` or ``pass_env`` gives them."""


class PromptDriver:
    """Any CLI that shows a prompt character when it waits for input (driver ``plain``).

    It knows no dialogs and runs no hooks: ready is the prompt character at
    the start of one of the last lines with the screen unchanged for
    ``ready_quiet``; delivery is confirmed when the screen moved after the
    paste and the agent still runs (the fallback for agents without hooks).
    """

    name = "plain"
    programs: tuple[str, ...] = ()
    hooks = False
    resumes = False
    names_sessions = False
    transcripts = False
    transcript_format: TranscriptFormat = CLAUDE_TRANSCRIPT
    credentials: tuple[str, ...] = CREDENTIALS
    # Whether input_state can tell what the CLI's input holds (its screen shows it).
    shows_input = False

    # -- command line and files ----------------------------------------------
    def command(self, agent: AgentConfig, launch: Launch, oneshot: bool) -> list[str]:
        """The configured command, with ``--model`` when a model is set."""
        return agent.argv()

    def launch_env(self, agent: AgentConfig, launch: Launch) -> dict[str, str]:
        """Nothing beyond the run's environment."""
        return {}

    def install(self, agent: AgentConfig, launch: Launch) -> None:
        """Nothing to install for a plain CLI."""

    # -- readiness -------------------------------------------------------------
    def judge(
        self, screen: str, quiet: float, agent: AgentConfig, launch: Launch, timing: MonitorConfig
    ) -> Verdict:
        """What the screen says now (``quiet``: seconds it has not changed)."""
        if quiet >= timing.ready_quiet and prompt_shown(screen, agent.ready_prompt):
            return Ready()
        return Wait()

    def wait_ready(
        self, session: AgentSession, agent: AgentConfig, launch: Launch, timing: MonitorConfig
    ) -> None:
        """Watch the screen until :meth:`judge` says ready, answering what it answers."""
        started = time.monotonic()
        deadline = started + timing.ready_timeout
        last, changed_at, poll = None, started, POLL_MIN
        answered: dict[str, int] = {}
        # The screen an answer was pressed on, and when: until the agent draws
        # another (or stays silent for settle_seconds: the key was lost), the
        # dialog it still shows is the one answered. A loaded machine is slow
        # to redraw, and a second key would land on the next screen.
        pressed_on: tuple[str, float] | None = None
        while True:
            self._alive_or_raise(session, agent, launch, "before it was ready")
            screen = session.capture()
            now = time.monotonic()
            # Look often right after the screen changed (the prompt may just
            # have appeared), less and less while it stays the same: a fleet
            # starting hundreds of agents does not spend its CPU looking.
            if screen != last:
                last, changed_at, poll = screen, now, POLL_MIN
            else:
                ceiling = POLL_START if now - started < START_WINDOW else POLL_MAX
                poll = min(ceiling, poll * 1.5)
            verdict = self.judge(screen, now - changed_at, agent, launch, timing)
            if isinstance(verdict, Ready):
                return
            if isinstance(verdict, Refuse):
                raise SessionError(verdict.reason)
            reacting = (
                pressed_on is not None
                and pressed_on[0] == screen
                and now - pressed_on[1] < timing.settle_seconds
            )
            if isinstance(verdict, Answer) and not reacting:
                count = answered.get(verdict.what, 0)
                if count >= MAX_ANSWERS:
                    raise SessionError(
                        f"answered {verdict.what} {count} times and it still shows; "
                        f"its screen: {screen_tail(screen)}"
                    )
                answered[verdict.what] = count + 1
                session.press(*verdict.keys)
                pressed_on = (screen, now)
                last, poll = None, POLL_MIN
            elif now >= deadline:
                raise SessionError(
                    f"the agent did not become ready within {timing.ready_timeout:g} s "
                    f"({self.not_ready_hint(agent)}); its screen: {screen_tail(screen)}"
                )
            time.sleep(poll)

    def not_ready_hint(self, agent: AgentConfig) -> str:
        """What ready means for this driver, for a timeout's reason."""
        return f"no ready prompt {agent.ready_prompt!r} at a line start"

    # -- delivery ----------------------------------------------------------------
    def deliver(
        self, session: AgentSession, agent: AgentConfig, launch: Launch, timing: MonitorConfig
    ) -> None:
        """Paste the prompt and press Enter; try once more if the agent does not confirm it.

        Input the agent holds already is cleared first, where the CLI can
        clear it (text someone typed in an attached session must not become
        part of the prompt). The second time, the input may hold the whole
        paste (its Enter was lost: Enter alone submits it), a part of it
        (cleared and pasted again), or nothing (a dialog or an early start
        took the paste: pasted again).
        """
        for attempt in range(2):
            if attempt:
                self.wait_ready(session, agent, launch, timing)
            held = self.input_state(session.capture(), launch)
            enter_only = attempt > 0 and held == PROMPT_HELD
            if held != EMPTY and not enter_only:
                self.clear_input(session)
            before = session.capture()
            if not enter_only:
                session.paste_file(launch.prompt_file, f"formulabeat-{launch.run_id}")
                self._await_paste(session, launch)
            session.press("Enter")
            if self._await_confirmation(session, agent, launch, before, timing.confirm_timeout):
                return
        raise SessionError(
            "prompt not accepted: the agent did not confirm it within "
            f"{timing.confirm_timeout:g} s (tried twice); its screen: "
            f"{screen_tail(session.capture())}"
        )

    def input_state(self, screen: str, launch: Launch) -> str:
        """What the agent's input holds: nothing, this run's whole prompt, or other text."""
        return EMPTY

    def clear_input(self, session: AgentSession) -> None:
        """Empty the agent's input (a plain CLI offers no way: nothing to do)."""

    def confirmed(self, session: AgentSession, launch: Launch, before: str) -> bool:
        """Whether the agent took the prompt (here: its screen moved since ``before``)."""
        return session.capture() != before

    def _await_paste(self, session: AgentSession, launch: Launch) -> None:
        """Give the agent the time to take the paste in before Enter follows.

        A CLI whose input shows what it holds is watched until it shows the
        whole paste (a busy machine can take it in slowly, and an Enter that
        comes first is text, or nothing); any other gets PASTE_SETTLE.
        """
        time.sleep(PASTE_SETTLE)
        if not self.shows_input:
            return
        deadline = time.monotonic() + PASTE_WAIT
        while time.monotonic() < deadline:
            if self.input_state(session.capture(), launch) == PROMPT_HELD:
                return
            time.sleep(POLL_MIN)
        # Costs every start PASTE_WAIT: a screen this driver misreads.
        log.warning(
            "run %s: the agent's input did not show the whole paste within %g s; Enter anyway; "
            "its screen: %s",
            launch.run_id,
            PASTE_WAIT,
            screen_tail(session.capture()),
        )

    def _await_confirmation(
        self,
        session: AgentSession,
        agent: AgentConfig,
        launch: Launch,
        before: str,
        timeout: float,
    ) -> bool:
        started = time.monotonic()
        deadline = started + timeout
        nudged = not self.shows_input
        while True:
            # Alive first: an agent that confirmed and ended at once (a loaded
            # machine polls late) took its prompt, and its end is the monitor's
            # to judge (a crash is recovered), not a start that failed.
            alive, _ = session.status()
            if self.confirmed(session, launch, before):
                return True
            if not alive:
                self._alive_or_raise(session, agent, launch, "before it confirmed the prompt")
            now = time.monotonic()
            if now >= deadline:
                return False
            if not nudged and now - started >= ENTER_AGAIN_AFTER:
                # Still holding the whole paste: its Enter was not taken.
                nudged = True
                if self.input_state(session.capture(), launch) == PROMPT_HELD:
                    session.press("Enter")
            time.sleep(POLL_MIN)

    # -- endings -------------------------------------------------------------------
    def ended(self, how: str, screen: str, agent: AgentConfig, launch: Launch) -> str:
        """``how`` and the screen's last lines, with a known screen's fix."""
        text = f"{how}; its screen: {screen_tail(screen)}" if screen.strip() else how
        hint = self.explain(screen, agent, launch)
        return f"{text} ({hint})" if hint else text

    def explain(self, screen: str, agent: AgentConfig, launch: Launch) -> str | None:
        """The fix for a screen this driver knows (None: nothing to add)."""
        return None

    def _alive_or_raise(
        self, session: AgentSession, agent: AgentConfig, launch: Launch, when: str
    ) -> None:
        alive, how = session.status()
        if not alive:
            screen = session.capture() if how != "its tmux session is gone" else ""
            reason = self.ended(f"the agent ended ({how}) {when}", screen, agent, launch)
            raise SessionError(reason)

    # -- doctor ----------------------------------------------------------------------
    def checks(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[Check]:
        """Nothing to check beyond the command itself."""
        return []

    def fix(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[str]:
        """Nothing to fix."""
        return []

    def oneshot_report(self, output: str, launch: Launch) -> OneshotReport | None:
        """A plain CLI's output is text."""
        return None

    def api_failure(self, kind: str, message: str, now: float) -> ApiFailure:
        """The common judgement (workers.apierrors.classify)."""
        return classify(kind, message, now)

    def oneshot_api_error(self, output: str, launch: Launch) -> ApiErrorRecord | None:
        """None: a plain CLI says nothing formulabeat reads (Claude Code's hook does)."""
        return None

    def environment_defaults(self) -> Mapping[str, str]:
        """Nothing beyond what the agent's config says."""
        return {}


@dataclass(frozen=True)
class Hook:
    """One of formulabeat's hooks (workers.hooks) as a CLI's event calls it."""

    event: str
    # Which occurrences of the event (tools by name): "" for all of them.
    matcher: str
    name: str
    # The command line the CLI runs (a shell word list, joined).
    command: str
    timeout: int


class HookedDriver(PromptDriver):
    """A CLI with hooks shaped like Claude Code's: they confirm delivery and report phases.

    Every such CLI calls formulabeat's hooks (workers.hooks) on its events:
    the prompt taken (which confirms delivery and names the conversation and
    its transcript), the turn ended (the nudges), a shell command about to
    run (the guard) and run (the phase journal), the session over. A driver
    says which of its events each hook goes on (:attr:`events`) and how the
    CLI is given them (:meth:`command`, :meth:`install`), never in the
    worktree the agent commits from. Here: Claude Code's settings file,
    given with ``--settings``, beside which a repository's own
    ``.claude/settings.json`` keeps working.
    """

    hooks = True
    # formulabeat's hook name -> (the CLI's event, its matcher); a hook left
    # out is not installed (the CLI has no such event).
    events: ClassVar[dict[str, tuple[str, str]]] = {
        name: (event, matcher) for event, matcher, name, _ in HOOKS
    }

    def hooks_of(self, launch: Launch) -> list[Hook]:
        """formulabeat's hooks for this run, in this CLI's events."""
        found = []
        for _, _, name, timeout in HOOKS:
            if name in self.events:
                event, matcher = self.events[name]
                command = hook_line(
                    list(launch.hook_command), name, launch.run_dir, launch.primary_branch
                )
                found.append(Hook(event, matcher, name, command, timeout))
        return found

    def command(self, agent: AgentConfig, launch: Launch, oneshot: bool) -> list[str]:
        """The configured command, with the run's hook settings (and ``-p`` for one-shot)."""
        argv = [*agent.argv(), "--settings", str(launch.run_dir / AGENT_SETTINGS)]
        if oneshot and not {"-p", "--print"} & set(argv):
            argv.append("-p")
        return argv

    def install(self, agent: AgentConfig, launch: Launch) -> None:
        """Write the run's hook settings file."""
        text = settings(list(launch.hook_command), launch.run_dir, launch.primary_branch)
        write_private(launch.run_dir / AGENT_SETTINGS, json.dumps(text, indent=2) + "\n")

    def confirmed(self, session: AgentSession, launch: Launch, before: str) -> bool:
        """The prompt-submit hook saw this run's prompt."""
        return (launch.run_dir / PROMPT_SUBMITTED).exists()


def prompt_shown(screen: str, prompt: str, window: int = 12) -> bool:
    """Whether one of the last non-blank lines *starts* with the prompt character."""
    lines = [line for line in screen.splitlines() if line.strip()][-window:]
    return any(line.lstrip(_BOX_CHARS).startswith(prompt) for line in lines)
