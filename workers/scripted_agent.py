"""A scripted stand-in for the Claude Code CLI, speaking the same protocol.

It shows its ready prompt ``❯``, reads the pasted prompt in raw mode (with
bracketed paste on, as Claude Code does), takes a scenario from a line
``SCENARIO: <tokens>`` in the prompt, writes the phase file the prompt names,
and runs the hooks of ``.claude/settings.json`` in its working directory and
of the ``--settings`` file with Claude Code's JSON payloads. A Stop hook that
answers ``{"decision": "block", "reason": …}`` gets a new turn with the
reason, as Claude Code gives it to the model. Nothing in formulabeat depends
on its internals.

Scenario tokens, run in order (underscores in arguments become spaces):

- ``phase=NAME`` writes ``PHASE:NAME`` (``phase=failed:REASON`` adds a
  ``Reason:`` line), as a Bash tool call with PreToolUse/PostToolUse hooks;
- ``phases=A,B,…`` writes several phases in one Bash tool call, back to back
  (within the same millisecond, as ``echo A > f; echo B > f`` would);
- ``ls`` prints the working directory's entries (a Bash tool call);
- ``deaf``: later prompts (a nudge) are taken but do nothing;
- ``crash_once``: crash the first session of a run only (a flag beside the
  phase file remembers it), so a recovered session goes on;
- ``sleep=SECONDS``; ``crash`` (exit 1 at once, no hooks); ``exit`` (SessionEnd
  hook, exit 0); ``idle`` (end the turn here); ``apifail=KIND[:MESSAGE]``
  (the turn ends on an API error of that kind, as Claude Code's does: the
  StopFailure hook with the message as the CLI's text; the next prompt without
  a scenario, such as formulabeat's "go on", takes up the tokens after it);
  ``apifail_once=KIND[:MESSAGE]`` (the same, the first time in a run only);
  ``bash=COMMAND`` (a Bash tool call that runs nothing);
- ``wait=PATH`` waits until PATH exists (a benchmark's starting signal);
- ``chatter=SECONDS`` writes an assistant line with usage to its transcript
  (``transcripts/<session>.jsonl`` beside the phase file, named in its hook
  payloads) every second;
- ``log=PATH`` also appends every event, the earlier ones of this process
  included, to PATH (which outlives the run directory), each with the run id.

No scenario line means ``phase=done``. Every event is appended as a JSON line
to ``<phase file>.agent.jsonl`` with its time, for tests and benchmarks.

Standard library only: it starts in every test pane and must start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import tty
import uuid
from pathlib import Path
from typing import Any

PASTE_START = b"\x1b[200~"
PASTE_END = b"\x1b[201~"
_PHASE_PATH_RE = re.compile(r"echo 'PHASE:done' > '([^']+)'")
_TOOL_EVENTS = ("PreToolUse", "PostToolUse")


class Agent:
    """One scripted agent process: its hooks, its log, its scenario runner."""

    def __init__(self, prompt_char: str, interactive: bool, settings: str | None = None) -> None:
        self.prompt_char = prompt_char
        self.settings = settings
        self.interactive = interactive
        self.session_id = str(uuid.uuid4())
        self.cwd = os.getcwd()
        # A prompt names the phase file; a one-shot prompt does not, so the
        # environment's PHASE_FILE is the fallback.
        self.phase_file: str | None = os.environ.get("PHASE_FILE") or None
        self.api_failed = False
        # The scenario's tokens left when an API error ended a turn: a later
        # prompt without a scenario (formulabeat's "go on") takes them up.
        self.pending: list[str] | None = None
        self.deaf = False
        self.run_id = os.environ.get("FORMULABEAT_RUN_ID")
        self.events: list[dict[str, Any]] = []
        self.extra_log: str | None = None
        self.ignore_input = False
        self.enters_to_lose = 0

    # -- output and log ---------------------------------------------------
    def say(self, text: str) -> None:
        """Print a line (CR LF: the tty may be in raw mode)."""
        end = "\r\n" if self.interactive else "\n"
        sys.stdout.write(text.replace("\n", end) + end)
        sys.stdout.flush()

    def show_prompt(self) -> None:
        """Show the ready prompt and wait for input."""
        sys.stdout.write(f"{self.prompt_char} ")
        sys.stdout.flush()

    def log(self, event: str, **fields: Any) -> None:
        """Append one event to the agent log (next to the phase file)."""
        record = {"event": event, "at": time.time(), "pid": os.getpid(), **fields}
        record["run"] = self.run_id
        self.events.append(record)
        if self.extra_log is not None:
            self._append(self.extra_log, [record])
        if self.phase_file is not None:
            self._append(f"{self.phase_file}.agent.jsonl", [record])

    def also_log_to(self, path: str) -> None:
        """The ``log=PATH`` token: this process's events so far, and from now on."""
        if self.extra_log != path:
            self.extra_log = path
            self._append(path, self.events)

    @staticmethod
    def _append(path: str, records: list[dict[str, Any]]) -> None:
        # One write per call, in append mode: lines of agents logging to one
        # file at once do not interleave.
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in records))

    @property
    def transcript_path(self) -> str:
        # In a directory of its own, as Claude Code keeps its transcripts apart.
        if not self.phase_file:
            return os.devnull
        folder = os.path.join(os.path.dirname(self.phase_file), "transcripts")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        return os.path.join(folder, f"{self.session_id}.jsonl")

    # -- hooks ------------------------------------------------------------
    def _settings_hooks(self) -> dict[str, list[Any]]:
        """The hooks of the project's settings and of ``--settings``, merged as Claude Code does."""
        merged: dict[str, list[Any]] = {}
        paths = [Path(self.cwd) / ".claude" / "settings.json"]
        if self.settings:
            paths.append(Path(self.settings))
        for path in paths:
            try:
                data = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                self.say(f"[warning: cannot read {path}: {exc}]")
                continue
            hooks = data.get("hooks", {}) if isinstance(data, dict) else {}
            for event, groups in (hooks if isinstance(hooks, dict) else {}).items():
                if isinstance(groups, list):
                    merged.setdefault(event, []).extend(groups)
        return merged

    def run_hooks(
        self, event: str, match: str | None = None, **fields: Any
    ) -> list[tuple[int, str, str]]:
        """Run every hook of ``event`` whose matcher fits; (exit code, stderr, stdout) of each."""
        commands: list[tuple[str, float]] = []
        for group in self._settings_hooks().get(event, []) or []:
            if not isinstance(group, dict):
                continue
            matcher = str(group.get("matcher") or "")
            if matcher not in ("", "*") and match is not None:
                try:
                    if not re.fullmatch(matcher, match):
                        continue
                except re.error:
                    continue
            for hook in group.get("hooks", []) or []:
                if isinstance(hook, dict) and hook.get("type") == "command" and hook.get("command"):
                    default = 1.5 if event == "SessionEnd" else 600.0
                    commands.append((str(hook["command"]), float(hook.get("timeout", default))))
        if not commands:
            return []
        payload = json.dumps(
            {
                "session_id": self.session_id,
                "transcript_path": self.transcript_path,
                "cwd": self.cwd,
                "hook_event_name": event,
                **fields,
            }
        ).encode()
        results: list[tuple[int, str, str]] = [(0, "", "")] * len(commands)

        def run_one(index: int, command: str, timeout: float) -> None:
            env = {**os.environ, "CLAUDE_PROJECT_DIR": self.cwd}
            try:
                proc = subprocess.run(
                    ["/bin/sh", "-c", command],
                    input=payload,
                    capture_output=True,
                    cwd=self.cwd,
                    env=env,
                    timeout=timeout,
                    check=False,
                )
                results[index] = (
                    proc.returncode,
                    proc.stderr.decode(errors="replace").strip(),
                    proc.stdout.decode(errors="replace").strip(),
                )
            except subprocess.TimeoutExpired:
                results[index] = (-1, f"hook timed out after {timeout:g} s", "")
            except OSError as exc:
                results[index] = (-1, str(exc), "")

        threads = [
            threading.Thread(target=run_one, args=(i, cmd, limit), daemon=True)
            for i, (cmd, limit) in enumerate(commands)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for code, _, _ in results:
            self.log("hook", hook=event, code=code)
        return results

    # -- tools ------------------------------------------------------------
    def bash_tool(self, command: str, effect: Any = None) -> bool:
        """A Bash tool call: PreToolUse may deny it; else run ``effect`` and PostToolUse."""
        tool_input = {"command": command}
        denied = [
            err
            for code, err, _ in self.run_hooks(
                "PreToolUse", "Bash", tool_name="Bash", tool_input=tool_input
            )
            if code == 2
        ]
        if denied:
            self.say(f"[tool denied: {'; '.join(denied)}]")
            self.log("denied", command=command)
            return False
        if effect is not None:
            effect()
        response = {"stdout": "", "stderr": "", "interrupted": False}
        self.run_hooks(
            "PostToolUse", "Bash", tool_name="Bash", tool_input=tool_input, tool_response=response
        )
        return True

    def write_phases(self, names: list[str]) -> None:
        """Several phase writes in one tool call, with no pause between them."""
        if self.phase_file is None:
            self.say("[warning: the prompt names no phase file]")
            return
        path = self.phase_file
        command = "; ".join(f"echo 'PHASE:{name}' > '{path}'" for name in names)

        def write() -> None:
            for name in names:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(f"PHASE:{name}\n")
            for name in names:
                self.log("phase", phase=f"PHASE:{name}")

        self.bash_tool(command, write)

    def write_phase(self, argument: str) -> None:
        """The phase token: write the phase file through a Bash tool call."""
        if self.phase_file is None:
            self.say("[warning: the prompt names no phase file]")
            return
        path = self.phase_file
        name, _, reason = argument.partition(":")
        if reason:
            text = f"PHASE:{name}\nReason: {reason.replace('_', ' ')}\n"
            command = (
                f"printf 'PHASE:{name}\\nReason: %s\\n' '{reason.replace('_', ' ')}' > '{path}'"
            )
        else:
            text = f"PHASE:{name}\n"
            command = f"echo 'PHASE:{name}' > '{path}'"

        def write() -> None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            self.log("phase", phase=f"PHASE:{name}")
            self.say(f"wrote PHASE:{name}")

        self.bash_tool(command, write)

    # -- turns ------------------------------------------------------------
    def turn(self, text: str) -> None:
        """One submitted prompt: its scenario, then Stop hooks, which may ask for more."""
        self.log("prompt", bytes=len(text.encode()))
        self.run_hooks("UserPromptSubmit", prompt=text)
        stop_hook_active = False
        while self.scenario(text):
            reasons = [
                decision["reason"]
                for _, _, out in self.run_hooks("Stop", stop_hook_active=stop_hook_active)
                for decision in [_decision(out)]
                if decision.get("decision") == "block" and decision.get("reason")
            ]
            if not reasons:
                return
            # Claude Code hands a blocking Stop hook's reason to the model.
            text, stop_hook_active = "\n".join(str(r) for r in reasons), True
            self.log("nudged")

    def scenario(self, text: str) -> bool:
        """Run the scenario ``text`` asks for; False when the turn ends without a Stop."""
        found = _PHASE_PATH_RE.search(text)
        if found:
            self.phase_file = found.group(1)
        tokens = ["idle"] if self.deaf else ["phase=done"]
        for line in text.splitlines():
            if line.strip().startswith("SCENARIO:"):
                tokens = line.split("SCENARIO:", 1)[1].split()
                break
        else:
            if self.pending is not None:
                tokens, self.pending = self.pending, None
        for index, token in enumerate(tokens):
            key, _, value = token.partition("=")
            if key == "phase":
                self.write_phase(value)
            elif key == "phases":
                self.write_phases([name for name in value.split(",") if name])
            elif key == "sleep":
                time.sleep(float(value or 0))
            elif key == "chatter":
                self.chatter(float(value or 0))
            elif key == "crash" or (key == "crash_once" and self._first("crashed")):
                self.log("crash")
                os._exit(1)
            elif key == "exit":
                self.end("prompt_input_exit", 0)
            elif key == "idle":
                break
            elif key == "ls":
                self.bash_tool("ls", lambda: self.say(" ".join(sorted(os.listdir(self.cwd)))))
            elif key == "deaf":
                self.deaf = True
            elif key == "apifail" or (key == "apifail_once" and self._first("apifail")):
                kind, _, message = value.partition(":")
                text = message.replace("_", " ") or f"API Error: scripted {kind}"
                self.say(text)
                self.api_failed = True
                self.pending = tokens[index + 1 :]
                self.run_hooks("StopFailure", kind, error=kind, last_assistant_message=text)
                return False
            elif key == "bash":
                self.bash_tool(value.replace("_", " "))
            elif key == "log":
                self.also_log_to(value)
            elif key == "wait":
                while not os.path.exists(value):
                    time.sleep(0.2)
            else:
                self.say(f"[warning: unknown scenario token {token!r}]")
        return True

    def chatter(self, seconds: float) -> None:
        """One assistant line a second in the transcript, as a CLI at work writes them."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            usage = {
                "input_tokens": 1000,
                "output_tokens": 50,
                "cache_read_input_tokens": 300,
                "cache_creation_input_tokens": 20,
            }
            message = {"id": f"msg_{uuid.uuid4().hex}", "model": "scripted", "usage": usage}
            self._append(self.transcript_path, [{"type": "assistant", "message": message}])
            time.sleep(1.0)

    def _first(self, what: str) -> bool:
        """Whether this run does ``what`` for the first time (a flag beside the phase file)."""
        if self.phase_file is None:
            return True
        flag = Path(f"{self.phase_file}.{what}-once")
        if flag.exists():
            return False
        flag.touch()
        return True

    def end(self, reason: str, code: int) -> None:
        """Run the SessionEnd hook and exit."""
        self.run_hooks("SessionEnd", reason=reason)
        self.log("exit", code=code)
        raise SystemExit(code)


def _read_interactive(agent: Agent) -> None:
    """The TUI loop: raw mode, bracketed paste, Enter submits."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)

    def restore() -> None:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stdout.write("\x1b[?2004l")
        sys.stdout.flush()

    def on_signal(signum: int, frame: object) -> None:
        restore()
        agent.end("other", 0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        sys.stdout.write("\x1b[?2004h")
        agent.say("scripted agent (formulabeat) — ready")
        agent.show_prompt()
        buffer, pending, in_paste = bytearray(), b"", False
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                agent.end("other", 0)
            data = pending + chunk
            pending = b""
            while data:
                if in_paste:
                    end = data.find(PASTE_END)
                    if end < 0:
                        keep = _partial_suffix(data, PASTE_END)
                        buffer += data[: len(data) - keep]
                        pending = data[len(data) - keep :]
                        break
                    buffer += data[:end]
                    data = data[end + len(PASTE_END) :]
                    in_paste = False
                    agent.say(f"[pasted {len(buffer)} bytes]")
                    continue
                start = data.find(PASTE_START)
                head = data if start < 0 else data[:start]
                keep = _partial_suffix(head, PASTE_START) if start < 0 else 0
                for byte in head[: len(head) - keep]:
                    if byte in (0x0D, 0x0A) and agent.enters_to_lose:
                        agent.enters_to_lose -= 1
                    elif byte in (0x0D, 0x0A):
                        # A terminal pastes newlines as CR, which a TUI takes as line ends.
                        raw = buffer.decode("utf-8", errors="replace")
                        text = raw.replace("\r\n", "\n").replace("\r", "\n").strip()
                        buffer.clear()
                        if text and agent.ignore_input:
                            continue
                        if text:
                            agent.say(f"[received {len(text)} characters]")
                            agent.turn(text)
                            agent.show_prompt()
                    elif byte == 0x03:  # Ctrl-C
                        agent.end("other", 0)
                    else:
                        buffer.append(byte)
                if start < 0:
                    pending = head[len(head) - keep :]
                    break
                data = data[start + len(PASTE_START) :]
                in_paste = True
    finally:
        restore()


def _decision(output: str) -> dict[str, Any]:
    """A hook's JSON answer on stdout ({} when it printed none)."""
    try:
        data = json.loads(output) if output.startswith("{") else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _partial_suffix(data: bytes, marker: bytes) -> int:
    """How many trailing bytes of ``data`` could begin ``marker`` (split across reads)."""
    for size in range(min(len(marker) - 1, len(data)), 0, -1):
        if marker.startswith(data[-size:]):
            return size
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``formulabeat-scripted-agent``."""
    parser = argparse.ArgumentParser(
        prog="formulabeat-scripted-agent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dangerously-skip-permissions", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("-p", "--print", dest="oneshot", action="store_true")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--prompt-char", default="❯")
    parser.add_argument("--settings", help="a settings file whose hooks also run")
    parser.add_argument("--session-id")
    parser.add_argument(
        "--ignore-input", action="store_true", help="take keys but never a prompt (a stuck TUI)"
    )
    parser.add_argument(
        "--lose-first-enter", action="store_true", help="miss the first Enter (a slow TUI)"
    )
    args = parser.parse_args(argv)
    interactive = not args.oneshot and sys.stdin.isatty()
    agent = Agent(args.prompt_char, interactive, args.settings)
    agent.ignore_input = args.ignore_input
    agent.enters_to_lose = 1 if args.lose_first_enter else 0
    if args.startup_delay:
        time.sleep(args.startup_delay)
    try:
        if not interactive:
            text = sys.stdin.read()
            agent.run_hooks("SessionStart", "startup", source="startup")
            agent.turn(text)
            agent.end("other", 1 if agent.api_failed else 0)
        agent.run_hooks("SessionStart", "startup", source="startup")
        # Names only: the values may be secrets, and this log is read by tests.
        agent.log("start", home=os.environ.get("HOME"), env=sorted(os.environ))
        _read_interactive(agent)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
