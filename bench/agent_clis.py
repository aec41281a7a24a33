"""``make bench``'s series for Codex CLI and Gemini CLI, as bench.bench measures Claude Code.

Each pinned CLI (``make agent-clis``) runs against its API stand-in from the
tests (tests/responses_api.py, tests/gemini_api.py), in a HOME set up as the
tests set it up:

- its own start: tmux new-session → its input box drawn (Gemini CLI: and its
  banner, when it takes input), no formulabeat, in a worktree it never saw;
- run sent → prompt confirmed (RUNNING published, its prompt-submit hook
  ran), one run at a time; the difference is formulabeat's overhead;
- ``sessions`` CLIs idle at their input box after a phase: the CLIs' CPU and
  RSS per session, and the worker's and tmux server's CPU (formulabeat's share).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.app import client_app
from tasks.demo import commit_all
from tests.gemini_api import GeminiAPI
from tests.real_cli import (
    AGENT_CLIS,
    CODEX_BYPASS,
    GEMINI_YOLO,
    codex_env,
    codex_setup,
    gemini_env,
    gemini_setup,
)
from tests.responses_api import ResponsesAPI
from workers.agents import codex, gemini

READY_TIMEOUT = 60.0


def _ready_codex(screen: str) -> bool:
    return codex.input_box(screen.splitlines()) is not None


def _ready_gemini(screen: str) -> bool:
    # Its box comes first, then its banner: it takes input from then on.
    return gemini.input_box(screen.splitlines()) is not None and "Gemini CLI v" in screen


def _own_start_ms(
    argv: list[str],
    env: dict[str, str],
    ready: Callable[[str], bool],
    socket: str,
    runs: int,
    root: Path,
    trusted: Callable[[Path], None],
) -> list[float]:
    """The CLI alone: tmux new-session → ready (no formulabeat), each in a new worktree."""
    repo = root / "ready-repo"
    commit_all(repo, {"README.md": "# ready\n"}, "ready")
    worktrees = root / "ready-worktrees"
    worktrees.mkdir()
    trusted(repo)
    trusted(worktrees)
    words = ["env", "-i", *(f"{k}={v}" for k, v in {**env, "PATH": os.environ["PATH"]}.items())]
    tmux = ["tmux", "-L", socket]
    new = [*tmux, "new-session", "-d", "-x", "200", "-y", "50"]
    subprocess.run([*new, "-s", "keep", "sleep", "3600"], check=True, timeout=30)
    times = []
    for index in range(runs):
        worktree = worktrees / f"ready{index}"
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--detach", str(worktree), "HEAD"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        name = f"ready{index}"
        started = time.time()
        subprocess.run(
            [*new, "-s", name, "-c", str(worktree), *words, *argv], check=True, timeout=30
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", name],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            if ready(screen):
                times.append((time.time() - started) * 1000)
                break
            time.sleep(0.01)
        else:
            print(f"{argv[0]} was not ready within {READY_TIMEOUT:g} s")
        subprocess.run([*tmux, "kill-session", "-t", name], timeout=30, check=False)
    subprocess.run([*tmux, "kill-server"], timeout=30, check=False)
    return times


def _how(driver: str, binary: Path, flags: str, env: dict[str, str]) -> str:
    words = ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items())
    return f'command = "{binary} {flags}"\ndriver = "{driver}"\nenv = {{ {words} }}\n'


def bench_agent_cli(
    name: str, root: Path, sessions: int, runs: int, idle: float, bench: Any
) -> dict[str, Any]:
    """One CLI's series (``name``: codex or gemini); ``bench`` is bench.bench (its helpers)."""
    binary = AGENT_CLIS / name
    if not binary.exists():
        print(f"no {name} CLI at {binary} (make agent-clis): its series skipped")
        return {f"{name}_version": None}
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout.split()[-1]
    results: dict[str, Any] = {f"{name}_version": version}
    root.mkdir(parents=True, exist_ok=True)
    home = root / "home"
    socket = f"fbbench-{name}-{os.getpid()}"
    api: ResponsesAPI | GeminiAPI
    if name == "codex":
        api = ResponsesAPI()
        flags, ready = CODEX_BYPASS, _ready_codex
    else:
        api = GeminiAPI()
        flags, ready = GEMINI_YOLO, _ready_gemini
    with api:
        if name == "codex":
            assert isinstance(api, ResponsesAPI)
            codex_setup(home, api.base_url)
            env = codex_env(home)
            argv = [str(binary), *flags.split(), "--no-daemon"]

            def trusted(path: Path) -> None:
                codex.trust(codex.config_file(env), path)
        else:
            gemini_setup(home)
            env = gemini_env(home, api.url)
            argv = [str(binary), *flags.split()]

            def trusted(path: Path) -> None:
                folders = home / ".gemini" / "trustedFolders.json"
                data = json.loads(folders.read_text()) if folders.exists() else {}
                data[os.path.realpath(path)] = "TRUST_FOLDER"
                folders.write_text(json.dumps(data))

        own = _own_start_ms(argv, env, ready, socket, runs, root, trusted)
        results[f"{name}_own_start_ms_p50"] = round(statistics.median(own), 1) if own else None
        how = _how(name, binary, flags, env)
        with bench.bench_host(root / "start", {"starter": "phase=done"}, 1, how) as (
            stack,
            server,
        ):
            app = client_app(stack.cfg)
            observer = bench.Observer(server.client())
            client = server.client()
            sent = {}
            for _ in range(runs):
                at = time.time()
                run_id = bench.send_run(app, "starter")
                sent[run_id] = at
                bench.wait_for(lambda run_id=run_id: bench.run_ended(client, run_id), 120)
            observer.close()
        starts = [
            (observer.seen[(r, "RUNNING")] - t) * 1000
            for r, t in sent.items()
            if (r, "RUNNING") in observer.seen
        ]
        if starts:
            results[f"{name}_start_ms_p50"] = round(statistics.median(starts), 1)
            results[f"{name}_start_ms_p99"] = round(bench._pct(starts, 0.99), 1)
            if own:
                overhead = results[f"{name}_start_ms_p50"] - results[f"{name}_own_start_ms_p50"]
                results[f"{name}_start_overhead_ms_p50"] = round(overhead, 1)
        results[f"{name}_start_runs"] = len(starts)
        idle_figures = bench._real_idle(root / "idle", how, sessions, idle)
        results.update({k.replace("real_", f"{name}_", 1): v for k, v in idle_figures.items()})
    return results
