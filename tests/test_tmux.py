"""tmux through libtmux: exact targets, real readiness, nothing leaked into the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_session, wait_until
from workers.errors import SessionError
from workers.tmux import TmuxServer


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_session_named_like_ours_neither_masks_a_crash_nor_dies_with_it(
    tmp_path: Path, tmux_socket: str
) -> None:
    ours = start_session(
        tmux_socket,
        "proj-agent",
        tmp_path,
        py(
            "import os, time\n"
            f"while not os.path.exists({str(tmp_path / 'go')!r}): time.sleep(0.05)\n"
            "raise SystemExit(3)"
        ),
    )
    twin = start_session(tmux_socket, "proj-agent-2", tmp_path, py("import time; time.sleep(120)"))
    assert ours.alive() and twin.alive()
    # The original's `tmux has-session -t proj-agent` prefix-matches proj-agent-2.
    prefix = subprocess.run(
        ["tmux", "-L", tmux_socket, "has-session", "-t", "proj-agent-"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert prefix.returncode == 0, "tmux prefix matching is what this test guards against"
    (tmp_path / "go").touch()
    wait_until(lambda: not ours.alive(), 30, "our agent to exit")
    alive, how = ours.status()
    # tmux 3.3 sometimes marks the pane dead without recording the status.
    assert not alive and how in ("exit status 3", "exit status unknown")
    assert twin.alive()
    ours.kill()
    assert twin.alive()
    twin.kill()
    assert not twin.alive()


def test_ids_a_restarted_tmux_server_gives_out_again_name_no_session_of_ours(
    tmp_path: Path, tmux_socket: str
) -> None:
    # A server whose last session ended exits; the next one numbers its
    # sessions and panes from the start again.
    sleep = py("import time; time.sleep(120)")
    gone = start_session(tmux_socket, "proj-planner-aaaaaaaa", tmp_path, sleep)
    TmuxServer(tmux_socket).cmd("kill-server")
    other = start_session(tmux_socket, "proj-gardener-bbbbbbbb", tmp_path, sleep)
    assert (other.session_id, other.pane_id) == (gone.session_id, gone.pane_id)
    # The old ids now name another run's session: ours is gone, and ending it
    # does not end theirs.
    assert gone.status() == (False, "its tmux session is gone")
    states = TmuxServer(tmux_socket).pane_states()
    assert gone.status_from(states.get(gone.pane_id) if states else None, known=True)[0] is False
    gone.kill()
    assert other.alive()
    other.kill()


def test_an_agent_whose_status_tmux_lost_has_it_from_the_launchers_exit_file(
    tmp_path: Path, tmux_socket: str
) -> None:
    # tmux 3.3 may mark the pane dead without its status: the launcher's
    # shell parent writes it down, as it does for a run.
    exit_file = tmp_path / "d.exit"
    session = start_session(
        tmux_socket, "dies", tmp_path, py("print('bye'); raise SystemExit(7)"), None, exit_file
    )
    wait_until(lambda: not session.alive(), 30, "the agent to exit")
    assert session.status() == (False, "exit status 7")
    assert "bye" in session.capture()  # remain-on-exit keeps its last screen
    session.kill()


def test_the_agent_starts_without_a_shell_whatever_the_login_shell(
    tmp_path: Path, tmux_socket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A service account's login shell is nologin; tmux runs a one-string
    # command through it, and a command given as words without it.
    monkeypatch.setenv("SHELL", "/usr/sbin/nologin")
    marker = tmp_path / "ran"
    session = start_session(
        tmux_socket, "nologin", tmp_path, py(f"open({str(marker)!r}, 'w').write('yes')")
    )
    wait_until(marker.exists, 30, "the agent to run")
    session.kill()


def test_the_agents_environment_is_the_launch_files_not_the_tmux_servers(
    tmp_path: Path, tmux_socket: str
) -> None:
    # Whoever started the tmux server (here with another HOME and a secret),
    # the agent sees the environment the launch file gives.
    subprocess.run(
        ["tmux", "-L", tmux_socket, "new-session", "-d", "-s", "first", "sleep 120"],
        env={"PATH": os.environ["PATH"], "HOME": "/tmp/someone-else", "SECRET_X": "leak"},
        check=True,
        timeout=10,
    )
    seen = tmp_path / "env.json"
    code = f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))"
    session = start_session(tmux_socket, "envtest", tmp_path, py(code), {"ONLY_THIS": "1"})
    wait_until(lambda: seen.exists() and seen.read_text(), 30, "the agent's environment")
    env = json.loads(seen.read_text())
    assert env["HOME"] == str(tmp_path)
    assert env["ONLY_THIS"] == "1"
    assert "SECRET_X" not in env
    assert env["TMUX_PANE"] == session.pane_id  # what the hooks use to find the pane
    session.kill()


def test_no_descriptor_or_secret_of_the_orchestrator_reaches_tmux_or_the_agent(
    tmp_path: Path, tmux_socket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = tmp_path / "orchestrator.lock"
    fd = os.open(held, os.O_CREAT | os.O_RDWR)
    os.set_inheritable(fd, True)  # as a bash flock would be
    monkeypatch.setenv("FORGE_TOKEN", "tok-SECRET-fd-test")
    try:
        pid_file = tmp_path / "agent.pid"
        code = (
            f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
        )
        session = start_session(tmux_socket, "fds", tmp_path, py(code), {"X": "1"})
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30, "agent pid")
        agent_pid = int(pid_file.read_text())
        server_pid = int(
            subprocess.run(
                ["tmux", "-L", tmux_socket, "display-message", "-p", "#{pid}"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
        )
        for pid in (agent_pid, server_pid):
            targets = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
            assert str(held) not in targets, f"pid {pid} holds the orchestrator's lock file"
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"tok-SECRET-fd-test" not in environ, f"pid {pid} got the token"
        session.kill()
    finally:
        os.close(fd)


def test_every_tmux_command_has_a_timeout(tmp_path: Path) -> None:
    slow = tmp_path / "tmux"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    server = TmuxServer("unused")
    server.tmux_bin = str(slow)
    server.timeout = 0.5
    with pytest.raises(SessionError, match=r"did not answer within 0\.5 s"):
        server.cmd("list-sessions")


def test_a_shut_down_server_leaves_no_socket_file(tmux_socket: str) -> None:
    # tmux 3.3 leaves the socket of a server that exited: a dead file per test once.
    server = TmuxServer(tmux_socket)
    server.checked("new-session", "-d", "-s", "one", "sleep 60")
    assert server.socket_file().is_socket()
    server.shut_down()
    assert server.session_names() == []
    assert not server.socket_file().exists()
