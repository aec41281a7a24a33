"""tmux through libtmux: exact targets, real readiness, nothing leaked into the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until
from workers.errors import SessionError
from workers.tmux import AgentSession, TmuxServer, prompt_shown


def launch(tmp_path: Path, name: str, argv: list[str], env: dict[str, str] | None = None) -> Path:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"argv": argv, "env": env or {}, "cwd": str(tmp_path)}))
    return spec


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_session_named_like_ours_neither_masks_a_crash_nor_dies_with_it(
    tmp_path: Path, tmux_socket: str
) -> None:
    server = TmuxServer(tmux_socket)
    ours = AgentSession.start(
        server,
        "proj-agent",
        tmp_path,
        launch(
            tmp_path,
            "a",
            py(
                "import os, time\n"
                f"while not os.path.exists({str(tmp_path / 'go')!r}): time.sleep(0.05)\n"
                "raise SystemExit(3)"
            ),
        ),
    )
    twin = AgentSession.start(
        server, "proj-agent-2", tmp_path, launch(tmp_path, "b", py("import time; time.sleep(120)"))
    )
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


def test_ready_means_prompt_shown_and_quiet_not_a_prompt_char_anywhere(
    tmp_path: Path, tmux_socket: str
) -> None:
    # It prints lines starting with ❯ while it is still busy, then goes quiet.
    code = (
        "import sys, time\n"
        "for i in range(30):\n"
        "    print(f'❯ loading step {i}', flush=True); time.sleep(0.05)\n"
        "print('READY-MARKER'); print('❯ ', end='', flush=True); time.sleep(120)\n"
    )
    session = AgentSession.start(
        TmuxServer(tmux_socket), "ready", tmp_path, launch(tmp_path, "r", py(code))
    )
    session.wait_ready("❯", quiet=0.4, timeout=30)
    assert "READY-MARKER" in session.capture()
    session.kill()


def test_prompt_detection_looks_at_line_starts_only() -> None:
    assert prompt_shown("banner\n\n❯ \n", "❯")
    assert prompt_shown("──────\n│ ❯ type here │\n──────\n  ? for shortcuts", "❯")
    assert not prompt_shown("the arrow ❯ appears mid-line\n", "❯")


def test_an_agent_that_exits_before_its_prompt_is_a_clear_error(
    tmp_path: Path, tmux_socket: str
) -> None:
    # As a run does: tmux 3.3 may mark the pane dead without its status,
    # and the launcher's exit file is what says it then.
    exit_file = tmp_path / "d.exit"
    spec = launch(tmp_path, "d", py("print('bye'); raise SystemExit(7)"))
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "exit_file": str(exit_file)}))
    session = AgentSession.start(TmuxServer(tmux_socket), "dies", tmp_path, spec, exit_file)
    with pytest.raises(SessionError, match=r"ended \(exit status 7\) before showing its prompt"):
        session.wait_ready("❯", quiet=0.2, timeout=30)
    session.kill()


def test_missing_prompt_times_out_with_the_last_output(tmp_path: Path, tmux_socket: str) -> None:
    session = AgentSession.start(
        TmuxServer(tmux_socket),
        "noprompt",
        tmp_path,
        launch(tmp_path, "n", py("print('Login required'); import time; time.sleep(60)")),
    )
    with pytest.raises(
        SessionError, match=r"did not show its ready prompt .* within 1 s.*Login required"
    ):
        session.wait_ready("❯", quiet=0.2, timeout=1)
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
        session = AgentSession.start(
            TmuxServer(tmux_socket), "fds", tmp_path, launch(tmp_path, "f", py(code), {"X": "1"})
        )
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
