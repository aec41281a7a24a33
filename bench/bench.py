"""``make bench``: formulabeat's speed and cost on this machine, scripted agent and real CLI.

One host: a private Redis, one worker (the production defaults), tmux on a
private socket. Latencies run from the agent's own clock (the scripted agent
logs when it wrote a phase and when the prompt arrived) to this process,
which follows the result backend's own publications (``celery-task-meta-*``).

1. start: runs sent one after another to an agent that is ready at once;
   from the send to the prompt's arrival in the agent;
2. fleet: ``--sessions`` agents started together and left idle; how many are
   live at once, the CPU the worker and the tmux server spend on them per
   session per minute while idle, then each writes a phase at a random
   moment, from the write to its publication;
3. throughput: agents that finish at once, as many runs as they take in
   ``--throughput-seconds``;
4. the real Claude Code CLI (the pinned one ``make claude-cli`` installs)
   against the tests' Messages API stand-in: the CLI's own start → input box,
   and beside it run sent → prompt confirmed (RUNNING published); the idle
   cost of ``--real-sessions`` CLIs at their input box, theirs and
   formulabeat's; and phase write → result backend among as many live CLIs.

It prints a table and writes bench/results.json. ``--sentinel`` runs the fleet
series alone, twice: on a plain Redis URL and through a Sentinel group (a
master, two replicas, three Sentinels: tests/sentinels.py), and prints both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.agent_clis import bench_agent_cli
from tasks.app import client_app
from tasks.demo import commit_all
from tasks.stack import Stack
from tests.messages_api import MessagesAPI
from tests.real_cli import BYPASS, INSTALLED, cli_env, run_by_hand_once
from tests.sentinels import MASTER_NAME, SentinelLab
from workers import registry
from workers.agents.claude_code import edit_json, input_box, trust
from workers.config import load_config
from workers.embedded import EmbeddedRedis, start_redis, stop_redis
from workers.run import FINAL_STATES
from workers.tmux import TmuxServer, screen_tail

RESULTS = Path(__file__).with_name("results.json")
START_TIMEOUT = 900.0
AGENT = f"{sys.executable} -m workers.scripted_agent --dangerously-skip-permissions"
SCRIPTED = f'command = "{AGENT}"\ndriver = "scripted"\n'


class Observer:
    """Follows the result backend's publications: (run id, state) -> first time seen."""

    def __init__(self, client: redis.Redis) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self._client = client  # its pool must live as long as the subscription
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("celery-task-meta-*")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.5)
            if message is None:
                continue
            at = time.time()
            try:
                meta = json.loads(message["data"])
            except (TypeError, ValueError):
                continue
            key = (str(meta.get("task_id")), str(meta.get("status")))
            self.seen.setdefault(key, at)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


def _formula(name: str, scenario: str) -> str:
    return (
        f'name = "{name}"\n\n[[steps]]\nid = "work"\ntitle = "Work"\n'
        f'description = """\nSCENARIO: {scenario}\n"""\n'
    )


MONITOR: dict[str, float] = {}  # [monitor] settings from the command line


def _config(
    root: Path, url: str, agents: dict[str, str], sessions: int, how: str, broker: str = ""
) -> Path:
    blocks = "".join(
        f'[[agents]]\nname = "{name}"\nproject = "bench"\n'
        f'formula = "project/formulas/{name}.toml"\nschedule = "0 0 1 1 *"\n'
        f"{how}min_memory_mb = 0\n\n"
        for name in agents
    )
    path = root / "formulabeat.toml"
    path.write_text(
        f'state_dir = "state"\n[broker]\nurl = "{url}"\n{broker}'
        f'[worker]\nhost = "bench"\n'
        f'[tmux]\nsocket = "fbbench-{os.getpid()}"\n'
        "[metrics]\nport = 0\n"
        "[monitor]\n"
        + "".join(f"{k} = {v}\n" for k, v in MONITOR.items())
        + f"[credentials.default]\nmax_sessions = {sessions + 10}\n"
        '[[projects]]\nname = "bench"\nrepo_root = "project"\n\n' + blocks
    )
    return path


@contextmanager
def bench_host(
    root: Path, agents: dict[str, str], sessions: int, how: str = SCRIPTED, sentinel: bool = False
) -> Iterator[tuple[Any, Any]]:
    """A private Redis (``sentinel``: a Sentinel group) and one worker for ``agents``
    (name → scenario), run as ``how`` says."""
    files = {f"formulas/{name}.toml": _formula(name, s) for name, s in agents.items()}
    commit_all(root / "project", {"README.md": "# bench\n", **files}, "bench")
    server: EmbeddedRedis | _Group
    if sentinel:
        server = _Group(SentinelLab(root / "sentinels"))
        server.lab.start()
        path = _config(root, server.url, agents, sessions, how, f'master_name = "{MASTER_NAME}"\n')
    else:
        server = start_redis(root / "redis")
        path = _config(root, server.url, agents, sessions, how)
    cfg = load_config(path)
    stack = Stack(cfg, flower=False, beat=False, log_dir=root / "logs")
    try:
        stack.start()
        yield stack, server
    finally:
        stack.stop()
        TmuxServer(cfg.tmux_socket).shut_down()
        if isinstance(server, _Group):
            server.lab.stop()
        else:
            stop_redis(server)


class _Group:
    """A Sentinel group where the series take an EmbeddedRedis: its URL, its master's client."""

    def __init__(self, lab: SentinelLab) -> None:
        self.lab = lab

    @property
    def url(self) -> str:
        return self.lab.url

    def client(self) -> redis.Redis:
        return self.lab.master()


def _events(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def send_run(app: Any, agent: str) -> str:
    """Send a run; its result is read from Redis, not through Celery's subscriber."""
    result = app.send_task(
        "formulabeat.run", args=["bench", agent], queue="formulabeat", ignore_result=True
    )
    return str(result.id)


def run_ended(client: redis.Redis, run_id: str) -> bool:
    """Whether the run's result is stored in a final state."""
    raw = client.get(f"celery-task-meta-{run_id}")
    return bool(raw) and json.loads(raw).get("status") in FINAL_STATES


def _over(observer: Observer, run_id: str) -> bool:
    return any((run_id, state) in observer.seen for state in FINAL_STATES)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def wait_for(predicate: Any, timeout: float) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def bench_start(root: Path, runs: int) -> dict[str, float]:
    """Send → prompt delivered, one run at a time, agent ready at once."""
    log = root / "agent.jsonl"
    with bench_host(root, {"starter": f"log={log} phase=done"}, 1) as (stack, _server):
        app = client_app(stack.cfg)
        sent: dict[str, float] = {}
        for _ in range(runs):
            at = time.time()
            result = app.send_task(
                "formulabeat.run", args=["bench", "starter"], queue="formulabeat"
            )
            sent[result.id] = at
            wait_for(result.ready, 120)
        prompts = {e["run"]: e["at"] for e in _events(log) if e["event"] == "prompt"}
    latencies = [(prompts[r] - t) * 1000 for r, t in sent.items() if r in prompts]
    return {
        "start_latency_ms_p50": round(statistics.median(latencies), 1),
        "start_latency_ms_p99": round(_pct(latencies, 0.99), 1),
        "start_runs": len(latencies),
    }


def tmux_server_process(socket: str) -> psutil.Process | None:
    """The process of the tmux server on ``socket`` (None when none runs)."""
    out = subprocess.run(
        ["tmux", "-L", socket, "display-message", "-p", "#{pid}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return psutil.Process(int(out.stdout.strip())) if out.returncode == 0 else None


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User and system CPU seconds the processes have used."""
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def bench_fleet(
    root: Path, sessions: int, idle: float, spread: float, sentinel: bool = False
) -> dict[str, Any]:
    """Many live sessions: concurrency, idle cost, then phase latency."""
    log = root / "agents.jsonl"
    go = root / "go"
    # Every agent writes its first phase and waits for the signal; the idle
    # cost is measured while all wait. Then each writes a phase at its own
    # moment within `spread` s and stays until the window is over, so that
    # every write happens among all the sessions.
    offsets = [spread * (i * 7919 % sessions) / sessions for i in range(sessions)]
    agents = {
        f"a{i:03d}": (
            f"log={log} phase=awaiting_ci wait={go} sleep={offset:.2f}"
            f" phase=working sleep={spread - offset + 5:.2f} phase=done"
        )
        for i, offset in enumerate(offsets)
    }
    with bench_host(root, agents, sessions, sentinel=sentinel) as (stack, server):
        cfg = stack.cfg
        app = client_app(cfg)
        observer = Observer(server.client())
        client = server.client()
        started = time.monotonic()
        ids = {send_run(app, name) for name in agents}

        def live() -> int:
            return sum(1 for i in ids if (i, "AWAITING_CI") in observer.seen)

        # A run that failed to start ends: wait for each to be live or over.
        wait_for(
            lambda: all((i, "AWAITING_CI") in observer.seen or run_ended(client, i) for i in ids),
            START_TIMEOUT,
        )
        concurrent = live()
        up_after = time.monotonic() - started
        worker = psutil.Process(next(p.pid for n, p in stack.procs if n == "worker"))
        tmux = tmux_server_process(cfg.tmux_socket or "")
        procs = [p for p in (worker, tmux) if p is not None]
        time.sleep(5)  # the last starts settle
        before, t0 = cpu_seconds(procs), time.monotonic()
        worker_before = cpu_seconds([worker])
        time.sleep(idle)
        cpu = cpu_seconds(procs) - before
        worker_cpu = cpu_seconds([worker]) - worker_before
        elapsed = time.monotonic() - t0
        go.touch()
        wait_for(lambda: all(_over(observer, i) for i in ids), spread + 120)
        observer.close()
        outcomes: dict[str, int] = {}
        for run_id in ids:
            raw = client.get(f"formulabeat:run:{run_id}")
            outcome = str(json.loads(raw).get("outcome")) if raw else "none"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    written = {
        (e["run"], e["phase"].split(":", 1)[1].upper()): e["at"]
        for e in _events(log)
        if e["event"] == "phase"
    }
    latencies = [
        (observer.seen[key] - at) * 1000
        for key, at in written.items()
        if key[1] == "WORKING" and key in observer.seen
    ]
    return {
        "phase_latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "phase_latency_ms_p99": round(_pct(latencies, 0.99), 1) if latencies else None,
        "phase_sessions": concurrent,
        "phase_samples": len(latencies),
        "idle_cpu_s_per_session_min": round(cpu / concurrent / (elapsed / 60), 5)
        if concurrent
        else None,
        "idle_sessions": concurrent,
        "idle_worker_cpu_s_per_session_min": round(worker_cpu / concurrent / (elapsed / 60), 5)
        if concurrent
        else None,
        "idle_window_s": round(elapsed, 1),
        "max_concurrent_sessions": concurrent,
        "sessions_up_after_s": round(up_after, 1),
        "fleet_outcomes": outcomes,
    }


def bench_throughput(root: Path, agents_count: int, seconds: float) -> dict[str, float]:
    """Runs per minute with agents that finish at once."""
    agents = {f"t{i:02d}": "phase=done" for i in range(agents_count)}
    with bench_host(root, agents, agents_count) as (stack, server):
        app = client_app(stack.cfg)
        client = server.client()
        busy: dict[str, str] = {}
        done = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            for name in agents:
                run_id = busy.get(name)
                if run_id is not None and run_ended(client, run_id):
                    done += 1
                    del busy[name]
                if name not in busy:
                    busy[name] = send_run(app, name)
            time.sleep(0.02)
        elapsed = time.monotonic() - started
    return {"runs_per_min": round(done / elapsed * 60, 1), "throughput_agents": agents_count}


def bench_usage(root: Path, sessions: int, seconds: float) -> dict[str, Any]:
    """The watcher's CPU while every session's transcript grows a line a second."""
    agents = {
        f"u{i:03d}": f"phase=awaiting_ci chatter={seconds + 60:.0f} phase=done"
        for i in range(sessions)
    }
    with bench_host(root, agents, sessions) as (stack, server):
        ids, observer = _start_all(stack, server, agents, "AWAITING_CI")
        live = sum(1 for i in ids if (i, "AWAITING_CI") in observer.seen)
        worker = psutil.Process(next(p.pid for n, p in stack.procs if n == "worker"))
        time.sleep(5)
        before, t0 = cpu_seconds([worker]), time.monotonic()
        time.sleep(seconds)
        cpu = cpu_seconds([worker]) - before
        minutes = (time.monotonic() - t0) / 60
        client = server.client()
        counted = 0
        for run_id in ids:
            raw = client.get(f"celery-task-meta-{run_id}")
            info = json.loads(raw).get("result") if raw else None
            if isinstance(info, dict) and info.get("usage"):
                counted += 1
        for run_id in ids:
            registry.request_cancel(client, run_id, "the benchmark")
        wait_for(lambda: all(run_ended(client, i) for i in ids), 120)
        observer.close()
    return {
        "usage_cpu_s_per_session_min": round(cpu / live / minutes, 5) if live else None,
        "usage_sessions": live,
        "usage_sessions_counting": counted,
    }


def _real_how(binary: Path, home: Path, api: MessagesAPI) -> str:
    env = ", ".join(f'{k} = "{v}"' for k, v in cli_env(home, api.url).items())
    return f'command = "{binary} {BYPASS}"\ndriver = "claude-code"\nenv = {{ {env} }}\n'


def _cli_ready_ms(
    binary: Path, home: Path, api: MessagesAPI, socket: str, runs: int, root: Path
) -> list[float]:
    """The CLI alone: tmux new-session → its input box drawn (no formulabeat).

    As in a run, each CLI starts in a git worktree it has never seen, under
    a trusted root.
    """
    repo = root / "ready-repo"
    commit_all(repo, {"README.md": "# ready\n"}, "ready")
    trusted = root / "ready-worktrees"
    trusted.mkdir()
    env = {**cli_env(home, api.url), "PATH": os.environ["PATH"]}
    edit_json(home / ".claude.json", lambda data: trust(data, trusted))
    words = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), str(binary), BYPASS]
    tmux = ["tmux", "-L", socket]
    new = [*tmux, "new-session", "-d", "-x", "200", "-y", "50"]
    # The server lives on between the CLIs (one whose last session ended exits).
    subprocess.run([*new, "-s", "keep", "sleep", "3600"], check=True, timeout=30)
    times = []
    for index in range(runs):
        name = f"ready{index}"
        worktree = trusted / name
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--detach", str(worktree), "HEAD"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        started = time.time()
        subprocess.run([*new, "-s", name, "-c", str(worktree), *words], check=True, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", name],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            if input_box(screen.splitlines()) is not None:
                times.append((time.time() - started) * 1000)
                break
            time.sleep(0.01)
        else:
            print(f"the CLI showed no input box within 60 s: {screen_tail(screen)}")
        subprocess.run([*tmux, "kill-session", "-t", name], timeout=30, check=False)
    return times


def _cli_cpu(socket: str) -> float:
    """CPU seconds of every process in the panes of a tmux server (the CLIs)."""
    out = subprocess.run(
        ["tmux", "-L", socket, "list-panes", "-a", "-F", "#{pane_pid}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.split()
    total = 0.0
    for pid in out:
        try:
            root = psutil.Process(int(pid))
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
    return total


def bench_real(root: Path, sessions: int, runs: int, idle: float, spread: float) -> dict[str, Any]:
    """The real Claude Code CLI: start overhead, idle cost, phase latency."""
    binary = INSTALLED
    if not binary.exists():
        print(f"no Claude Code CLI at {binary} (make claude-cli): real-CLI series skipped")
        return {"real_cli_version": None}
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout.split()[0]
    results: dict[str, Any] = {"real_cli_version": version}
    with MessagesAPI() as api:
        home = root / "home"
        socket = f"fbbench-real-{os.getpid()}"
        try:
            run_by_hand_once(binary, home, api.url, socket)
            ready = _cli_ready_ms(binary, home, api, socket, runs, root)
        finally:
            TmuxServer(socket).shut_down()
        how = _real_how(binary, home, api)
        results["real_cli_ready_ms_p50"] = round(statistics.median(ready), 1)
        results["real_cli_ready_ms_p99"] = round(_pct(ready, 0.99), 1)
        with bench_host(root / "start", {"starter": "phase=done"}, 1, how) as (stack, server):
            app = client_app(stack.cfg)
            observer = Observer(server.client())
            client = server.client()
            sent = {}
            for _ in range(runs):
                at = time.time()
                run_id = send_run(app, "starter")
                sent[run_id] = at
                wait_for(lambda run_id=run_id: run_ended(client, run_id), 120)
            observer.close()
        starts = [
            (observer.seen[(r, "RUNNING")] - t) * 1000
            for r, t in sent.items()
            if (r, "RUNNING") in observer.seen
        ]
        results["real_start_ms_p50"] = round(statistics.median(starts), 1)
        results["real_start_ms_p99"] = round(_pct(starts, 0.99), 1)
        results["real_start_runs"] = len(starts)
        results["real_start_overhead_ms_p50"] = round(
            results["real_start_ms_p50"] - results["real_cli_ready_ms_p50"], 1
        )
        results.update(_real_idle(root / "idle", how, sessions, idle))
        results.update(_real_phases(root / "phases", how, sessions, spread))
    return results


def _start_all(
    stack: Any, server: Any, agents: dict[str, str], state: str
) -> tuple[set[str], Observer]:
    app = client_app(stack.cfg)
    observer = Observer(server.client())
    client = server.client()
    ids = {send_run(app, name) for name in agents}
    wait_for(
        lambda: all((i, state) in observer.seen or run_ended(client, i) for i in ids), START_TIMEOUT
    )
    return ids, observer


def _real_idle(root: Path, how: str, sessions: int, idle: float) -> dict[str, Any]:
    """CLIs at their input box after a phase: their CPU, and the worker's and tmux's."""
    agents = {f"i{i:02d}": "phase=awaiting_ci idle" for i in range(sessions)}
    with bench_host(root, agents, sessions, how + f"idle_timeout = {idle + 600}\n") as (
        stack,
        server,
    ):
        ids, observer = _start_all(stack, server, agents, "AWAITING_CI")
        live = sum(1 for i in ids if (i, "AWAITING_CI") in observer.seen)
        socket = stack.cfg.tmux_socket or ""
        worker = psutil.Process(next(p.pid for n, p in stack.procs if n == "worker"))
        tmux = tmux_server_process(socket)
        ours = [p for p in (worker, tmux) if p is not None]
        time.sleep(10)  # the Stop hooks and the last starts settle
        cli_before, ours_before, t0 = _cli_cpu(socket), cpu_seconds(ours), time.monotonic()
        time.sleep(idle)
        minutes = (time.monotonic() - t0) / 60
        cli = (_cli_cpu(socket) - cli_before) / live / minutes
        formulabeat = (cpu_seconds(ours) - ours_before) / live / minutes
        rss = 0
        for pid in subprocess.run(
            ["tmux", "-L", socket, "list-panes", "-a", "-F", "#{pane_pid}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.split():
            with contextlib.suppress(psutil.Error):
                rss += sum(
                    p.memory_info().rss for p in psutil.Process(int(pid)).children(recursive=True)
                )
        client = server.client()
        for run_id in ids:
            registry.request_cancel(client, run_id, "the benchmark")
        wait_for(lambda: all(run_ended(client, i) for i in ids), 120)
        observer.close()
    return {
        "real_idle_sessions": live,
        "real_cli_idle_cpu_s_per_session_min": round(cli, 4),
        "real_formulabeat_idle_cpu_s_per_session_min": round(formulabeat, 5),
        "real_cli_rss_mib_per_session": round(rss / live / 2**20, 1) if live else None,
    }


def _real_phases(root: Path, how: str, sessions: int, spread: float) -> dict[str, Any]:
    """Phase write → result backend while ``sessions`` real CLIs live."""
    stamps = root / "stamps.log"
    go = root / "go"
    offsets = [spread * (i * 7919 % sessions) / sessions for i in range(sessions)]
    # The CLIs wait for the signal in a tool call polling once a second (a
    # faster poll would load the machine as no agent at work does), then
    # each writes its phase at its own moment.
    agents = {
        f"p{i:02d}": f"stamp={stamps} phase=awaiting_ci waitfor={go} sleep={offset:.2f} "
        f"phase=working sleep={spread - offset + 5:.2f} phase=done"
        for i, offset in enumerate(offsets)
    }
    root.mkdir(parents=True, exist_ok=True)
    with bench_host(root, agents, sessions, how) as (stack, server):
        ids, observer = _start_all(stack, server, agents, "AWAITING_CI")
        live = sum(1 for i in ids if (i, "AWAITING_CI") in observer.seen)
        go.touch()
        wait_for(lambda: all(_over(observer, i) for i in ids), spread + 180)
        observer.close()
        client = server.client()
        by_phase_file = {}
        for run_id in ids:
            raw = client.get(f"formulabeat:run:{run_id}")
            snapshot = json.loads(raw) if raw else {}
            worktree = snapshot.get("worktree")
            if worktree:
                by_phase_file[str(Path(worktree).parent / "phase")] = run_id
    latencies = []
    for line in stamps.read_text().splitlines() if stamps.exists() else []:
        phase_file, phase, at = line.split()
        run_id = by_phase_file.get(phase_file.strip("'"))
        if phase == "working" and run_id and (run_id, "WORKING") in observer.seen:
            latencies.append((observer.seen[(run_id, "WORKING")] - float(at)) * 1000)
    return {
        "real_phase_latencies_ms": sorted(round(x, 1) for x in latencies),
        "real_sessions": live,
        "real_phase_latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "real_phase_latency_ms_p99": round(_pct(latencies, 0.99), 1) if latencies else None,
        "real_phase_samples": len(latencies),
    }


def where_and_when(redis_version: str | None = None) -> dict[str, Any]:
    """The machine, the versions measured and the date, for a results file."""
    return {
        "machine": {
            "cores": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            "python": platform.python_version(),
            "tmux": subprocess.run(
                ["tmux", "-V"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip(),
            **({"redis_server": redis_version} if redis_version else {}),
            **{
                name: metadata.version(name)
                for name in ("formulabeat", "celery", "redis", "libtmux")
            },
        },
        "date": time.strftime("%Y-%m-%d"),
    }


def _plain_and_sentinel(args: argparse.Namespace) -> int:
    """The fleet series on a plain URL, then through a Sentinel group; both printed."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="formulabeat-bench-") as tmp:
        for how in ("plain", "sentinel"):
            figures = bench_fleet(
                Path(tmp) / how, args.sessions, args.idle, args.spread, how == "sentinel"
            )
            results[how] = figures
            print(
                f"{how}: phase write → result backend p50 / p99 "
                f"{figures['phase_latency_ms_p50']} / {figures['phase_latency_ms_p99']} ms "
                f"({figures['phase_sessions']} live sessions, outcomes {figures['fleet_outcomes']})"
            )
    results.update(where_and_when())
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print the table and write bench/results.json."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement")
    parser.add_argument("--spread", type=float, default=60.0, help="window of the phase writes")
    parser.add_argument("--start-runs", type=int, default=30)
    parser.add_argument("--throughput-agents", type=int, default=16)
    parser.add_argument("--throughput-seconds", type=float, default=60.0)
    parser.add_argument("--usage-sessions", type=int, default=100)
    parser.add_argument("--real-sessions", type=int, default=20)
    parser.add_argument("--real-runs", type=int, default=15)
    parser.add_argument("--real-idle", type=float, default=60.0)
    parser.add_argument("--real-spread", type=float, default=30.0)
    parser.add_argument("--no-real", action="store_true", help="skip the real-CLI series")
    parser.add_argument("--agent-sessions", type=int, default=5, help="idle Codex/Gemini CLIs")
    parser.add_argument("--agent-runs", type=int, default=8, help="Codex/Gemini runs sent")
    parser.add_argument("--agent-idle", type=float, default=30.0)
    parser.add_argument(
        "--only-agents", action="store_true", help="only the Codex and Gemini CLI series"
    )
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="only the fleet series, on a plain Redis URL and through a Sentinel group",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--monitor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [monitor] setting for the bench's worker (default: formulabeat's defaults)",
    )
    args = parser.parse_args(argv)
    for setting in args.monitor:
        key, _, value = setting.partition("=")
        MONITOR[key] = float(value)
    results: dict[str, Any] = {}
    if args.sentinel:
        return _plain_and_sentinel(args)
    with tempfile.TemporaryDirectory(prefix="formulabeat-bench-") as tmp:
        root = Path(tmp)
        if not args.only_agents:
            results.update(bench_start(root / "start", args.start_runs))
            results.update(
                bench_throughput(
                    root / "throughput", args.throughput_agents, args.throughput_seconds
                )
            )
            results.update(bench_fleet(root / "fleet", args.sessions, args.idle, args.spread))
            results.update(bench_usage(root / "usage", args.usage_sessions, args.idle))
        for name in ("codex", "gemini") if not args.no_real else ():
            results.update(
                bench_agent_cli(
                    name,
                    root / name,
                    args.agent_sessions,
                    args.agent_runs,
                    args.agent_idle,
                    sys.modules[__name__],
                )
            )
        if not args.no_real and not args.only_agents:
            results.update(
                bench_real(
                    root / "real",
                    args.real_sessions,
                    args.real_runs,
                    args.real_idle,
                    args.real_spread,
                )
            )
    results.update(where_and_when())
    results["monitor_settings"] = MONITOR or "defaults"
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    rows = (
        []
        if args.only_agents
        else [
            (
                "phase write → result backend, p50 / p99 (ms)",
                f"{results['phase_latency_ms_p50']} / {results['phase_latency_ms_p99']}"
                f" ({results['phase_sessions']} live sessions)",
                "5030 median",
            ),
            (
                "send → prompt delivered, p50 / p99 (ms)",
                f"{results['start_latency_ms_p50']} / {results['start_latency_ms_p99']}",
                "1699 median",
            ),
            (
                "idle CPU-s per session per minute",
                f"{results['idle_cpu_s_per_session_min']} ({results['idle_sessions']} sessions)",
                "0.087 (10 s poll)",
            ),
            ("concurrent sessions", str(results["max_concurrent_sessions"]), "one bash loop each"),
            ("runs per minute (agent done at once)", str(results["runs_per_min"]), "-"),
            (
                "watcher CPU-s / session / min, transcripts growing 1 line/s",
                f"{results['usage_cpu_s_per_session_min']} ({results['usage_sessions']} sessions)",
                "-",
            ),
        ]
    )
    if results.get("real_cli_version"):
        rows += [
            (
                f"real CLI {results['real_cli_version']}: its own start → input box, p50 (ms)",
                str(results["real_cli_ready_ms_p50"]),
                "-",
            ),
            (
                "real CLI: send → prompt confirmed, p50 / p99 (ms)",
                f"{results['real_start_ms_p50']} / {results['real_start_ms_p99']}"
                f" (overhead p50 {results['real_start_overhead_ms_p50']})",
                "-",
            ),
            (
                "real CLI: phase write → result backend, p99 (ms)",
                f"{results['real_phase_latency_ms_p99']} ({results['real_sessions']} live CLIs)",
                "5030 median",
            ),
            (
                "real CLI idle CPU-s / session / min: the CLI's, formulabeat's",
                f"{results['real_cli_idle_cpu_s_per_session_min']}, "
                f"{results['real_formulabeat_idle_cpu_s_per_session_min']}",
                "-",
            ),
        ]
    for name in ("codex", "gemini"):
        if results.get(f"{name}_version"):
            rows += [
                (
                    f"{name} {results[f'{name}_version']}: its own start → ready, p50 (ms)",
                    str(results.get(f"{name}_own_start_ms_p50")),
                    "-",
                ),
                (
                    f"{name}: send → prompt confirmed, p50 / p99 (ms)",
                    f"{results.get(f'{name}_start_ms_p50')} / {results.get(f'{name}_start_ms_p99')}"
                    f" (overhead p50 {results.get(f'{name}_start_overhead_ms_p50')})",
                    "-",
                ),
                (
                    f"{name} idle CPU-s / session / min: the CLI's, formulabeat's; RSS MiB",
                    f"{results.get(f'{name}_cli_idle_cpu_s_per_session_min')}, "
                    f"{results.get(f'{name}_formulabeat_idle_cpu_s_per_session_min')}; "
                    f"{results.get(f'{name}_cli_rss_mib_per_session')}",
                    "-",
                ),
            ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  formulabeat  |  original")
    for name, ours, theirs in rows:
        print(f"{name:<{width}}  {ours}  |  {theirs}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
