"""tmux, through libtmux: the server, and the agent session a run owns.

libtmux runs tmux with no timeout, so :class:`TmuxServer` routes every command
that libtmux's objects issue (``Server.cmd``, which Session and Pane call)
through ``subprocess.run`` with a timeout and a scrubbed environment. Panes are
targeted by exact id (``%7``), sessions by exact name (``=name``: a bare name
is a prefix match in tmux, and ``<name>-2`` must never be taken for
``<name>``). Ids are a server's own: a tmux server that exited (its last
session ended) and was started again gives them out anew, so a recorded pane
id is trusted only while the pane belongs to the run's session (its name is
unique to the run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtmux
from libtmux.common import tmux_cmd
from libtmux.pane import Pane

from workers.errors import SessionError

TMUX_TIMEOUT = 15.0
# The tmux server inherits the environment of the client that starts it, and
# every later pane sees that environment: pass on only what a terminal needs,
# and where the sockets are (so `tmux -L NAME attach` finds formulabeat's).
_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TMPDIR", "TERM", "TMUX_TMPDIR")


def socket_dir() -> Path:
    """Where tmux keeps the socket of a server named with ``-L``, as tmux decides it."""
    return Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"


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

    def socket_file(self) -> Path:
        """The socket this server listens on (or would)."""
        if self.socket_path:
            return Path(self.socket_path)
        return socket_dir() / (self.socket_name or "default")

    def shut_down(self) -> None:
        """Kill this private server, if it runs, and remove its socket file.

        tmux 3.3 leaves the file of a server that exited: one dead file per
        private server (a test's, the benchmark's, the demo's) otherwise.
        The default server (no socket named) is the user's: left alone.
        """
        if not (self.socket_name or self.socket_path):
            return
        self.cmd("kill-server")
        # A server that does not answer in time (SessionError above) keeps its file.
        self.socket_file().unlink(missing_ok=True)

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

    def retried(self, cmd: str, *args: Any) -> list[str]:
        """:meth:`checked`, once more if the server was exiting when asked."""
        try:
            return self.checked(cmd, *args)
        except SessionError as exc:
            if "server exited unexpectedly" not in str(exc):
                raise
            time.sleep(0.05)
            return self.checked(cmd, *args)

    def checked(self, cmd: str, *args: Any, target: str | None = None) -> list[str]:
        """Run a tmux command; a failure becomes a SessionError with tmux's message."""
        result = self.cmd(cmd, *args, target=target)
        if result.returncode != 0:
            message = "; ".join(result.stderr) or f"exit status {result.returncode}"
            raise SessionError(f"tmux {cmd} failed: {message}")
        return result.stdout


# Session names are letters, digits, "-" and "_" (workers.config): no ":".
PANE_STATE_FORMAT = "#{session_name}:#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}"


@dataclass(frozen=True)
class PaneState:
    """Whether a pane's process ended, and its exit status or signal when tmux knows."""

    dead: bool
    status: str = ""
    signal: str = ""
    # The session the pane is in (a pane id alone names it on one server's life only).
    session: str = ""

    @classmethod
    def parse(cls, text: str) -> PaneState:
        """Read the output of :data:`PANE_STATE_FORMAT`."""
        session, dead, status, signal = [*text.split(":"), "", "", ""][:4]
        return cls(dead=dead == "1", status=status.strip(), signal=signal.strip(), session=session)


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
        command: Sequence[str],
        exit_file: Path | None = None,
    ) -> AgentSession:
        """Create a detached session in ``cwd`` running ``command`` (its words, no shell).

        Given as separate words, tmux execs the command itself; given as one
        string it would run it through the user's login shell, which for a
        service account is ``nologin``.
        """
        # remain-on-exit is set in the same tmux command queue as new-session,
        # so even an agent that dies at once leaves a dead pane with its status.
        # A server whose last session just ended is exiting, and refuses a new
        # session with "server exited unexpectedly": the next command starts
        # a new server.
        out = server.retried(
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
            *command,
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

    def status_from(
        self, state: PaneState | None, known: bool = False, exit_file: bool = True
    ) -> tuple[bool, str | None]:
        """Like :meth:`status`, starting from a state already read (``known``: None is gone).

        ``exit_file`` False: the caller knows the launcher wrote no exit status
        (inotify would have said), so a live pane is alive without reading it.
        """
        recorded = self._recorded_exit() if exit_file else None
        if recorded is not None:
            # The launcher's shell wrote the agent's status and lingers a
            # moment so tmux reads the agent's last output: it has ended.
            return False, recorded
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
            if state is None or state.session != self.name:
                # (A pane of another session: the server was started anew.)
                return False, "its tmux session is gone"
            if not state.dead:
                return True, None
            if state.signal:
                return False, f"killed by signal {state.signal}"
            if state.status:
                return False, f"exit status {state.status}"
            recorded = self._recorded_exit()
            if recorded is not None:
                return False, recorded
            state, known = None, False
            time.sleep(0.02)
        return False, "exit status unknown"

    def _recorded_exit(self) -> str | None:
        if self.exit_file is None:
            return None
        try:
            # Read for every session at every sweep: plain open, not pathlib.
            with open(self.exit_file, encoding="ascii", errors="replace") as handle:
                code = handle.read().strip()
        except OSError:
            return None
        if not code.isdigit():
            return None
        # A shell reports a death by signal N as 128 + N.
        return f"killed by signal {int(code) - 128}" if int(code) > 128 else f"exit status {code}"

    def alive(self) -> bool:
        """Whether the agent process in the pane is still running."""
        return self.status()[0]

    def capture(self) -> str:
        """The visible text of the pane."""
        return "\n".join(self.pane.capture_pane())

    def paste_file(self, path: Path, buffer_name: str) -> None:
        """Paste a file's text as one bracketed paste (no Enter)."""
        self.server.checked("load-buffer", "-b", buffer_name, str(path))
        self.pane.paste_buffer(buffer_name=buffer_name, delete_after=True, bracket=True)

    def press(self, *keys: str) -> None:
        """Send tmux key names (``Enter``, ``Up``) or single characters to the pane."""
        self.server.checked("send-keys", "-t", self.pane_id, *keys)

    def kill(self) -> None:
        """Kill this session (and only it); a session already gone is fine.

        By its exact name, never its id: after a tmux server restart the id
        may be another run's session.
        """
        self.server.cmd("kill-session", "-t", f"={self.name}")


def session_name(project: str, agent: str, run_id: str) -> str:
    """A tmux-safe, unique session name: ``<project>-<agent>-<run id prefix>``."""
    name = f"{project}-{agent}-{run_id[:8]}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def screen_tail(screen: str, lines: int = 6, limit: int = 600) -> str:
    """The last non-blank lines of a screen, joined with `` / `` (for a reason)."""
    kept = [" ".join(line.split()) for line in screen.splitlines() if line.strip()][-lines:]
    text = " / ".join(kept)
    return text if len(text) <= limit else "…" + text[-limit:]
