"""tmux, through libtmux: the server, and the agent session a run owns.

libtmux runs tmux with no timeout, so :class:`TmuxServer` routes every command
that libtmux's objects issue (``Server.cmd``, which Session and Pane call)
through ``subprocess.run`` with a timeout and a scrubbed environment. Targets
are always exact ids (``$3``, ``%7``): a name is a prefix match in tmux, and a
session named ``<name>-2`` must never be taken for ``<name>``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtmux
from libtmux.common import tmux_cmd
from libtmux.pane import Pane

from workers.errors import SessionError

TMUX_TIMEOUT = 15.0
READY_POLL_MIN = 0.02
READY_POLL_MAX = 0.25
# The tmux server inherits the environment of the client that starts it, and
# every later pane sees that environment: pass on only what a terminal needs.
_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TMPDIR", "TERM")
_BOX_CHARS = "│┃|║ \t"


class TmuxResult(tmux_cmd):
    """What one tmux command printed, in the shape libtmux's objects read."""

    # tmux_cmd's own __init__ runs tmux without a timeout: this one only holds
    # the outcome of a command TmuxServer.cmd already ran.
    def __init__(self, cmd: list[str], stdout: list[str], stderr: list[str], code: int) -> None:
        self.cmd = cmd
        self.stdout = stdout
        self.stderr = stderr
        self.returncode = code


def scrubbed_env() -> dict[str, str]:
    """The environment given to tmux (and so to a tmux server we start)."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith("LC_")}
    env.setdefault("LANG", "C.UTF-8")
    return env


class TmuxServer(libtmux.Server):
    """libtmux's Server with a timeout on every command it runs."""

    def __init__(self, socket: str | None = None, timeout: float = TMUX_TIMEOUT) -> None:
        if socket and "/" in socket:
            super().__init__(socket_path=socket)
        elif socket:
            super().__init__(socket_name=socket)
        else:
            super().__init__()
        self.timeout = timeout

    def base_argv(self) -> list[str]:
        """``tmux`` and the options that select this server."""
        binary = self.tmux_bin or shutil.which("tmux")
        if not binary:
            raise SessionError("tmux not found on PATH: install tmux (apt-get install tmux)")
        argv = [binary]
        if self.socket_path:
            argv.append(f"-S{self.socket_path}")
        elif self.socket_name:
            argv.append(f"-L{self.socket_name}")
        return argv

    def cmd(  # type: ignore[override]
        self, cmd: str, *args: Any, target: str | int | None = None
    ) -> TmuxResult:
        """Run one tmux command (libtmux calls this for every object method)."""
        argv = [*self.base_argv(), cmd]
        if target is not None:
            argv += ["-t", str(target)]
        argv += [str(a) for a in args]
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                errors="backslashreplace",
                stdin=subprocess.DEVNULL,
                env=scrubbed_env(),
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SessionError(f"tmux {cmd} did not answer within {self.timeout:g} s") from None
        except FileNotFoundError:
            raise SessionError("tmux not found on PATH: install tmux") from None
        stdout = proc.stdout.split("\n")
        while stdout and stdout[-1] == "":
            stdout.pop()
        stderr = [line for line in proc.stderr.split("\n") if line]
        return TmuxResult(argv, stdout, stderr, proc.returncode)

    def session_names(self) -> list[str]:
        """Names of the sessions on this server (empty when it is not running)."""
        result = self.cmd("list-sessions", "-F", "#{session_name}")
        return [line for line in result.stdout if line] if result.returncode == 0 else []

    def pane_paths(self) -> set[Path]:
        """Current directories of every pane on this server (empty when it is not running)."""
        result = self.cmd("list-panes", "-a", "-F", "#{pane_current_path}")
        if result.returncode != 0:
            return set()
        return {Path(line) for line in result.stdout if line}

    def pane_states(self) -> dict[str, PaneState] | None:
        """Every pane's state in one command (None when the server is not running)."""
        result = self.cmd("list-panes", "-a", "-F", f"#{{pane_id}}:{PANE_STATE_FORMAT}")
        if result.returncode != 0:
            return None
        states = {}
        for line in result.stdout:
            pane_id, _, rest = line.partition(":")
            states[pane_id] = PaneState.parse(rest)
        return states

    def checked(self, cmd: str, *args: Any, target: str | None = None) -> list[str]:
        """Run a tmux command; a failure becomes a SessionError with tmux's message."""
        result = self.cmd(cmd, *args, target=target)
        if result.returncode != 0:
            message = "; ".join(result.stderr) or f"exit status {result.returncode}"
            raise SessionError(f"tmux {cmd} failed: {message}")
        return result.stdout


PANE_STATE_FORMAT = "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}"


@dataclass(frozen=True)
class PaneState:
    """Whether a pane's process ended, and its exit status or signal when tmux knows."""

    dead: bool
    status: str = ""
    signal: str = ""

    @classmethod
    def parse(cls, text: str) -> PaneState:
        """Read the output of :data:`PANE_STATE_FORMAT`."""
        dead, status, signal = [*text.split(":"), "", ""][:3]
        return cls(dead=dead == "1", status=status.strip(), signal=signal.strip())


@dataclass(frozen=True)
class AgentSession:
    """The tmux session of one run, addressed by its exact ids."""

    server: TmuxServer
    name: str
    session_id: str
    pane_id: str
    # Where the launcher writes the agent's exit status (see workers.launcher).
    exit_file: Path | None = None

    @classmethod
    def start(
        cls,
        server: TmuxServer,
        name: str,
        cwd: Path,
        launch_file: Path,
        exit_file: Path | None = None,
    ) -> AgentSession:
        """Create a detached session in ``cwd`` running the launcher for ``launch_file``."""
        command = shlex.join([sys.executable, "-m", "workers.launcher", str(launch_file)])
        # remain-on-exit is set in the same tmux command queue as new-session,
        # so even an agent that dies at once leaves a dead pane with its status.
        out = server.checked(
            "new-session",
            "-d",
            "-P",
            "-F",
            "#{session_id} #{pane_id}",
            "-s",
            name,
            "-c",
            str(cwd),
            "-x",
            "200",
            "-y",
            "50",
            command,
            ";",
            "set-option",
            "-w",
            "remain-on-exit",
            "on",
        )
        try:
            session_id, pane_id = out[0].split()
        except (IndexError, ValueError):
            raise SessionError(f"tmux new-session printed {out!r}, not ids") from None
        return cls(
            server=server, name=name, session_id=session_id, pane_id=pane_id, exit_file=exit_file
        )

    @property
    def pane(self) -> Pane:
        """The libtmux Pane of the agent (commands go through the timed server)."""
        return Pane(server=self.server, pane_id=self.pane_id)

    def status(self) -> tuple[bool, str | None]:
        """(alive, how it ended): dead when the pane's process exited or the session is gone."""
        return self.status_from(None)

    def status_from(self, state: PaneState | None, known: bool = False) -> tuple[bool, str | None]:
        """Like :meth:`status`, starting from a state already read (``known``: None is gone)."""
        # tmux marks the pane dead when the pty closes, which can come before
        # it reaps the process (and 3.3 sometimes never records the status):
        # give it a moment, then say the status is unknown.
        for _ in range(10):
            if state is None and not known:
                result = self.server.cmd(
                    "display-message", "-p", "-t", self.pane_id, PANE_STATE_FORMAT
                )
                if result.returncode == 0 and result.stdout:
                    state = PaneState.parse(result.stdout[0])
            if state is None:
                return False, "its tmux session is gone"
            if not state.dead:
                return True, None
            if state.signal:
                return False, f"killed by signal {state.signal}"
            if state.status:
                return False, f"exit status {state.status}"
            if self.exit_file is not None and self.exit_file.exists():
                recorded = self.exit_file.read_text().strip()
                if recorded:
                    return False, f"exit status {recorded}"
            state, known = None, False
            time.sleep(0.02)
        return False, "exit status unknown"

    def alive(self) -> bool:
        """Whether the agent process in the pane is still running."""
        return self.status()[0]

    def capture(self) -> str:
        """The visible text of the pane."""
        return "\n".join(self.pane.capture_pane())

    def wait_ready(self, prompt: str, quiet: float, timeout: float) -> None:
        """Wait until the agent's prompt line shows and the pane has been quiet for ``quiet`` s."""
        deadline = time.monotonic() + timeout
        last, changed_at = None, time.monotonic()
        # Look often right after the screen changed (the prompt may just have
        # appeared), less and less while it stays the same: a fleet starting
        # hundreds of agents at once does not spend its CPU on looking.
        poll = READY_POLL_MIN
        while True:
            alive, how = self.status()
            if not alive:
                raise SessionError(
                    f"the agent ended ({how}) before showing its prompt; "
                    f"last output: {_tail(last or '')!r}"
                )
            screen = self.capture()
            now = time.monotonic()
            if screen != last:
                last, changed_at, poll = screen, now, READY_POLL_MIN
            elif now - changed_at >= quiet and prompt_shown(screen, prompt):
                return
            else:
                poll = min(READY_POLL_MAX, poll * 1.5)
            if now >= deadline:
                raise SessionError(
                    f"the agent did not show its ready prompt {prompt!r} within {timeout:g} s; "
                    f"last output: {_tail(screen)!r}"
                )
            time.sleep(poll)

    def paste_file(self, path: Path, buffer_name: str) -> None:
        """Paste a file's text as one bracketed paste, then press Enter on its own."""
        self.server.checked("load-buffer", "-b", buffer_name, str(path))
        self.pane.paste_buffer(buffer_name=buffer_name, delete_after=True, bracket=True)
        # A TUI may still be taking the paste in; Enter inside it would be text.
        time.sleep(0.05)
        self.server.checked("send-keys", "-t", self.pane_id, "Enter")

    def type_text(self, text: str) -> None:
        """Type literal text into the pane and press Enter (a nudge)."""
        self.server.checked("send-keys", "-t", self.pane_id, "-l", text)
        self.server.checked("send-keys", "-t", self.pane_id, "Enter")

    def kill(self) -> None:
        """Kill this session (and only it); a session already gone is fine."""
        self.server.cmd("kill-session", "-t", self.session_id)


def prompt_shown(screen: str, prompt: str, window: int = 12) -> bool:
    """Whether one of the last non-blank lines *starts* with the prompt character."""
    lines = [line for line in screen.splitlines() if line.strip()][-window:]
    return any(line.lstrip(_BOX_CHARS).startswith(prompt) for line in lines)


def session_name(project: str, agent: str, run_id: str) -> str:
    """A tmux-safe, unique session name: ``<project>-<agent>-<run id prefix>``."""
    name = f"{project}-{agent}-{run_id[:8]}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _tail(screen: str) -> str:
    lines = [line for line in screen.splitlines() if line.strip()]
    return " / ".join(lines[-3:])
