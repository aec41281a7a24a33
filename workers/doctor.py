"""``formulabeat doctor``: each thing a host needs, checked, with what to do.

Every check returns a line that is either ok with what was found, or what is
wrong and how to fix it; none of them changes anything.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable

import psutil
import redis

from workers import sentinel
from workers.agents import driver_for, driver_name
from workers.agents.base import Setup
from workers.checks import Check
from workers.config import Config, redact_url
from workers.environment import agent_env, login_shell, missing_pass_env, usable_shell
from workers.errors import FormulaError
from workers.formula import load_formula
from workers.statedir import runs_dir, runs_path
from workers.worktrees import repo_problem

# Beyond this, lease TTLs and timestamps from different hosts disagree.
MAX_CLOCK_SKEW_SECONDS = 2.0


def _version(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or proc.stderr.strip() or None


def check_tool(name: str, argv: list[str], package: str) -> Check:
    """A system tool on PATH, with its version."""
    if shutil.which(argv[0]) is None:
        return Check(name, False, f"not found on PATH: install it (apt-get install {package})")
    return Check(name, True, _version(argv) or "found")


def check_agents(cfg: Config) -> list[Check]:
    """Each agent's command is on its PATH, its pass_env is there, and its driver's checks."""
    checks = []
    root = runs_path(cfg.state_dir)
    for agent in cfg.agents:
        driver = driver_for(agent)
        env = agent_env(agent, credentials=driver.credentials)
        program = agent.argv()[0]
        found = shutil.which(program, path=env.get("PATH"))
        checks.append(
            Check(
                f"agent {agent.key}",
                found is not None,
                f"{program} → {found} ({driver_name(agent)})"
                if found
                else f"{program!r} not found on PATH (agents.command)",
            )
        )
        try:
            load_formula(agent.formula)
        except FormulaError as exc:
            checks.append(Check(f"agent {agent.key} formula", False, f"{exc} (agents.formula)"))
        missing = missing_pass_env(agent)
        if missing:
            checks.append(
                Check(
                    f"agent {agent.key} env",
                    False,
                    f"pass_env names {', '.join(missing)}, which this worker's environment "
                    "lacks: set them where the worker starts (its systemd unit, its shell)",
                )
            )
        if found:
            checks += driver.checks(agent, env, Setup(root, cfg.project(agent.project).repo_root))
    return checks


def check_repos(cfg: Config) -> list[Check]:
    """Each project's repository exists, is git, is writable, and git does not refuse it."""
    checks = []
    for project in cfg.projects:
        problem = repo_problem(project.repo_root)
        checks.append(
            Check(f"repo {project.name}", problem is None, problem or str(project.repo_root))
        )
    return checks


def check_shell() -> Check:
    """Agents start whatever this user's login shell; their tools need a shell that runs."""
    given = os.environ.get("SHELL") or login_shell()
    shell = usable_shell(given)
    if not os.access(shell, os.X_OK):
        return Check("shell", False, f"no shell to give agents ({shell}): install bash")
    if shell != given:
        return Check("shell", True, f"{given or 'no shell'} runs no commands: agents get {shell}")
    return Check("shell", True, shell)


def fix_agents(cfg: Config) -> list[str]:
    """Apply the setup each agent's driver may do for the user; what changed, a line each."""
    root = runs_dir(cfg.state_dir)
    done: list[str] = []
    for agent in cfg.agents:
        driver = driver_for(agent)
        env = agent_env(agent, credentials=driver.credentials)
        where = Setup(root, cfg.project(agent.project).repo_root)
        for line in driver.fix(agent, env, where):
            if line not in done:
                done.append(line)
    return done


def sentinel_check(url: str, master_name: str, sentinel_password: str | None) -> Check:
    """The master the Sentinels of ``url`` name, how many answered and agree, its replicas."""
    found = sentinel.survey(url, master_name, sentinel_password, timeout=5.0)
    master = found.master
    if master is None:
        why = "; ".join(found.problems) or "no Sentinel named a master"
        return Check("sentinel", False, f"master {master_name!r}: {why}")
    agree = found.masters[master]
    detail = (
        f"master {master_name!r} at {master[0]}:{master[1]}: {found.answered} of "
        f"{found.asked} Sentinels answered, {agree} agree; {found.replicas} replicas"
    )
    if len(found.masters) > 1:
        return Check("sentinel", False, f"{detail}; the Sentinels disagree: {found.masters}")
    return Check("sentinel", True, detail + "".join(f"; {p}" for p in found.problems))


def check_redis(url: str, client_factory: Callable[[], redis.Redis]) -> list[Check]:
    """Redis reachable, its version, and this host's clock against Redis's."""
    shown = redact_url(url)
    try:
        client = client_factory()
        info = client.info("server")
        before = time.time()
        seconds, micros = client.time()
        after = time.time()
    except redis.exceptions.AuthenticationError:
        return [Check("redis", False, f"{shown}: wrong password (fix the URL's password)")]
    except redis.exceptions.RedisError as exc:
        return [Check("redis", False, f"{shown}: unreachable ({exc}); is it running?")]
    skew = (seconds + micros / 1e6) - (before + after) / 2
    return [
        Check("redis", True, f"{shown}: Redis {info.get('redis_version', '?')}"),
        Check(
            "clock",
            abs(skew) <= MAX_CLOCK_SKEW_SECONDS,
            f"this host is {-skew:+.3f} s from Redis's clock"
            + (
                ""
                if abs(skew) <= MAX_CLOCK_SKEW_SECONDS
                else ": run NTP (chrony, systemd-timesyncd)"
            ),
        ),
    ]


def check_memory(cfg: Config) -> Check:
    """Available memory against the largest min_memory_mb of the agents."""
    available = psutil.virtual_memory().available // (1024 * 1024)
    needed = max((a.min_memory_mb for a in cfg.agents), default=0)
    return Check(
        "memory",
        available >= needed,
        f"{available} MB available, agents need up to {needed} MB"
        + ("" if available >= needed else ": runs will be skipped"),
    )


def check_state_dir(cfg: Config) -> Check:
    """The state dir exists (or can be made) and only its owner can enter it."""
    path = cfg.state_dir
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        writable = parent is not None and os.access(parent, os.W_OK)
        return Check(
            "state dir",
            writable,
            f"{path} will be created" if writable else f"{path} cannot be created: no write access",
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("state dir", False, f"{path} has mode {mode:o}: run chmod 700 {path}")
    return Check("state dir", True, f"{path} (mode {mode:o})")


def run_checks(
    cfg: Config, url: str | None, client_factory: Callable[[], redis.Redis]
) -> list[Check]:
    """Every check for this host and config."""
    checks = [
        check_tool("tmux", ["tmux", "-V"], "tmux"),
        check_tool("git", ["git", "--version"], "git"),
        check_shell(),
        *check_repos(cfg),
        *check_agents(cfg),
    ]
    if url is None:
        checks.append(
            Check("redis", False, "no [broker] url and no embedded Redis: run `formulabeat up`")
        )
    else:
        checks += check_redis(url, client_factory)
    checks += [check_memory(cfg), check_state_dir(cfg)]
    return checks
