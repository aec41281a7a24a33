"""OpenAI's Codex CLI: its command line, screens, config file, hooks and rollout files.

Measured on codex-cli 0.171.0 (see the README's "Codex CLI" section):

- Its state is ``$CODEX_HOME`` (``~/.codex``): ``config.toml`` (providers,
  trust of projects, hook trust), ``auth.json`` (``codex login``) and the
  conversations, ``sessions/YYYY/MM/DD/rollout-<time>-<id>.jsonl``.
- Trust is per repository: in a git worktree it asks to trust the main
  repository's root, and only ``[projects."<root>"] trust_level =
  "trusted"`` in ``config.toml`` counts (a ``-c`` override of it does not).
- Hooks shaped like Claude Code's (``UserPromptSubmit``, ``Stop`` with
  ``{"decision": "block"}``, ``PreToolUse`` whose exit status 2 blocks the
  command, its shell tool called ``Bash``) can be given inline with ``-c
  hooks.<Event>=[...]``; hooks not reviewed in its TUI are skipped, unless
  ``--dangerously-bypass-hook-trust`` runs them (all of them: a repository's
  own ``.codex`` hooks too, as Claude Code runs a repository's hooks).
- It names each conversation itself (the hooks' ``session_id``) and resumes
  one with ``codex resume <id>``; ``--no-daemon`` keeps its TUI from leaving a
  shared background server behind.
- Ready is its input box: ``› <placeholder>`` above a footer ending ``?
  for shortcuts``; a long paste shows as ``[Pasted Content N chars]``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from workers.agents.base import (
    EMPTY,
    OTHER_HELD,
    PROMPT_HELD,
    Answer,
    Hook,
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
from workers.rundir import USAGE
from workers.tmux import AgentSession, screen_tail
from workers.usage import Counted, TranscriptReader, Usage, add, tokens_of

HOOK_TRUST_FLAG = "--dangerously-bypass-hook-trust"
NO_DAEMON_FLAG = "--no-daemon"
# What the empty input box shows.
PLACEHOLDER = "Ask Codex to do anything"

# Codex's error kinds, as the common ones (workers.apierrors) name them.
_KINDS = {
    "server_overloaded": "overloaded",
    "internal_server_error": "server_error",
    "usage_limit_exceeded": "rate_limit",
    "response_stream_disconnected": "connection_error",
    "response_stream_connection_failed": "connection_error",
    "connection_failed": "connection_error",
    "unauthorized": "authentication_failed",
    "quota_exceeded": "billing_error",
    "context_window_exceeded": "invalid_request",
    "other": "invalid_request",
}
_FIXES = {
    "authentication_failed": (
        "the API refused the agent's credential: check the key the agent is given "
        "(OPENAI_API_KEY or its provider's env_key, through env/pass_env), or log in again "
        "as the worker's user (`codex login`)"
    ),
    "billing_error": (
        "the account's quota or credit is spent: add credit, or give the agent another key"
    ),
    "invalid_request": (
        "the API refused the request (a model the account lacks, a context too long): "
        "trying again will not change it"
    ),
}

# Screens, by words they show (lowercased).
_TRUST = ("trust this folder?",)
_HOOK_REVIEW = ("hooks need review",)
_LOGIN = ("sign in with chatgpt", "welcome to codex")
_PASTED = re.compile(r"\[Pasted Content (\d+) chars\]")


class CodexTranscript:
    """Codex's rollout file: ``token_usage_record`` lines, each one response's usage.

    The model comes from the turn's ``turn_context`` line before them. Its
    ``input_tokens`` count the cached and cache-written ones too.
    """

    def wanted(self, line: bytes) -> bool:
        """Usage records, turn contexts, and turns that ended on an error."""
        return (
            b'"token_usage_record"' in line
            or b'"turn_context"' in line
            or (b'"task_complete"' in line and b'"error"' in line)
        )

    def api_error(self, entry: dict[str, Any]) -> ApiErrorRecord | None:
        """A turn's ``task_complete`` event with an ``error``: its ``codex_error_info`` as
        the kind (``server_overloaded``, ``http_connection_failed:401``, …), its text."""
        payload = entry.get("payload")
        if entry.get("type") != "event_msg" or not isinstance(payload, dict):
            return None
        error = payload.get("error")
        if payload.get("type") != "task_complete" or not isinstance(error, dict):
            return None
        return ApiErrorRecord(
            at=_epoch(entry.get("timestamp")),
            kind=_error_kind(error.get("codex_error_info")),
            message=str(error.get("message") or ""),
        )

    def counted(self, entry: dict[str, Any], context: dict[str, str]) -> Counted | None:
        """A usage record's response, or None (a turn context sets the model)."""
        payload = entry.get("payload")
        if not isinstance(payload, dict):
            return None
        if entry.get("type") == "turn_context":
            if isinstance(payload.get("model"), str):
                context["model"] = payload["model"]
            return None
        usage = payload.get("usage")
        response = payload.get("response_id")
        if entry.get("type") != "token_usage_record" or not isinstance(usage, dict):
            return None
        if not isinstance(response, str) or not response:
            return None
        return response, context.get("model", "unknown"), openai_counts(usage)


def common_kind(kind: str) -> str:
    """A Codex error kind as the common kinds name it (an HTTP status decides for
    ``name:status``)."""
    if kind in _KINDS:
        return _KINDS[kind]
    _, _, status = kind.rpartition(":")
    if status.isdigit():
        code = int(status)
        if code == 429:
            return "rate_limit"
        if code >= 500:
            return "server_error"
        if code in (401, 403):
            return "authentication_failed"
        if code == 402:
            return "billing_error"
        return "invalid_request"
    return "unknown"


def _epoch(stamp: object) -> float:
    """A rollout line's ISO timestamp as a Unix time (now, when it has none)."""
    try:
        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def _error_kind(info: object) -> str:
    """``codex_error_info`` as one word: a name, or ``name:status`` for one with a status."""
    if isinstance(info, str) and info:
        return info
    if isinstance(info, dict) and info:
        name, detail = next(iter(info.items()))
        status = detail.get("http_status_code") if isinstance(detail, dict) else None
        return f"{name}:{status}" if status else str(name)
    return "unknown"


def openai_counts(usage: Mapping[str, Any]) -> dict[str, int]:
    """formulabeat's kinds from Codex's usage fields (input counts cached input too)."""
    cached = tokens_of(usage.get("cached_input_tokens"))
    written = tokens_of(usage.get("cache_write_input_tokens"))
    return {
        "input": max(0, tokens_of(usage.get("input_tokens")) - cached - written),
        "output": tokens_of(usage.get("output_tokens")),
        "cache_read": cached,
        "cache_creation": written,
    }


CODEX_TRANSCRIPT = CodexTranscript()


class Codex(HookedDriver):
    """OpenAI's Codex CLI (driver ``codex``, the default for a ``codex`` command)."""

    name = "codex"
    programs = ("codex",)
    shows_input = True
    resumes = True
    # It names its conversations; the hooks tell formulabeat the id.
    names_sessions = False
    transcripts = True
    transcript_format = CODEX_TRANSCRIPT
    credentials = ("OPENAI_API_KEY", "CODEX_API_KEY")
    # Codex's events are Claude Code's, less StopFailure (an API error ends
    # the turn: its Stop hook sees it). SessionStart has no compaction source.
    events: ClassVar[dict[str, tuple[str, str]]] = {
        "user-prompt-submit": ("UserPromptSubmit", ""),
        "stop": ("Stop", ""),
        "post-tool-use": ("PostToolUse", "Bash"),
        "guard": ("PreToolUse", "Bash"),
        "session-end": ("SessionEnd", ""),
    }

    # -- command line and files ---------------------------------------------
    def command(self, agent: AgentConfig, launch: Launch, oneshot: bool) -> list[str]:
        """``codex [resume <id>] …`` or ``codex exec --json …``, with the run's hooks inline."""
        program, *flags = agent.argv()
        hooks = [HOOK_TRUST_FLAG]
        for hook in self.hooks_of(launch):
            hooks += ["-c", f"hooks.{hook.event}=[{_toml_entry(hook)}]"]
        if oneshot and launch.resume and launch.session_uuid:
            # After an API error's wait: the same thread, the go-on message on stdin.
            return [program, "exec", "resume", "--json", *flags, *hooks, launch.session_uuid, "-"]
        if oneshot:
            # The prompt comes on stdin (no prompt argument: it reads all of it).
            return [program, "exec", "--json", *flags, *hooks]
        if launch.resume and launch.session_uuid:
            return [program, "resume", *flags, NO_DAEMON_FLAG, *hooks, launch.session_uuid]
        return [program, *flags, NO_DAEMON_FLAG, *hooks]

    def install(self, agent: AgentConfig, launch: Launch) -> None:
        """Trust of the project's repository in Codex's config (before any dialog)."""
        root = launch.repo_root or launch.worktree
        config = config_file(launch.env)
        try:
            trust(config, root)
        except OSError as exc:
            raise SessionError(f"cannot record trust of {root} in {config}: {exc}") from None

    # -- screens -----------------------------------------------------------
    def judge(
        self, screen: str, quiet: float, agent: AgentConfig, launch: Launch, timing: MonitorConfig
    ) -> Verdict:
        """Ready at the input box; the trust dialog for its own repository answered."""
        if quiet < timing.ready_quiet:
            return Wait()
        lines = screen.splitlines()
        text = screen.lower()
        if _shows(text, _TRUST):
            shown = trust_target(lines)
            known = [p for p in (launch.repo_root, launch.worktree) if p is not None]
            if shown is not None and any(_same(Path(shown), p) for p in known):
                # "1. Trust and continue" is selected; Enter saves the trust.
                return Answer(("Enter",), "the folder trust dialog")
            return self._refuse(
                screen, f"Codex asks to trust {shown}, which is not this run's repository"
            )
        hint = self.explain(screen, agent, launch)
        if hint:
            return self._refuse(screen, hint)
        if input_box(lines) is not None:
            return Ready()
        if screen.strip() and quiet >= timing.settle_seconds:
            return self._refuse(
                screen,
                f"Codex shows a screen formulabeat does not know (unchanged for "
                f"{timing.settle_seconds:g} s, no input box); attach to its session to see it",
            )
        return Wait()

    def input_state(self, screen: str, launch: Launch) -> str:
        """Empty (its placeholder), this run's paste, or other text."""
        lines = screen.splitlines()
        box = input_box(lines)
        held = lines[box].removeprefix("›").strip() if box is not None else ""
        if not held or held == PLACEHOLDER:
            return EMPTY
        prompt = launch.prompt_file.read_text(encoding="utf-8")
        shown = _PASTED.fullmatch(held)
        if shown:
            whole = int(shown.group(1)) in (len(prompt), len(prompt.strip()))
            return PROMPT_HELD if whole else OTHER_HELD
        first = prompt.strip().splitlines()[:1]
        return PROMPT_HELD if first and held == first[0].strip() else OTHER_HELD

    def clear_input(self, session: AgentSession) -> None:
        """Ctrl-U empties the input line."""
        session.press("C-u")

    def not_ready_hint(self, agent: AgentConfig) -> str:
        """Ready is the input box."""
        return "no input box"

    def explain(self, screen: str, agent: AgentConfig, launch: Launch) -> str | None:
        """The fix for the screens Codex shows when it cannot start."""
        text = screen.lower()
        if _shows(text, _LOGIN):
            return (
                f"Codex is not logged in for CODEX_HOME={codex_home(launch.env)}: run `codex "
                "login` there as the worker's user (or `codex login --with-api-key`), or give "
                f'agent {agent.key} a key: pass_env = ["OPENAI_API_KEY"]'
            )
        if _shows(text, _HOOK_REVIEW):
            return (
                "Codex asks to review hooks, which formulabeat does not answer: keep "
                f"{HOOK_TRUST_FLAG} (formulabeat adds it), or review them once with `codex` "
                "in the repository"
            )
        return None

    @staticmethod
    def _refuse(screen: str, why: str) -> Refuse:
        return Refuse(f"{why}; its screen: {screen_tail(screen)}")

    # -- API errors ------------------------------------------------------------
    def api_failure(self, kind: str, message: str, now: float) -> ApiFailure:
        """Codex's kinds (measured with 0.171.0, after its own retries): a 503 is
        ``server_overloaded``, a 500 ``internal_server_error``, a 429
        ``response_too_many_failed_attempts:429``, a 401
        ``http_connection_failed:401``, a 400 ``other``; a refused connection it
        retries for minutes on end."""
        return classify(common_kind(kind), message, now, _FIXES)

    # -- one-shot ------------------------------------------------------------
    def oneshot_api_error(self, output: str, launch: Launch) -> ApiErrorRecord | None:
        """The rollout's last turn, when it ended on an error (``exec`` runs no hook then)."""
        thread = _thread_of(output)
        if thread is None:
            return None
        reader = rollout_reader(codex_home(launch.env), thread)
        return reader.api_errors[-1] if reader is not None and reader.api_errors else None

    def oneshot_report(self, output: str, launch: Launch) -> OneshotReport | None:
        """``exec --json``: the thread's rollout for tokens by model, the last message's text."""
        thread, text, last_usage = _thread_of(output), "", None
        for line in output.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "agent_message":
                text = str(item.get("text") or "")
            if event.get("type") == "turn.completed" and isinstance(event.get("usage"), dict):
                last_usage = event["usage"]
        if thread is None and last_usage is None:
            return None
        usage = _new_usage(launch, thread) if thread else None
        if usage is None:
            # No rollout to read: the thread's total, by no model.
            usage = {"unknown": openai_counts(last_usage)} if last_usage is not None else {}
        return OneshotReport(usage=usage, cost_usd=None, text=text)

    # -- doctor ------------------------------------------------------------
    def checks(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[Check]:
        """Login or key, trust of the repository, hooks enabled: a line each."""
        name = f"codex {agent.key}"
        home = codex_home(env)
        config = read_config(config_file(env))
        checks = [self._login_check(name, agent, env, home, config)]
        trusted_now = trusted(config, where.repo_root)
        path = config_file(env)
        writable = os.access(path if path.exists() else home, os.W_OK) or not home.exists()
        checks.append(
            Check(
                f"{name} trust",
                trusted_now or writable,
                f"{where.repo_root} trusted"
                if trusted_now
                else f"{where.repo_root} is trusted before the first run"
                if writable
                else f"{path} is not writable, so formulabeat cannot trust {where.repo_root}: "
                "fix its ownership",
            )
        )
        features = config.get("features")
        off = isinstance(features, dict) and features.get("hooks") is False
        checks.append(
            Check(
                f"{name} hooks",
                not off,
                "hooks enabled"
                if not off
                else f"{path} sets [features] hooks = false: formulabeat needs Codex's hooks "
                "(remove the line)",
            )
        )
        return checks

    def _login_check(
        self,
        name: str,
        agent: AgentConfig,
        env: Mapping[str, str],
        home: Path,
        config: dict[str, Any],
    ) -> Check:
        provider = config.get("model_provider")
        providers = config.get("model_providers")
        entry = providers.get(provider) if isinstance(providers, dict) and provider else None
        if isinstance(entry, dict) and entry.get("env_key"):
            key = str(entry["env_key"])
            given = bool(env.get(key))
            return Check(
                f"{name} login",
                given,
                f"provider {provider!r} authenticates with {key}"
                if given
                else f"provider {provider!r} needs {key}, which the agent is not given: "
                f'pass_env = ["{key}"]',
            )
        for variable in self.credentials:
            if env.get(variable):
                return Check(f"{name} login", True, f"authenticates with {variable}")
        if (home / "auth.json").exists():
            return Check(f"{name} login", True, f"logged in ({home / 'auth.json'})")
        return Check(
            f"{name} login",
            False,
            f"not logged in for CODEX_HOME={home}: run `codex login` as this user, or give "
            'the agent a key (pass_env = ["OPENAI_API_KEY"])',
        )

    def fix(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[str]:
        """Trust of the repository (the one setup step formulabeat may take for the user)."""
        path = config_file(env)
        if trusted(read_config(path), where.repo_root):
            return []
        trust(path, where.repo_root)
        return [f"{path}: trusted {where.repo_root}"]


# -- the screen ---------------------------------------------------------------


def input_box(lines: list[str]) -> int | None:
    """The index of the input line: ``›`` at column 0, its footer below.

    The footer is ``? for shortcuts`` (``esc to interrupt`` while it works)
    under the status line ``<model> <effort> · <cwd>``; the first goes while
    the input holds text (0.171.0), the status line stays.
    """
    for index in range(len(lines) - 1, -1, -1):
        if not lines[index].startswith("›"):
            continue
        below = [line for line in lines[index + 1 : index + 5] if line.strip()]
        if any(_is_footer(line) for line in below):
            return index
    return None


def _is_footer(line: str) -> bool:
    if "for shortcuts" in line or "esc to interrupt" in line:
        return True
    return line.startswith("  ") and not line.startswith("   ") and " · " in line


def trust_target(lines: list[str]) -> str | None:
    """The directory the trust dialog would trust: the repository root it names, else the cwd."""
    for index, line in enumerate(lines[:-1]):
        if "trusting will apply to the repository root" in line.lower():
            return lines[index + 1].strip() or None
    for index, line in enumerate(lines[:-1]):
        if line.strip().lower() == "folder access":
            return lines[index + 1].strip() or None
    return None


def _shows(text: str, markers: tuple[str, ...]) -> bool:
    return any(marker in text for marker in markers)


def _same(path: Path, other: Path) -> bool:
    return os.path.realpath(path) == os.path.realpath(other)


def _toml_entry(hook: Hook) -> str:
    """A hook as Codex's config entry, a TOML inline table (strings as JSON strings,
    which TOML reads the same)."""
    inner = f'{{type = "command", command = {json.dumps(hook.command)}, timeout = {hook.timeout}}}'
    matcher = f"matcher = {json.dumps(hook.matcher)}, " if hook.matcher else ""
    return f"{{{matcher}hooks = [{inner}]}}"


# -- its config and rollouts ---------------------------------------------------------


def codex_home(env: Mapping[str, str]) -> Path:
    """Where Codex keeps its state: $CODEX_HOME, else ~/.codex."""
    if env.get("CODEX_HOME"):
        return Path(env["CODEX_HOME"])
    return Path(env.get("HOME") or str(Path.home())) / ".codex"


def config_file(env: Mapping[str, str]) -> Path:
    """Codex's ``config.toml``."""
    return codex_home(env) / "config.toml"


def read_config(path: Path) -> dict[str, Any]:
    """Codex's config as a dict ({} when it is missing or not TOML)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def trusted(config: dict[str, Any], root: Path) -> bool:
    """Whether the config trusts the repository at ``root``."""
    projects = config.get("projects")
    if not isinstance(projects, dict):
        return False
    for key in {str(root), os.path.realpath(root)}:
        entry = projects.get(key)
        if isinstance(entry, dict) and entry.get("trust_level") == "trusted":
            return True
    return False


def trust(path: Path, root: Path) -> None:
    """Record ``root`` as trusted in Codex's config file, keeping everything in it.

    The table is appended as text: Python reads TOML but writes none, and an
    appended table leaves every byte Codex (or a person) wrote as it was. A
    table for ``root`` that says something else is not overwritten.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        config = tomllib.loads(text)
    except ValueError as exc:
        raise SessionError(f"{path} is not valid TOML ({exc}); left as it is") from None
    if trusted(config, root):
        return
    real = os.path.realpath(root)
    projects = config.get("projects")
    if isinstance(projects, dict) and real in projects:
        raise SessionError(
            f'{path} has [projects.{json.dumps(real)}] without trust_level = "trusted": '
            "trust the repository there (or remove the table)"
        )
    separator = "\n" if text and not text.endswith("\n") else ""
    table = f'{separator}\n[projects.{json.dumps(real)}]\ntrust_level = "trusted"\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(table)


def rollout_reader(
    home: Path, thread: str, reader: TranscriptReader | None = None
) -> TranscriptReader | None:
    """A thread's rollout file read to its end (its tokens, its errors), if it is found."""
    found = sorted((home / "sessions").glob(f"*/*/*/rollout-*-{thread}.jsonl"))
    if not found:
        return None
    reader = reader or TranscriptReader(CODEX_TRANSCRIPT)
    reader.follow(str(found[-1]))
    reader.read_all()
    return reader


def _new_usage(launch: Launch, thread: str) -> Usage | None:
    """The tokens of the responses a one-shot run's earlier ``exec`` runs did not report:
    ``exec resume`` goes on in the same rollout (and says the thread's total). None:
    the rollout is not there."""
    state = launch.run_dir / USAGE
    reader = TranscriptReader.load(state, CODEX_TRANSCRIPT)
    before = {model: dict(kinds) for model, kinds in reader.usage.items()}
    if rollout_reader(codex_home(launch.env), thread, reader) is None:
        return None
    reader.save(state)
    fresh: Usage = {}
    for model, kinds in reader.usage.items():
        earlier = before.get(model, {})
        add(fresh, model, {kind: count - earlier.get(kind, 0) for kind, count in kinds.items()})
    return fresh


def _thread_of(output: str) -> str | None:
    """The thread ``exec --json`` names in its first event."""
    for line in output.splitlines():
        if '"thread.started"' in line:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("thread_id"), str):
                return str(event["thread_id"])
    return None


DRIVER = Codex()
