"""Claude Code, the CLI every user runs: its command line, screens, config file and setup.

Measured on Claude Code 2.1.197 (see the README's "Claude Code" section):

- Before its input box it may show dialogs, each an option list whose
  selected entry is drawn ``❯`` after a space: workspace trust (for every
  directory not yet trusted; trust covers subdirectories), the API-key
  question (default No), the Bypass Permissions warning (default exit). A
  digit key chooses and confirms an option.
- Ready is the input box: a rule of ``─``, a line starting ``❯`` at column 0,
  another rule, then a status line (which says ``Not logged in`` when it is).
- Its config file is ``~/.claude.json`` (``$CLAUDE_CONFIG_DIR/.claude.json``);
  it changes it under a proper-lockfile lock (``mkdir <file>.lock``, stale
  after 10 s), re-reading it inside the lock and replacing it by rename, so
  an edit under the same lock loses none of its keys, nor it ours.
- Settings (``skipDangerousModePermissionPrompt``) are in
  ``~/.claude/settings.json`` (``$CLAUDE_CONFIG_DIR/settings.json``).
- As root it refuses ``--dangerously-skip-permissions`` unless ``IS_SANDBOX=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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
from workers.apierrors import ApiFailure, classify
from workers.checks import Check
from workers.config import AgentConfig, MonitorConfig
from workers.errors import SessionError
from workers.tmux import AgentSession, screen_tail
from workers.usage import from_result

BYPASS_FLAG = "--dangerously-skip-permissions"
# proper-lockfile's default: a lock directory older than this was abandoned.
LOCK_STALE_SECONDS = 10.0
LOCK_WAIT_SECONDS = 15.0
EDIT_ATTEMPTS = 20
# The CLI keeps this many trailing characters of an approved API key.
KEY_SUFFIX = 20
AUTH_ENV = (
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
    "CLAUDE_CODE_USE_FOUNDRY",
)

# Screens, by words they show (lowercased).
_TRUST = ("yes, i trust this folder", "do you trust the files in this folder")
_API_KEY = ("detected a custom api key",)
_BYPASS = ("bypass permissions mode",)
_ONBOARDING = ("choose the text style", "let's get started", "select login method")
_UNREACHABLE = ("unable to connect to anthropic services",)
_ROOT = ("cannot be used with root/sudo privileges",)
# What to do about the StopFailure kinds that waiting does not cure.
_FIXES = {
    "authentication_failed": (
        "the API refused the agent's credential: check the API key the agent is given "
        "(ANTHROPIC_API_KEY, env/pass_env), or log in again as the worker's user (`claude`, "
        "then /login)"
    ),
    "billing_error": (
        "the account's credit balance is exhausted: add credits (Claude Console, Plans & "
        "Billing) or give the agent another credential"
    ),
    "invalid_request": (
        "the API refused the request as invalid (a prompt too long, a model the account "
        "lacks): trying again will not change it"
    ),
    "max_output_tokens": (
        "the response hit the model's output limit: trying again will not change it"
    ),
}
# How the input box shows a multi-line paste.
_PASTED = re.compile(r"\[Pasted text #\d+ \+(\d+) lines\]")


class ClaudeCode(HookedDriver):
    """Claude Code's CLI (driver ``claude-code``, the default for a ``claude`` command)."""

    name = "claude-code"
    programs = ("claude",)
    resumes = True
    names_sessions = True
    transcripts = True
    shows_input = True

    # -- command line and files ---------------------------------------------
    def command(self, agent: AgentConfig, launch: Launch, oneshot: bool) -> list[str]:
        """Hooks, the conversation id (or the one to resume), JSON output for one-shot."""
        argv = super().command(agent, launch, oneshot)
        if launch.session_uuid:
            flag = "--resume" if launch.resume else "--session-id"
            argv += [flag, launch.session_uuid]
        if oneshot and "--output-format" not in argv:
            argv += ["--output-format", "json"]
        return argv

    def oneshot_report(self, output: str, launch: Launch) -> OneshotReport | None:
        """The ``result`` object ``--output-format json`` ends with: usage, cost, answer."""
        for line in reversed(output.strip().splitlines()):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            if isinstance(result, dict) and result.get("type") == "result":
                cost = result.get("total_cost_usd")
                return OneshotReport(
                    usage=from_result(result),
                    cost_usd=float(cost) if isinstance(cost, int | float) else None,
                    text=str(result.get("result") or ""),
                )
        return None

    def environment_defaults(self) -> Mapping[str, str]:
        """A short retry budget of the CLI's own: formulabeat waits out what lasts longer.

        Measured with 2.1.197: its default 10 retries take 186 s, for a refused
        key as for an overload, so a permanent error would take three minutes
        to fail; with 2 a turn gives up after about 2 s, and formulabeat waits
        minutes (``api_retry_delay``), keeping the conversation.
        """
        return {"CLAUDE_CODE_MAX_RETRIES": "2"}

    def api_failure(self, kind: str, message: str, now: float) -> ApiFailure:
        """StopFailure's kinds (measured with 2.1.197: an overload, a 500 and a refused
        connection are ``server_error``; a 429 and a subscription's usage limit
        ``rate_limit``, the latter with ``resets 4:58pm (UTC)`` in its text; a 401 or 403
        ``authentication_failed``; an exhausted balance ``billing_error``)."""
        return classify(kind, message, now, _FIXES)

    def install(self, agent: AgentConfig, launch: Launch) -> None:
        """The run's hook settings, and trust of the worktree root (before any dialog)."""
        super().install(agent, launch)
        config = config_file(launch.env)
        if not trusted(read_json(config), launch.worktree_root):
            try:
                edit_json(config, lambda data: trust(data, launch.worktree_root))
            except OSError as exc:
                raise SessionError(
                    f"cannot record trust of {launch.worktree_root} in {config}: {exc}"
                ) from None

    # -- screens -----------------------------------------------------------
    def judge(
        self, screen: str, quiet: float, agent: AgentConfig, launch: Launch, timing: MonitorConfig
    ) -> Verdict:
        """Ready at the input box; dialogs answered as configured, or refused with the fix."""
        lines = screen.splitlines()
        text = screen.lower()
        box = input_box(lines)
        if quiet < timing.ready_quiet:
            return Wait()
        if box is not None:
            status = "\n".join(lines[box + 1 :]).lower()
            if "not logged in" in status:
                return self._refuse(screen, self._login_fix(agent, launch))
            return Ready()
        if _shows(text, _TRUST):
            shown = workspace(lines)
            if shown is None or _within(Path(shown), launch.worktree_root):
                return Answer(("1",), "the workspace trust dialog")
            return self._refuse(
                screen, f"Claude Code asks to trust {shown}, which is not a formulabeat worktree"
            )
        if _shows(text, _API_KEY):
            if agent.approve_api_key:
                return Answer(("1",), "the API key question")
            return self._refuse(screen, self._api_key_fix(agent))
        if _shows(text, _BYPASS):
            if agent.accept_bypass_mode:
                return Answer(("2",), "the Bypass Permissions warning")
            return self._refuse(screen, self._bypass_fix(agent))
        hint = self.explain(screen, agent, launch)
        if hint:
            return self._refuse(screen, hint)
        if screen.strip() and quiet >= timing.settle_seconds:
            return self._refuse(
                screen,
                f"Claude Code shows a screen formulabeat does not know (unchanged for "
                f"{timing.settle_seconds:g} s, no input box); attach to its session to see it",
            )
        return Wait()

    def input_state(self, screen: str, launch: Launch) -> str:
        """Empty, this run's text (a multi-line paste shows as ``[Pasted text #N +M lines]``),
        or other text."""
        lines = screen.splitlines()
        box = input_box(lines)
        held = box_text(lines, box) if box is not None else ""
        if not held:
            return EMPTY
        text = launch.prompt_file.read_text(encoding="utf-8")
        shown = _PASTED.fullmatch(held)
        if shown:
            # Its count is of the newlines pasted, a final one included (2.1.197).
            same = int(shown.group(1)) in (text.count("\n"), text.strip().count("\n"))
        else:
            # A one-line text (the resume message) shows itself, wrapped.
            same = held.split() == text.split()
        return PROMPT_HELD if same else OTHER_HELD

    def clear_input(self, session: AgentSession) -> None:
        """Ctrl-U empties the input box (a paste or typed text)."""
        session.press("C-u")

    def not_ready_hint(self, agent: AgentConfig) -> str:
        """Ready is the input box."""
        return "no input box"

    def explain(self, screen: str, agent: AgentConfig, launch: Launch) -> str | None:
        """The fix for the screens the CLI shows when it cannot start."""
        text = screen.lower()
        if _shows(text, _ROOT):
            return (
                f"it runs as root: run the worker as an unprivileged user, or, inside a "
                f'container or VM sandbox, set env = {{ IS_SANDBOX = "1" }} for agent {agent.key}'
            )
        if _shows(text, _ONBOARDING) or _shows(text, _UNREACHABLE):
            return (
                f"Claude Code has not finished its first-run setup for HOME={_home(launch.env)}: "
                "run `claude` there once by hand (or, with an API key, `formulabeat doctor --fix`)"
                + ("; it checks api.anthropic.com until then" if _shows(text, _UNREACHABLE) else "")
            )
        return None

    @staticmethod
    def _refuse(screen: str, why: str) -> Refuse:
        return Refuse(f"{why}; its screen: {screen_tail(screen)}")

    @staticmethod
    def _api_key_fix(agent: AgentConfig) -> str:
        return (
            "Claude Code asks whether to use the API key in its environment (ANTHROPIC_API_KEY), "
            f"which formulabeat answers only when told: set approve_api_key = true for agent "
            f"{agent.key}, run `formulabeat doctor --fix`, or run `claude` once by hand and "
            "answer Yes"
        )

    @staticmethod
    def _bypass_fix(agent: AgentConfig) -> str:
        return (
            "Claude Code asks to accept Bypass Permissions mode (--dangerously-skip-permissions), "
            f"which formulabeat accepts only when told: set accept_bypass_mode = true for agent "
            f"{agent.key}, run `formulabeat doctor --fix`, or run `claude {BYPASS_FLAG}` once "
            "by hand and accept"
        )

    @staticmethod
    def _login_fix(agent: AgentConfig, launch: Launch) -> str:
        return (
            f"Claude Code is not logged in for HOME={_home(launch.env)}: run `claude` there and "
            f'/login, or give agent {agent.key} an API key (pass_env = ["ANTHROPIC_API_KEY"])'
        )

    # -- doctor ------------------------------------------------------------
    def checks(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[Check]:
        """Onboarding, login or key approval, bypass acceptance, root, trust: a line each."""
        worktree_root = where.worktree_root
        name = f"claude {agent.key}"
        config_path = config_file(env)
        config = read_json(config_path)
        bypass = BYPASS_FLAG in agent.argv()
        checks = [
            Check(
                f"{name} setup",
                config.get("hasCompletedOnboarding") is True,
                f"onboarding done ({config_path})"
                if config.get("hasCompletedOnboarding") is True
                else f"onboarding not done in {config_path}: run `claude` once by hand as this "
                "user, or (with an API key) `formulabeat doctor --fix`",
            ),
            self._login_check(name, agent, env, config),
        ]
        if bypass:
            accepted = read_json(settings_file(env)).get("skipDangerousModePermissionPrompt")
            checks.append(
                Check(
                    f"{name} bypass",
                    accepted is True or agent.accept_bypass_mode,
                    "Bypass Permissions mode accepted"
                    if accepted is True
                    else "answered at each start (accept_bypass_mode = true)"
                    if agent.accept_bypass_mode
                    else f"not accepted: {self._bypass_fix(agent)}",
                )
            )
            if os.geteuid() == 0:
                sandbox = env.get("IS_SANDBOX") == "1"
                checks.append(
                    Check(
                        f"{name} root",
                        sandbox,
                        "root, with IS_SANDBOX=1"
                        if sandbox
                        else "the CLI refuses bypass mode as root: run the worker as an "
                        'unprivileged user, or in a sandbox set env = { IS_SANDBOX = "1" }',
                    )
                )
        writable = os.access(config_path if config_path.exists() else config_path.parent, os.W_OK)
        checks.append(
            Check(
                f"{name} trust",
                trusted(config, worktree_root) or writable,
                f"{worktree_root} trusted"
                if trusted(config, worktree_root)
                else f"{worktree_root} is trusted before the first run"
                if writable
                else f"{config_path} is not writable, so formulabeat cannot trust "
                f"{worktree_root}: fix its ownership",
            )
        )
        return checks

    def _login_check(
        self, name: str, agent: AgentConfig, env: Mapping[str, str], config: dict[str, Any]
    ) -> Check:
        key = env.get("ANTHROPIC_API_KEY")
        if key:
            responses = config.get("customApiKeyResponses") or {}
            approved = key[-KEY_SUFFIX:] in (responses.get("approved") or [])
            ok = approved or agent.approve_api_key
            return Check(
                f"{name} login",
                ok,
                "ANTHROPIC_API_KEY approved"
                if approved
                else "ANTHROPIC_API_KEY answered at each start (approve_api_key = true)"
                if ok
                else f"ANTHROPIC_API_KEY not approved: {self._api_key_fix(agent)}",
            )
        for variable in AUTH_ENV:
            if env.get(variable):
                return Check(f"{name} login", True, f"authenticates with {variable}")
        credentials = config_dir(env) / ".credentials.json"
        if credentials.exists() or config.get("oauthAccount"):
            return Check(f"{name} login", True, "logged in")
        return Check(
            f"{name} login",
            False,
            f"not logged in for HOME={_home(env)}: run `claude` and /login as this user, or give "
            'the agent an API key (pass_env = ["ANTHROPIC_API_KEY"])',
        )

    def fix(self, agent: AgentConfig, env: Mapping[str, str], where: Setup) -> list[str]:
        """Trust, onboarding (with key or token auth), key approval, bypass acceptance."""
        worktree_root = where.worktree_root
        done = []
        config = config_file(env)
        key = env.get("ANTHROPIC_API_KEY")
        token_auth = key or any(env.get(v) for v in AUTH_ENV)

        def change(data: dict[str, Any]) -> bool:
            changed = trust(data, worktree_root)
            if changed:
                done.append(f"{config}: trusted {worktree_root}")
            if token_auth and data.get("hasCompletedOnboarding") is not True:
                data["hasCompletedOnboarding"] = True
                done.append(f"{config}: onboarding marked done")
                changed = True
            if key:
                responses = data.setdefault("customApiKeyResponses", {})
                approved = responses.setdefault("approved", [])
                if key[-KEY_SUFFIX:] not in approved:
                    approved.append(key[-KEY_SUFFIX:])
                    rejected = responses.get("rejected") or []
                    responses["rejected"] = [r for r in rejected if r != key[-KEY_SUFFIX:]]
                    done.append(f"{config}: ANTHROPIC_API_KEY approved")
                    changed = True
            return changed

        edit_json(config, change)
        if BYPASS_FLAG in agent.argv():
            path = settings_file(env)

            def accept(data: dict[str, Any]) -> bool:
                if data.get("skipDangerousModePermissionPrompt") is True:
                    return False
                data["skipDangerousModePermissionPrompt"] = True
                done.append(f"{path}: Bypass Permissions mode accepted")
                return True

            edit_json(path, accept)
        return done


# -- the screen ---------------------------------------------------------------


def _is_rule(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 10 and set(stripped) == {"─"}


# The input box grows with the text it holds (a long line wraps): its text
# lines after the ``❯`` one are indented; this many at most are looked at.
MAX_BOX_LINES = 40


def input_box(lines: list[str]) -> int | None:
    """The index of the input box's ``❯`` line: at column 0, under a rule, its text (its
    wrapped lines indented) above another rule."""
    for index in range(len(lines) - 1, 0, -1):
        if not lines[index].startswith("❯"):
            continue
        above = next((p for p in reversed(lines[:index]) if p.strip()), "")
        if _is_rule(above) and _box_end(lines, index) is not None:
            return index
    return None


def _box_end(lines: list[str], index: int) -> int | None:
    """The index of the rule that closes the box opened at ``index`` (None: no box)."""
    for end in range(index + 1, min(len(lines), index + 1 + MAX_BOX_LINES)):
        line = lines[end]
        if _is_rule(line):
            return end
        if line.strip() and not line.startswith(" "):
            return None
    return None


def box_text(lines: list[str], index: int) -> str:
    """What the input box at ``index`` holds, its wrapped lines joined."""
    end = _box_end(lines, index) or index + 1
    held = [lines[index].removeprefix("❯"), *lines[index + 1 : end]]
    return " ".join(" ".join(held).split())


def workspace(lines: list[str]) -> str | None:
    """The directory the trust dialog asks about (the line after "Accessing workspace:")."""
    for index, line in enumerate(lines[:-1]):
        if line.strip().lower() == "accessing workspace:":
            return lines[index + 1].strip() or None
    return None


def _shows(text: str, markers: tuple[str, ...]) -> bool:
    return any(marker in text for marker in markers)


def _within(path: Path, root: Path) -> bool:
    path, root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return path == root or root in path.parents


# -- the CLI's config files -------------------------------------------------------


def config_dir(env: Mapping[str, str]) -> Path:
    """Where the CLI keeps its state: $CLAUDE_CONFIG_DIR, else ~/.claude."""
    if env.get("CLAUDE_CONFIG_DIR"):
        return Path(env["CLAUDE_CONFIG_DIR"])
    return Path(_home(env)) / ".claude"


def config_file(env: Mapping[str, str]) -> Path:
    """The CLI's own config file: ``~/.claude.json`` (or in $CLAUDE_CONFIG_DIR)."""
    if env.get("CLAUDE_CONFIG_DIR"):
        return Path(env["CLAUDE_CONFIG_DIR"]) / ".claude.json"
    return Path(_home(env)) / ".claude.json"


def settings_file(env: Mapping[str, str]) -> Path:
    """The user's Claude Code settings."""
    return config_dir(env) / "settings.json"


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or str(Path.home())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict ({} when it is missing or not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def trusted(config: dict[str, Any], root: Path) -> bool:
    """Whether the config trusts ``root`` or a directory above it."""
    projects = config.get("projects")
    if not isinstance(projects, dict):
        return False
    real = Path(os.path.realpath(root))
    for candidate in (real, *real.parents):
        entry = projects.get(str(candidate))
        if isinstance(entry, dict) and entry.get("hasTrustDialogAccepted") is True:
            return True
    return False


def trust(config: dict[str, Any], root: Path) -> bool:
    """Mark ``root`` trusted in the config dict; False when it already was."""
    if trusted(config, root):
        return False
    projects = config.setdefault("projects", {})
    entry = projects.setdefault(os.path.realpath(root), {})
    entry["hasTrustDialogAccepted"] = True
    return True


def edit_json(path: Path, change: Callable[[dict[str, Any]], bool]) -> bool:
    """Change a JSON file the CLI also writes, under the CLI's own lock.

    ``change`` edits the dict in place and says whether it changed it. The
    file is replaced atomically, keeping its mode and every other key; one
    that is not a JSON object is left as it is (SessionError).

    The CLI does not wait for its lock: finding it held, it writes its
    cached copy without it. So the lock is held for as short as can be, and
    a file that changed between the read and the rename is read again
    rather than overwritten.
    """
    lock = path.with_name(path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(EDIT_ATTEMPTS):
        _take_lock(lock)
        try:
            seen = _identity(path)
            data = _read_object(path)
            if not change(data):
                return False
            mode = path.stat().st_mode & 0o777 if seen else 0o600
            tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{secrets.token_hex(6)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps(data, indent=2))
                if _identity(path) == seen:
                    os.replace(tmp, path)
                    return True
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(lock)
    raise SessionError(f"{path} kept changing while formulabeat edited it; try again")


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from the next: inode, mtime, size."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _read_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise SessionError(f"{path} is not valid JSON ({exc}); left as it is") from None
    if not isinstance(data, dict):
        raise SessionError(f"{path} is not a JSON object; left as it is")
    return data


def _take_lock(lock: Path) -> None:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            os.mkdir(lock, 0o700)
            return
        except FileExistsError:
            pass
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > LOCK_STALE_SECONDS:
            # Its holder died (proper-lockfile refreshes the mtime while held).
            with contextlib.suppress(OSError):
                os.rmdir(lock)
            continue
        if time.monotonic() >= deadline:
            raise SessionError(f"{lock} stayed locked for {LOCK_WAIT_SECONDS:g} s")
        time.sleep(0.02)


DRIVER = ClaudeCode()
