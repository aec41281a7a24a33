"""Claude Code hooks: run by the agent CLI on its events, as plain scripts.

Each hook reads Claude Code's JSON payload on stdin and talks to the monitor
through files in the run's private directory (names in workers.rundir):

- ``user-prompt-submit``: the prompt the CLI took is this run's: it writes
  ``prompt-submitted``, which is how the worker knows the prompt arrived;
- ``stop``: writes the ``idle`` marker, or (phase file still empty, fewer
  than two nudges so far) answers ``{"decision": "block"}`` with a nudge,
  which the CLI hands to the model as it would a user's reply;
- ``post-tool-use``: when the tool wrote the phase file, appends each phase it
  wrote to ``phase-journal`` (so two writes in one millisecond are both seen,
  in order) and touches ``phase-changed``;
- ``stop-failure``: writes the ``api-error`` record (the error's kind and the
  CLI's text), unless a terminal phase is there already: the watcher decides
  whether the run waits and goes on, or fails;
- ``guard`` (PreToolUse, Bash): denies dangerous commands with exit status 2
  and the reason on stderr, which is what Claude Code shows the model;
- ``session-end``: writes the ``exited`` marker (fast: its timeout is short);
- ``session-start``: writes ``session-started``; after a compaction, prints
  the run's compact context.

The CLI calls two hooks per tool use, so a hook must start fast: it runs as
``python -I -S hooks.py NAME …`` (no site packages), imports only the
standard library and workers.rundir, leaves out the modules that cost most
to import (pathlib, contextlib, typing, argparse, subprocess), and parses
its own few arguments.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time

if not __package__:
    # Run as a script by path: make the package importable without site.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from workers.rundir import (
    API_ERROR,
    CONTEXT,
    EXITED,
    HOOKS_LIVE,
    IDLE,
    JOURNAL,
    NUDGES,
    PHASE,
    PHASE_CHANGED,
    PROMPT,
    PROMPT_SUBMITTED,
    RESUME,
    SESSION_STARTED,
)

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_NUDGES = 2
TERMINAL = ("PHASE:done", "PHASE:merged", "PHASE:failed", "PHASE:escalate")
NUDGE = (
    "You returned to the prompt without writing the phase file. Finish the formula's "
    "steps, then write the phase: echo 'PHASE:done' > '{phase}' "
    "(or PHASE:failed with a Reason: line)."
)

# (event, matcher, hook name, timeout seconds)
HOOKS = (
    ("UserPromptSubmit", "", "user-prompt-submit", 30),
    ("Stop", "", "stop", 30),
    ("PostToolUse", "Bash|Write", "post-tool-use", 30),
    ("StopFailure", "", "stop-failure", 30),
    ("PreToolUse", "Bash", "guard", 30),
    ("SessionEnd", "", "session-end", 1),
    ("SessionStart", "compact", "session-start", 30),
)
NAMES = tuple(name for _, _, name, _ in HOOKS)


def hook_command() -> list[str]:
    """How an agent CLI calls these hooks: this interpreter on this file, without site."""
    return [sys.executable, "-I", "-S", os.path.realpath(__file__)]


def hook_line(
    hook_command: list[str], name: str, run_dir: str | os.PathLike[str], primary_branch: str
) -> str:
    """The command line an agent CLI runs for hook ``name`` of one run."""
    words = [*hook_command, name, "--run-dir", os.fspath(run_dir)]
    return shlex.join([*words, "--primary-branch", primary_branch])


def settings(
    hook_command: list[str], run_dir: str | os.PathLike[str], primary_branch: str
) -> dict[str, object]:
    """Claude Code settings holding formulabeat's hooks for one run (``--settings`` file)."""
    hooks: dict[str, list[dict[str, object]]] = {}
    for event, matcher, name, timeout in HOOKS:
        command = hook_line(hook_command, name, run_dir, primary_branch)
        hooks.setdefault(event, []).append(
            {
                "matcher": matcher,
                "hooks": [{"type": "command", "command": command, "timeout": timeout}],
            }
        )
    return {"hooks": hooks}


# -- the guard ------------------------------------------------------------

_SEPARATORS = {"&&", "||", ";", "|", "&", "\n", "(", ")", "|&", ";;"}
_PREFIXES = {"sudo", "command", "exec", "nohup", "time", "nice", "builtin"}
_TEMP_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")


def _commands(command: str) -> list[list[str]]:
    """Split a shell command line into simple commands (words of each)."""
    lexer = shlex.shlex(command.replace("\n", " ; "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    result: list[list[str]] = [[]]
    for token in lexer:
        if token in _SEPARATORS or (token and set(token) <= set("&|;()")):
            result.append([])
        else:
            result[-1].append(token)
    stripped = (_strip_prefixes(words) for words in result)
    return [words for words in stripped if words]


def _strip_prefixes(words: list[str]) -> list[str]:
    while words:
        head = words[0]
        if head in _PREFIXES:
            words = words[1:]
        elif head == "env":
            words = words[1:]
            while words and (words[0].startswith("-") or "=" in words[0]):
                words = words[1:]
        elif re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", head):
            words = words[1:]
        else:
            break
    return words


def _short_flags(word: str) -> set[str]:
    return set(word[1:]) if word.startswith("-") and not word.startswith("--") else set()


def _git_args(words: list[str]) -> list[str]:
    """The words after ``git`` and its global options (-C dir, -c k=v, --git-dir=…)."""
    args = words[1:]
    while args and args[0].startswith("-"):
        takes_value = args[0] in ("-C", "-c", "--git-dir", "--work-tree", "--namespace")
        args = args[2:] if takes_value else args[1:]
    return args


def _refspec_target(refspec: str) -> str:
    dest = refspec.lstrip("+").split(":")[-1]
    return dest.removeprefix("refs/heads/")


def _git_reason(args: list[str], primary: str) -> str | None:
    if not args:
        return None
    sub, rest = args[0], args[1:]
    if sub == "push":
        force = any(
            w in ("--force", "--force-if-includes", "--mirror")
            or w.startswith("--force-with-lease")
            or "f" in _short_flags(w)
            for w in rest
        )
        positional = [w for w in rest if not w.startswith("-")]
        refspecs = positional[1:]
        for refspec in refspecs:
            if _refspec_target(refspec) == primary and (force or refspec.startswith("+")):
                return f"force-pushing to the primary branch {primary!r} is not allowed"
        if force and not refspecs:
            return "a force push without an explicit branch is not allowed: name the branch"
        return None
    if sub in ("checkout", "switch"):
        if any(w in ("-b", "-B", "-c", "-C", "--orphan", "--") for w in rest):
            return None
        positional = [w for w in rest if not w.startswith("-")]
        if positional and positional[0] == primary:
            return (
                f"switching the worktree to the primary branch {primary!r} is not allowed: "
                "work on a branch (git checkout -b NAME)"
            )
    return None


def _rm_reason(words: list[str], worktree: str) -> str | None:
    flags: set[str] = set()
    paths: list[str] = []
    for word in words[1:]:
        if word == "--recursive":
            flags.add("r")
        elif word == "--force":
            flags.add("f")
        elif word.startswith("-") and not word.startswith("--"):
            flags |= {c.lower() for c in word[1:]}
        elif not word.startswith("--"):
            paths.append(word)
    if not {"r", "f"} <= flags:
        return None
    root = os.path.realpath(worktree)
    for path in paths:
        if path.startswith(("~", "$HOME", "${HOME}")):
            return f"rm -rf of {path} (outside the worktree) is not allowed"
        if path.startswith("$"):
            return f"rm -rf of {path}: cannot tell where the variable points; use a literal path"
        full = os.path.normpath(path if path.startswith("/") else os.path.join(root, path))
        if full == root or full.startswith(root + os.sep):
            continue
        temp_roots = {*_TEMP_ROOTS, os.environ.get("TMPDIR") or "/tmp"}
        if any(full.startswith(t.rstrip("/") + "/") for t in temp_roots) or full.startswith(
            "/dev/"
        ):
            continue
        return f"rm -rf of {full} (outside the worktree {root}) is not allowed"
    return None


_MERGE_RE = re.compile(r"/pulls/\d+/merge\b")
_ISSUE_RE = re.compile(r"/issues/\d+\b")
_CLOSE_RE = re.compile(r"""["']?state["']?\s*[:=]\s*\\?["']?closed""")


def guard_reason(command: str, worktree: str, primary_branch: str) -> str | None:
    """Why the guard denies ``command`` run in ``worktree``, or None to allow it."""
    if _MERGE_RE.search(command):
        return "merging through the forge API is not allowed: the merge is not the agent's call"
    if _ISSUE_RE.search(command) and _CLOSE_RE.search(command):
        return "closing issues through the forge API is not allowed"
    try:
        commands = _commands(command)
    except ValueError:
        # Unbalanced quotes: judge the raw text conservatively.
        if re.search(r"\bgit\b.*\bpush\b.*(\s-\w*f|--force)", command):
            return "a force push (in a command that could not be parsed) is not allowed"
        if re.search(r"\brm\s+-\w*[rR]\w*", command):
            return "rm -r in a command that could not be parsed is not allowed"
        return None
    for words in commands:
        program = os.path.basename(words[0])
        if program == "git":
            reason = _git_reason(_git_args(words), primary_branch)
        elif program == "rm":
            reason = _rm_reason(words, worktree)
        else:
            reason = None
        if reason:
            return reason
    return None


# -- phase writes ---------------------------------------------------------

_PHASE_RE = re.compile(r"PHASE:[A-Za-z0-9_-]+")


def _write_patterns(phase_file: str) -> list[str]:
    names = [re.escape(phase_file), r"\$\{?PHASE_FILE\}?"]
    return [rf"""(?:>>?|\btee(?:\s+-a)?)\s*['"]?(?:{name})['"]?""" for name in names]


def writes_phase_file(tool_name: str, tool_input: object, cwd: str, phase_file: str) -> bool:
    """Whether this tool call wrote the phase file (a read does not count)."""
    if not isinstance(tool_input, dict):
        return False
    if tool_name == "Write":
        target = str(tool_input.get("file_path", ""))
        return bool(target) and os.path.abspath(os.path.join(cwd, target)) == os.path.abspath(
            phase_file
        )
    if tool_name == "Bash":
        command = str(tool_input.get("command", ""))
        return any(re.search(pattern, command) for pattern in _write_patterns(phase_file))
    return False


def phases_written(tool_name: str, tool_input: dict[str, object]) -> list[str]:
    """The phases a phase-file write put there, in order."""
    if tool_name == "Write":
        first = str(tool_input.get("content", "")).strip().splitlines()[:1]
        return [first[0].strip()] if first else []
    return _PHASE_RE.findall(str(tool_input.get("command", "")))


# -- handlers -------------------------------------------------------------


def _phase_text(phase_file: str) -> str | None:
    try:
        fd = os.open(phase_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _write_marker(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def on_user_prompt_submit(run_dir: str, payload: dict[str, object]) -> int:
    """Record that the CLI took this run's prompt (a nudge or a typed line does not count).

    The record also says where the CLI keeps this conversation's transcript,
    which is where the run's tokens are counted.
    """
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        return 0
    for name in (PROMPT, RESUME):
        try:
            expected = _read(os.path.join(run_dir, name))
        except OSError:
            continue
        # Compared word by word: a terminal turns the paste's newlines into CRs,
        # and a CLI may trim or re-wrap white space; the words are the prompt.
        if prompt.split() == expected.split():
            record = {
                "at": time.time(),
                "bytes": len(prompt.encode("utf-8")),
                "prompt": name,
                "session_id": payload.get("session_id"),
                "transcript_path": payload.get("transcript_path"),
            }
            _write_marker(os.path.join(run_dir, PROMPT_SUBMITTED), json.dumps(record))
            break
    return 0


def on_stop(run_dir: str, payload: dict[str, object]) -> int:
    """Idle marker; or a nudge when the phase file is still empty (twice at most).

    The nudge is Claude Code's own answer to a Stop hook, ``{"decision":
    "block", "reason": …}``: the CLI gives the reason to the model and goes
    on, with nothing typed into its pane.
    """
    failed = _turn_failed(payload)
    if failed is not None:
        # An API error ended the turn: no nudge (it would fail the same way);
        # the watcher waits, or fails the run, and says how it goes on.
        _record_api_error(run_dir, *failed)
        return 0
    phase_file = os.path.join(run_dir, PHASE)
    text = _phase_text(phase_file)
    nudges_file = os.path.join(run_dir, NUDGES)
    try:
        nudges = int(_read(nudges_file).strip() or 0)
    except (OSError, ValueError):
        nudges = 0
    empty = text is not None and not text.strip()
    if empty and nudges < MAX_NUDGES:
        _write_marker(nudges_file, str(nudges + 1))
        idle = os.path.join(run_dir, IDLE)
        if os.path.lexists(idle):
            os.unlink(idle)
        print(json.dumps({"decision": "block", "reason": NUDGE.format(phase=phase_file)}))
        return 0
    _write_marker(os.path.join(run_dir, IDLE), str(time.time()))
    return 0


# Other CLIs' names of the tools the hooks judge, as Claude Code's (the names
# this module speaks): Gemini CLI's shell and file writer (Codex calls its
# shell tool Bash, as Claude Code does).
_TOOL_NAMES = {"run_shell_command": "Bash", "write_file": "Write"}


def _tool(payload: dict[str, object]) -> tuple[str, object]:
    """The tool a payload is about, by Claude Code's name, and its input."""
    name = str(payload.get("tool_name", ""))
    return _TOOL_NAMES.get(name, name), payload.get("tool_input")


def on_post_tool_use(run_dir: str, payload: dict[str, object]) -> int:
    """Journal each phase a tool call wrote, and wake the monitor."""
    tool, tool_input = _tool(payload)
    cwd = str(payload.get("cwd") or os.getcwd())
    phase_file = os.path.join(run_dir, PHASE)
    if not isinstance(tool_input, dict) or not writes_phase_file(tool, tool_input, cwd, phase_file):
        return 0
    now = time.time()
    lines = "".join(
        json.dumps({"phase": p, "at": now}) + "\n" for p in phases_written(tool, tool_input)
    )
    journal = os.path.join(run_dir, JOURNAL)
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(lines)
    _write_marker(os.path.join(run_dir, PHASE_CHANGED), str(now))
    return 0


def on_stop_failure(run_dir: str, payload: dict[str, object]) -> int:
    """Record the API error that ended the turn, for the watcher to judge.

    Not a phase: an overload or a rate limit is waited out and the agent told
    to go on (workers.apierrors); only a permanent error fails the run. A turn
    that failed after the agent wrote a terminal phase changes nothing.
    """
    phase_file = os.path.join(run_dir, PHASE)
    current = (_phase_text(phase_file) or "").strip().splitlines()[:1]
    if current and current[0].strip() in TERMINAL:
        return 0
    # The kind is in "error"; the CLI's own text (a reset time, the status) in
    # its last message, or in "error_details" where a version sends that.
    message = payload.get("last_assistant_message") or payload.get("error_details") or ""
    _record_api_error(run_dir, time.time(), str(payload.get("error") or "unknown"), str(message))
    return 0


def _record_api_error(run_dir: str, at: float, kind: str, message: str) -> None:
    """Leave the ``api-error`` record (workers.apierrors reads it)."""
    record = {"at": at, "kind": kind, "message": message[:4000]}
    path = os.path.join(run_dir, API_ERROR)
    tmp = f"{path}.{os.getpid()}.tmp"
    _write_marker(tmp, json.dumps(record))
    # Replaced whole: the watcher never reads half a record.
    os.replace(tmp, path)


# How far back in a transcript the line that ended a turn is looked for.
_TAIL_BYTES = 65536
_GEMINI_STATUS = re.compile(r'"status"\s*:\s*"([A-Z_]+)"|"code"\s*:\s*(\d{3})')


def _turn_failed(payload: dict[str, object]) -> tuple[float, str, str] | None:
    """(when, kind, text) of an API error that ended this turn, where only the
    transcript says so: Gemini CLI's AfterAgent carries "[no response text]"
    and its chat file ends with ``{"type": "error", "content": "[API Error:
    …]"}`` (measured with 0.61.0: a 401 ends the turn so; an overload or a
    429 it retries for minutes)."""
    path = payload.get("transcript_path")
    if payload.get("hook_event_name") != "AfterAgent" or not isinstance(path, str):
        return None
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - _TAIL_BYTES))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        # Bookkeeping, and the notice it shows under an error ("This request failed…").
        if not isinstance(entry, dict) or "$set" in entry or entry.get("type") == "info":
            continue
        content = str(entry.get("content") or "")
        if entry.get("type") != "error" or not content.startswith("[API Error"):
            return None
        found = _GEMINI_STATUS.search(content)
        kind = (found.group(1) or found.group(2)) if found else "unknown"
        return _stamp(entry.get("timestamp")), kind, content
    return None


def _stamp(text: object) -> float:
    """An ISO time of a transcript line as a Unix time (now when it has none): the
    record's time is the CLI's, so a line read twice is not a second error."""
    import datetime  # only on a failed turn: the hooks start without it

    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def on_guard(run_dir: str, payload: dict[str, object], primary_branch: str) -> int:
    """Deny a dangerous Bash command: exit 2, reason on stderr."""
    live = os.path.join(run_dir, HOOKS_LIVE)
    if not os.path.exists(live):
        # Tells the monitor that PostToolUse journal entries will follow tool calls.
        _write_marker(live, str(time.time()))
    tool, tool_input = _tool(payload)
    if tool != "Bash" or not isinstance(tool_input, dict):
        return 0
    cwd = str(payload.get("cwd") or os.getcwd())
    reason = guard_reason(str(tool_input.get("command", "")), cwd, primary_branch)
    if reason is None:
        return 0
    print(f"formulabeat guard: {reason}", file=sys.stderr)
    return 2


def on_session_end(run_dir: str, payload: dict[str, object]) -> int:
    """Tell the monitor the session is over."""
    record = json.dumps({"at": time.time(), "reason": payload.get("reason")})
    _write_marker(os.path.join(run_dir, EXITED), record)
    return 0


def on_session_start(run_dir: str, payload: dict[str, object]) -> int:
    """Mark the session started; after a compaction, put the run's compact context back."""
    _write_marker(os.path.join(run_dir, SESSION_STARTED), str(time.time()))
    if payload.get("source", "compact") != "compact":
        return 0
    try:
        context = _read(os.path.join(run_dir, CONTEXT))
    except OSError:
        return 0
    sys.stdout.write(context)
    return 0


HANDLERS = {
    "user-prompt-submit": on_user_prompt_submit,
    "stop": on_stop,
    "post-tool-use": on_post_tool_use,
    "stop-failure": on_stop_failure,
    "session-end": on_session_end,
    "session-start": on_session_start,
}


def _parse(argv: list[str]) -> tuple[str, str | None, str] | str:
    """(name, run dir, primary branch), or the usage error to print."""
    usage = f"usage: formulabeat hook {{{','.join(NAMES)}}} [--run-dir DIR] [--primary-branch B]"
    if not argv or argv[0] not in NAMES:
        return usage
    options = {"--run-dir": os.environ.get("FORMULABEAT_RUN_DIR"), "--primary-branch": "main"}
    rest = argv[1:]
    while rest:
        key, _, value = rest[0].partition("=")
        if key not in options:
            return usage
        if not value:
            if len(rest) < 2:
                return usage
            value, rest = rest[1], rest[1:]
        options[key] = value
        rest = rest[1:]
    return argv[0], options["--run-dir"], options["--primary-branch"] or "main"


def main(argv: list[str]) -> int:
    """``formulabeat hook NAME [--run-dir DIR] [--primary-branch B]``, payload on stdin."""
    parsed = _parse(argv)
    if isinstance(parsed, str):
        print(parsed, file=sys.stderr)
        return 1
    name, run_dir_arg, primary_branch = parsed
    if not run_dir_arg:
        print("formulabeat hook: no --run-dir and no $FORMULABEAT_RUN_DIR", file=sys.stderr)
        return 1
    raw = sys.stdin.buffer.read(MAX_PAYLOAD_BYTES)
    try:
        payload = json.loads(raw) if raw.strip() else {}
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        print(f"formulabeat hook {name}: payload is not a JSON object; ignored", file=sys.stderr)
        return 0
    try:
        if name == "guard":
            return on_guard(run_dir_arg, payload, primary_branch)
        return HANDLERS[name](run_dir_arg, payload)
    except OSError as exc:
        print(f"formulabeat hook {name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
