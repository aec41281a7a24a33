"""``formulabeat demo``: a throwaway project run end to end by real parts.

It makes a git repository with four formulas (planner, predictor, gardener,
supervisor), each carrying a scenario for the scripted agent, starts the
embedded Redis, a worker, beat and Flower, lets beat start the four runs,
shows their phases live, and exits 0 when every run ended as its scenario
says.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import git

from workers import embedded, registry
from workers.config import Config, load_config
from workers.tmux import TmuxServer

# agent -> (scenario for the scripted agent, expected outcome)
SCENARIOS = {
    "planner": ("phase=done", "done"),
    "predictor": ("sleep=0.5 phase=awaiting_ci sleep=1.5 phase=done", "done"),
    "gardener": ("sleep=0.5 crash", "crashed"),
    "supervisor": ("sleep=0.3 phase=escalate", "escalate"),
}

FORMULA = """name = "{agent}"
description = "Demo formula for the {agent} agent"

[context]
files = ["README.md", "ops:journal.md"]

[[steps]]
id = "survey"
title = "Survey the project"
description = "Read the context below and decide what to do."

[[steps]]
id = "act"
title = "Do the work"
description = \"\"\"The scripted agent follows this line:
SCENARIO: {scenario}
\"\"\"
"""


def commit_all(repo_dir: Path, files: dict[str, str], message: str) -> git.Repo:
    """Create (or extend) a git repository at ``repo_dir`` with ``files`` committed."""
    repo = git.Repo.init(repo_dir, initial_branch="main")
    with repo.config_writer() as writer:
        writer.set_value("user", "name", "formulabeat demo")
        writer.set_value("user", "email", "demo@formulabeat.invalid")
    for name, text in files.items():
        path = repo_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    repo.index.add(list(files))
    repo.index.commit(message)
    return repo


def make_demo_project(root: Path, scenarios: dict[str, str] | None = None) -> Path:
    """Create the demo's repositories and config under ``root``; return the config path."""
    project, ops = root / "project", root / "ops"
    chosen = {agent: scenario for agent, (scenario, _) in SCENARIOS.items()}
    chosen.update(scenarios or {})
    formulas = {
        f"formulas/{agent}.toml": FORMULA.format(agent=agent, scenario=scenario)
        for agent, scenario in chosen.items()
    }
    commit_all(project, {"README.md": "# demo\nA throwaway project.\n", **formulas}, "demo")
    commit_all(ops, {"journal.md": "# journal\nNothing yet.\n"}, "ops")
    agent_command = f"{sys.executable} -m workers.scripted_agent --dangerously-skip-permissions"
    agents = "\n".join(
        f"""
[[agents]]
name = "{agent}"
project = "demo"
formula = "project/formulas/{agent}.toml"
# Yearly, so that the only run is the one at start.
schedule = "0 0 1 1 *"
run_on_start = true
command = "{agent_command}"
driver = "scripted"
min_memory_mb = 256
idle_timeout = 60
"""
        for agent in SCENARIOS
    )
    config = f"""state_dir = "state"

[worker]
concurrency = 8

[tmux]
socket = "formulabeat-demo-{secrets.token_hex(4)}"

[flower]
port = {embedded.free_port()}

# The scripted agents share no login, so the four run side by side.
[credentials.default]
max_sessions = 4

[[projects]]
name = "demo"
repo_root = "project"
ops_repo_root = "ops"
forge_url = "http://127.0.0.1:3000"
primary_branch = "main"
{agents}"""
    path = root / "formulabeat.toml"
    path.write_text(config)
    return path


def _rows(client: Any) -> dict[str, dict[str, Any]]:
    """The first real (not skipped) run of each agent, else its latest skip."""
    rows: dict[str, dict[str, Any]] = {}
    for snap in reversed(registry.recent(client, 200)):
        agent = snap["agent"]
        current = rows.get(agent)
        if current is None or (
            current.get("outcome") == "skipped" and snap.get("outcome") != "skipped"
        ):
            rows[agent] = snap
    return rows


def _table(rows: dict[str, dict[str, Any]], started: float) -> list[str]:
    lines = [f"{'agent':<11} {'state':<12} {'phase':<18} {'outcome':<10} {'host':<12} run"]
    for agent in SCENARIOS:
        snap = rows.get(agent, {})
        state = snap.get("state") or "waiting"
        lines.append(
            f"{agent:<11} {state:<12} {snap.get('final_phase') or '-':<18} "
            f"{snap.get('outcome') or '-':<10} {snap.get('host') or '-':<12} "
            f"{snap.get('run_id') or '-'}"
        )
    lines.append(f"elapsed {time.monotonic() - started:5.1f} s")
    return lines


def run_demo(keep: bool = False, timeout: float = 120.0) -> int:
    """Run the demo; 0 when every run ended as its scenario says."""
    from tasks.app import redis_client
    from tasks.stack import Stack

    root = Path(tempfile.mkdtemp(prefix="formulabeat-demo-"))
    cfg: Config = load_config(make_demo_project(root))
    stack = Stack(cfg, log_dir=cfg.state_dir / "logs")
    started = time.monotonic()
    rows: dict[str, dict[str, Any]] = {}
    try:
        print(f"demo project: {root}")
        stack.start()
        print(f"embedded Redis, worker, beat and Flower are up; Flower: {stack.flower_url}")
        client = redis_client(cfg)
        shown: list[str] = []
        while time.monotonic() - started < timeout:
            rows = _rows(client)
            table = _table(rows, started)
            if table[:-1] != shown[:-1]:
                print("\n".join(table), flush=True)
                shown = table
            if len(rows) == len(SCENARIOS) and all(r.get("outcome") for r in rows.values()):
                break
            dead = stack.alive()
            if dead:
                print(f"demo: {', '.join(dead)} exited; see {cfg.state_dir / 'logs'}")
                return 1
            time.sleep(0.3)
        else:
            print(f"demo: the runs did not all end within {timeout:g} s")
            return 1
    finally:
        stack.stop()
        _kill_tmux(cfg)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    failures = 0
    print("\nresults:")
    for agent, (_, expected) in SCENARIOS.items():
        snap = rows[agent]
        ok = snap.get("outcome") == expected
        failures += not ok
        phases = " → ".join(p["phase"] for p in snap.get("phases", [])) or "no phase"
        print(
            f"  {'ok ' if ok else 'BAD'} {agent:<11} {snap.get('outcome'):<9} "
            f"(expected {expected}; {phases}; {snap.get('reason') or 'no reason'})"
        )
    print(f"Flower was at {stack.flower_url}; run time {time.monotonic() - started:.1f} s")
    return 0 if failures == 0 else 1


def _kill_tmux(cfg: Config) -> None:
    if cfg.tmux_socket:
        TmuxServer(cfg.tmux_socket).shut_down()
