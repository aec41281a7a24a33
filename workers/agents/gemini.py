"""Google's Gemini CLI: its command line, screens, settings, hooks and chat files.

Measured on gemini-cli 0.61.0 (see the README's "Gemini CLI" section):

- Its user state is ``<home>/.gemini`` (home: ``$GEMINI_CLI_HOME``, else
  ``$HOME``): ``settings.json`` (auth type, hooks, …), ``trustedFolders.json``
  (trust of a folder covers its subfolders), the login's files, and the
  conversations, ``tmp/<project>/chats/session-<time>-<id8>.jsonl``.
- Hooks come from the settings layers, merged: a project's
  ``.gemini/settings.json``, the user's, the system's. The system file must
  be owned by root, in directories only root can write, or it is skipped; so
  each run gets a home of its own (``GEMINI_CLI_HOME`` in the run directory)
  whose settings are the user's plus formulabeat's hooks, its trust the
  user's plus formulabeat's worktrees, its login the user's (linked).
- Hook events: ``BeforeAgent`` (the prompt), ``AfterAgent`` (the turn's end;
  ``{"decision": "block", "reason": …}`` sends the reason as a new prompt),
  ``BeforeTool`` / ``AfterTool`` (its shell tool is ``run_shell_command``;
  exit status 2 blocks the call, stderr its reason), ``SessionStart``,
  ``SessionEnd``. Timeouts in milliseconds.
- ``--session-id <uuid>`` names a new conversation, ``--resume <uuid>`` goes
  on with one; with stdin not a terminal it runs headless (``-o json``).
- Before its input box it may ask to trust the folder (answered, for a
  formulabeat worktree) and how to authenticate (``security.auth.
  selectedType`` unset: the run fails, naming the fix).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from workers.agents.base import (
    EMPTY,
    OTHER_HELD,
    PROMPT_HELD,
    Answer,
    HookedDriver,
    Launch,
    OneshotReport,
    Ready,
    Refuse,
    Setup,
    Verdict,
    Wait,
)
from workers.apierrors import ApiErrorRecord, ApiFailure, classify
from workers.checks import Check
from workers.config import AgentConfig, MonitorConfig
from workers.errors import SessionError
from workers.rundir import SESSION_STARTED
from workers.statedir import private_dir, write_private
from workers.tmux import AgentSession, screen_tail
from workers.usage import Counted, Usage, add, tokens_of

# Measured with 0.61.0 (a 136-line paste, an Enter this long after the input
# showed it): 0 and 0.2 s lost the Enter, 0.5 and 1.0 s submitted it.
ENTER_AFTER_PASTE = 0.6
# The run's own Gemini home, in its run directory.
RUN_HOME = "gemini-home"
PLACEHOLDER = "Type your message or @path/to/file"
# The user's files a run's home links to: the login (and the account it names).
LOGIN_FILES = ("oauth_creds.json", "google_accounts.json", "installation_id", "user_id")
# What a run's settings add to the user's: no self-update or notice of one mid-run.
RUN_SETTINGS = {"general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False}}
# What they give unless the user's say otherwise: a short retry budget of the
# CLI's own in a one-shot run (its default is 10 attempts over minutes, for a
# refused key as for an overload); formulabeat waits out what lasts longer.
# (Measured with 0.61.0: its TUI retries an overload or a 429 regardless.)
RUN_DEFAULTS = {"general": {"maxAttempts": 3}}
# Its error statuses, as the common kinds (workers.apierrors) name them.
_KINDS = {
    "UNAVAILABLE": "overloaded",
    "RESOURCE_EXHAUSTED": "rate_limit",
    "INTERNAL": "server_error",
    "DEADLINE_EXCEEDED": "timeout",
    "UNAUTHENTICATED": "authentication_failed",
    "PERMISSION_DENIED": "authentication_failed",
    "INVALID_ARGUMENT": "invalid_request",
    "FAILED_PRECONDITION": "invalid_request",
    "NOT_FOUND": "invalid_request",
}
_CODES = {"503": "UNAVAILABLE", "429": "RESOURCE_EXHAUSTED", "500": "INTERNAL"}
_CODES |= {"401": "UNAUTHENTICATED", "403": "PERMISSION_DENIED", "400": "INVALID_ARGUMENT"}
_FIXES = {
    "authentication_failed": (
        "the API refused the agent's credential: check the key the agent is given "
        "(GEMINI_API_KEY through env/pass_env), or sign in again as the worker's user (`gemini`)"
    ),
    "invalid_request": (
        "the API refused the request (a model the key lacks, a prompt too long): trying "
        "again will not change it"
    ),
}
AUTH_TYPES = ("gemini-api-key", "oauth-personal", "vertex-ai", "compute-default-credentials")

_TRUST = ("do you trust the files in this folder?",)
_AUTH = ("how would you like to authenticate",)
_PASTED = re.compile(r"\[Pasted Text: (\d+) lines?\]")
_INPUT = re.compile(r"^ ?[*>] +(.*?)\s*$")


class GeminiTranscript:
    """Gemini CLI's chat file: ``gemini`` messages carry ``tokens`` and ``model``.

    A message is written twice with the same id (before and after its tool
    calls): counted once. ``input`` counts cached input too; thoughts are
    output, tool-use prompt tokens input.
    """

    def wanted(self, line: bytes) -> bool:
        """The model's messages with tokens."""
        return b'"gemini"' in line and b'"tokens"' in line

    def counted(self, entry: dict[str, Any], context: dict[str, str]) -> Counted | None:
        """A ``gemini`` message's id, model and tokens."""
        tokens = entry.get("tokens")
        message_id = entry.get("id")
        if entry.get("type") != "gemini" or not isinstance(tokens, dict):
            return None
        if not isinstance(message_id, str) or not message_id:
            return None
        cached = tokens_of(tokens.get("cached"))
        counts = {
            "input": max(0, tokens_of(tokens.get("input")) - cached)
            + tokens_of(tokens.get("tool")),
            "output": tokens_of(tokens.get("output")) + tokens_of(tokens.get("thoughts")),
            "cache_read": cached,
            "cache_creation": 0,
        }
        return message_id, str(entry.get("model") or "unknown"), counts

    def api_error(self, entry: dict[str, Any]) -> ApiErrorRecord | None:
        """None: its AfterAgent hook reads the error line (workers.hooks)."""
        return None


GEMINI_TRANSCRIPT = GeminiTranscript()


class Gemini(HookedDriver):
    """Google's Gemini CLI (driver ``gemini``, the default for a ``gemini`` command)."""

    name = "gemini"
    programs = ("gemini",)
    shows_input = True
    resumes = True
    names_sessions = True
    transcripts = True
    transcript_format = GEMINI_TRANSCRIPT
    credentials = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    # No StopFailure (an API error ends the turn), no SessionStart after a
    # compaction (PreCompress comes before it, and may print nothing).
    events: ClassVar[dict[str, tuple[str, str]]] = {
        "user-prompt-submit": ("BeforeAgent", ""),
        "stop": ("AfterAgent", ""),
        "post-tool-use": ("AfterTool", "run_shell_command|write_file"),
        "guard": ("BeforeTool", "run_shell_command"),
        "session-end": ("SessionEnd", ""),
        # Its input box is drawn before it takes input: ready once this ran.
        "session-start": ("SessionStart", ""),
    }

    # -- command line and files ---------------------------------------------
    def command(self, agent: AgentConfig, launch: Launch, oneshot: bool) -> list[str]:
        """The conversation to start or resume; JSON output for one-shot (prompt on stdin)."""
        argv = agent.argv()
        if launch.session_uuid:
            flag = "--resume" if launch.resume else "--session-id"
            argv += [flag, launch.session_uuid]
        if oneshot and not {"-o", "--output-format"} & set(argv):
            argv += ["-o", "json"]
        return argv

    def launch_env(self, agent: AgentConfig, launch: Launch) -> dict[str, str]:
        """The run's own Gemini home."""
        return {"GEMINI_CLI_HOME": str(launch.run_dir / RUN_HOME)}

    def install(self, agent: AgentConfig, launch: Launch) -> None:
        """The run's Gemini home: the user's settings and formulabeat's hooks, trust, login."""
        user = gemini_dir(launch.env)
        home = private_dir(private_dir(launch.run_dir / RUN_HOME) / ".gemini")
        settings = read_json(user / "settings.json")
        if (user / "settings.json").exists() and not settings:
            raise SessionError(f"{user / 'settings.json'} is not a JSON object; fix it")
        hooks = settings.setdefault("hooks", {})
        if not isinstance(hooks, dict):
            raise SessionError(f"{user / 'settings.json'}: hooks is not an object; fix it")
        for hook in self.hooks_of(launch):
            entry = {
                "name": f"formulabeat-{hook.name}",
                "type": "command",
                "command": hook.command,
                "timeout": hook.timeout * 1000,
            }
            hooks.setdefault(hook.event, []).append(
                {"matcher": hook.matcher or "*", "hooks": [entry]}
            )
        for group, values in RUN_SETTINGS.items():
            settings.setdefault(group, {}).update(values)
        for group, defaults in RUN_DEFAULTS.items():
            for key, default in defaults.items():
                settings.setdefault(group, {}).setdefault(key, default)
        write_private(home / "settings.json", json.dumps(settings, indent=2) + "\n")
        folders = read_json(user / "trustedFolders.json")
        folders[os.path.realpath(launch.worktree_root)] = "TRUST_FOLDER"
        write_private(home / "trustedFolders.json", json.dumps(folders, indent=2) + "\n")
        for name in LOGIN_FILES:
            if (user / name).exists() and not (home / name).exists():
                (home / name).symlink_to(user / name)

    # -- screens -----------------------------------------------------------
    def judge(
        self, screen: str, quiet: float, agent: AgentConfig, launch: Launch, timing: MonitorConfig
    ) -> Verdict:
        """Ready at the input box; the folder trust dialog answered, auth refused with the fix."""
        if quiet < timing.ready_quiet:
            return Wait()
        lines = screen.splitlines()
        text = screen.lower()
        if _shows(text, _TRUST):
            # "1. Trust folder" (the worktree, where it starts) is selected.
            return Answer(("Enter",), "the folder trust dialog")
        hint = self.explain(screen, agent, launch)
        if hint:
            return Refuse(f"{hint}; its screen: {screen_tail(screen)}")
        if input_box(lines) is not None:
            # Measured: a paste while the box is drawn and the session not yet
            # started (its banner comes next) is lost.
            if (launch.run_dir / SESSION_STARTED).exists():
                return Ready()
            return Wait()
        if screen.strip() and quiet >= timing.settle_seconds:
            return Refuse(
                f"Gemini CLI shows a screen formulabeat does not know (unchanged for "
                f"{timing.settle_seconds:g} s, no input box); attach to its session to see it; "
                f"its screen: {screen_tail(screen)}"
            )
        return Wait()

    def input_state(self, screen: str, launch: Launch) -> str:
        """Empty (its placeholder), this run's paste (``[Pasted Text: N lines]``), or other text."""
        lines = screen.splitlines()
        box = input_box(lines)
        found = _INPUT.match(lines[box]) if box is not None else None
        held = found.group(1) if found else ""
        if not held or held == PLACEHOLDER:
            return EMPTY
        text = launch.prompt_file.read_text(encoding="utf-8")
        prompt = text.strip()
        shown = _PASTED.search(held)
        if shown:
            # It counts the pieces between newlines: a prompt file's final
            # newline makes one more (0.61.0: 41 for 40 lines).
            counts = {prompt.count("\n"), prompt.count("\n") + 1, text.count("\n") + 1}
            return PROMPT_HELD if int(shown.group(1)) in counts else OTHER_HELD
        first = prompt.splitlines()[:1]
        return PROMPT_HELD if first and held == first[0].strip() else OTHER_HELD

    def _await_paste(self, session: AgentSession, launch: Launch) -> None:
        """Enter only a while after the input shows the paste (sooner, it is lost)."""
        super()._await_paste(session, launch)
        time.sleep(ENTER_AFTER_PASTE)

    def clear_input(self, session: AgentSession) -> None:
        """Ctrl-U empties the input (Ctrl-C would quit when it is empty)."""
        session.press("C-u")

    def not_ready_hint(self, agent: AgentConfig) -> str:
        """Ready is the input box."""
        return "no input box"

    def explain(self, screen: str, agent: AgentConfig, launch: Launch) -> str | None:
        """The fix for the auth dialog."""
        if _shows(screen.lower(), _AUTH):
            return (
                f"Gemini CLI asks how to authenticate: {gemini_dir(launch.env)}/settings.json "
                "sets no security.auth.selectedType; with an API key run `formulabeat doctor "
                f'--fix` (agent {agent.key} needs pass_env = ["GEMINI_API_KEY"]), else run '
                "`gemini` once as the worker's user and sign in"
            )
        return None

    # -- API errors ------------------------------------------------------------
    def api_failure(self, kind: str, message: str, now: float) -> ApiFailure:
        """Its statuses (``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``, ``UNAUTHENTICATED``, …,
        or the HTTP code), as the common kinds."""
        return classify(_KINDS.get(_CODES.get(kind, kind), "unknown"), message, now, _FIXES)

    def oneshot_api_error(self, output: str, launch: Launch) -> ApiErrorRecord | None:
        """The ``{"error": {"message", "code"}}`` it prints when a headless run fails."""
        result = _last_json(output)
        error = result.get("error") if result else None
        if not isinstance(error, dict):
            return None
        message = str(error.get("message") or "")
        found = re.search(r'"status"\s*:\s*"([A-Z_]+)"', message)
        kind = found.group(1) if found else str(error.get("code") or "unknown")
        return ApiErrorRecord(at=time.time(), kind=kind, message=message)

    # -- one-shot ------------------------------------------------------------
    def oneshot_report(self, output: str, launch: Launch) -> OneshotReport | None:
        """``-o json``: ``stats.models[m].tokens`` and the ``response``."""
        result = _last_json(output)
        stats = result.get("stats") if result else None
        if result is None or not isinstance(stats, dict):
            return None
        usage: Usage = {}
        models = stats.get("models")
        for model, figures in models.items() if isinstance(models, dict) else ():
            tokens = figures.get("tokens") if isinstance(figures, dict) else None
            if not isinstance(tokens, dict) or not any(tokens_of(v) for v in tokens.values()):
                continue
            # Here "input" is the prompt less its cached part (the chat file's counts it).
            counts = {
                "input": tokens_of(tokens.get("input")) + tokens_of(tokens.get("tool")),
                "output": tokens_of(tokens.get("candidates")) + tokens_of(tokens.get("thoughts")),
                "cache_read": tokens_of(tokens.get("cached")),
            }
            add(usage, str(model), counts)
        return OneshotReport(usage=usage, cost_usd=None, text=str(result.get("response") or ""))

    # -- doctor ------------------------------------------------------------
    def checks(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[Check]:
        """The auth type and its credential, and hooks enabled: a line each."""
        name = f"gemini {agent.key}"
        user = gemini_dir(env)
        settings = read_json(user / "settings.json")
        security = settings.get("security")
        auth = security.get("auth") if isinstance(security, dict) else None
        kind = auth.get("selectedType") if isinstance(auth, dict) else None
        checks = [Check(f"{name} login", *self._login(kind, env, user))]
        hooks_config = settings.get("hooksConfig")
        off = isinstance(hooks_config, dict) and hooks_config.get("enabled") is False
        checks.append(
            Check(
                f"{name} hooks",
                not off,
                "hooks enabled"
                if not off
                else f"{user / 'settings.json'} sets hooksConfig.enabled = false: formulabeat "
                "needs Gemini CLI's hooks",
            )
        )
        checks.append(
            Check(f"{name} trust", True, f"{where.worktree_root} trusted in each run's own home")
        )
        return checks

    @staticmethod
    def _login(kind: object, env: Mapping[str, str], user: Path) -> tuple[bool, str]:
        settings = user / "settings.json"
        if kind is None:
            fix = (
                "`formulabeat doctor --fix` sets gemini-api-key"
                if env.get("GEMINI_API_KEY")
                else "run `gemini` once as this user and sign in, or give the agent a key "
                '(pass_env = ["GEMINI_API_KEY"]) and run `formulabeat doctor --fix`'
            )
            return False, f"{settings} sets no security.auth.selectedType: {fix}"
        if kind == "gemini-api-key":
            given = bool(env.get("GEMINI_API_KEY"))
            return given, (
                "gemini-api-key with GEMINI_API_KEY"
                if given
                else "gemini-api-key, but the agent has no GEMINI_API_KEY: pass_env = "
                '["GEMINI_API_KEY"]'
            )
        if kind == "oauth-personal":
            ok = (user / "oauth_creds.json").exists()
            return ok, (
                f"signed in ({user / 'oauth_creds.json'})"
                if ok
                else "oauth-personal, but not signed in: run `gemini` as this user and sign in"
            )
        return True, f"authenticates with {kind}"

    def fix(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[str]:
        """With GEMINI_API_KEY given and no auth type chosen: choose gemini-api-key."""
        path = gemini_dir(env) / "settings.json"
        settings = read_json(path)
        if path.exists() and not settings:
            return []
        security = settings.setdefault("security", {})
        auth = security.setdefault("auth", {})
        if auth.get("selectedType") or not env.get("GEMINI_API_KEY"):
            return []
        auth["selectedType"] = "gemini-api-key"
        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.formulabeat")
        write_private(tmp, json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, path)
        return [f"{path}: security.auth.selectedType = gemini-api-key"]


# -- the screen ---------------------------------------------------------------


def input_box(lines: list[str]) -> int | None:
    """The index of the input line: `` *`` (or `` >``) below the last rule of ``─``."""
    rules = [i for i, line in enumerate(lines) if _is_rule(line)]
    if not rules:
        return None
    for index in range(rules[-1] + 1, min(len(lines), rules[-1] + 4)):
        if _INPUT.match(lines[index]):
            return index
    return None


def _is_rule(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 10 and set(stripped) == {"─"}


def _shows(text: str, markers: tuple[str, ...]) -> bool:
    return any(marker in text for marker in markers)


# -- its files ---------------------------------------------------------------------


def gemini_dir(env: Mapping[str, str]) -> Path:
    """The user's ``.gemini`` directory (under $GEMINI_CLI_HOME, else $HOME)."""
    home = env.get("GEMINI_CLI_HOME") or env.get("HOME") or str(Path.home())
    return Path(home) / ".gemini"


def _last_json(output: str) -> dict[str, Any] | None:
    """The last JSON object in a headless run's output (its result, or its error)."""
    decoder = json.JSONDecoder()
    found = None
    for start in (
        i for i, c in enumerate(output) if c == "{" and (i == 0 or output[i - 1] == "\n")
    ):
        try:
            value, _ = decoder.raw_decode(output[start:])
        except ValueError:
            continue
        if isinstance(value, dict):
            found = value
    return found


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict ({} when it is missing or not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


DRIVER = Gemini()
