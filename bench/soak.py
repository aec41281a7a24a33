"""``make soak``: what one host's formulabeat holds after hours of runs ending and starting.

One host as ``make bench`` starts it (a private Redis, one worker with the
production defaults, tmux on a private socket) and ``--sessions`` scripted
agents, one run each live at a time. Every run ends after a random while,
``--min-life`` to ``--max-life`` seconds after it was sent: mostly its agent
is told to finish (``PHASE:done``), a share is cancelled; a new run of the
agent is sent the moment one has ended. Some agents crash once per run (and
are recovered), some write transcripts (their tokens counted).

Every ``--sample`` seconds it records the worker's RSS and open file
descriptors, the tmux server's RSS, Redis ``used_memory`` (and what of it
the runs' results and records, kept 7 days by design, do not explain), and
the CPU per minute of the worker and of its watcher thread. After the
warm-up it fits each series a least-squares line and prints its slope per
hour; a slope beyond the series' tolerance (see TOLERANCES) fails the soak.
At the end every run is ended and nothing may be left: no lease, slot, tmux
session, live run, run directory or worktree, and every run sent has its
result. Writes bench/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.bench import (
    bench_host,
    cpu_seconds,
    run_ended,
    send_run,
    tmux_server_process,
    wait_for,
    where_and_when,
)
from tasks.app import client_app
from tests.conftest import held_claims, tmux_sessions
from workers import registry
from workers.run import FINAL_STATES

OUTPUT = Path(__file__).with_name("soak.json")
HOST = "bench"  # bench.bench's host name
# Per run, kept for 7 days by design (result_expires, the registry's TTL): a
# soak's Redis grows by these with every run, and that is not a leak.
KEPT_PER_RUN = (
    "celery-task-meta-",
    "formulabeat:run:",
    "formulabeat:claimed:",
    "formulabeat:cancel:",
    "formulabeat:sent:",
    "formulabeat:usage-applied:",
)
RUN_INDEX = "formulabeat:runs"  # a sorted set with one member per run, kept as long

# The largest growth per hour each checked series may show, and why:
# - RSS: a leak of 1 KiB per run is 5 to 10 MiB an hour at this churn
#   (5000-8000 runs an hour); the allocator's own settling stays well below.
# - fds: any steady growth is a leak (one a run would be thousands an hour);
#   each sample is the floor of a minute's reads (see FdFloor), so a
#   subprocess's pipes in flight do not count.
# - Redis beyond the kept records: everything else is live state (about one
#   set of keys per live run) or bounded; 1 MiB an hour is 150 bytes a run.
# - watcher CPU per run ended: with as many sessions live, the watcher's work
#   for each run (its phases, hooks, end, its share of the sweeps) is the
#   same at the end as after the warm-up; a watch never dropped would add to
#   every sweep. Per run, because the runs a minute follow the machine's
#   other load; a fifth of its level an hour leaves room for that noise.
TOLERANCES: dict[str, tuple[float, str]] = {
    "worker_rss_mib": (5.0, "MiB/h"),
    "worker_fds": (1.0, "fds/h"),
    "tmux_rss_mib": (5.0, "MiB/h"),
    "redis_unkept_mib": (1.0, "MiB/h"),
}
WATCHER_CPU_SHARE = 0.2  # of its mean, per hour
# Reported with their slopes, not checked: they grow with the runs by design
# or follow the load of the machine.
REPORTED = (
    "redis_used_memory_mib",
    "redis_kept_mib",
    "worker_cpu_s_per_min",
    "watcher_cpu_s_per_min",
    "live_sessions",
    "runs_per_min",
)
WATCHER_LINE = re.compile(r"watcher thread (\d+) follows")


@dataclass
class Agent:
    """One soak agent and its current run."""

    name: str
    release: Path  # its agent finishes its run once this file exists
    run_id: str | None = None
    due: float = 0.0  # when the current run is to end
    cancel: bool = False  # to end by a cancel request, not by its agent
    told: bool = False  # told to end (released, or its cancel requested)
    cancel_requested: bool = False


@dataclass
class Tally:
    """Runs sent and how they ended."""

    sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ended(self) -> int:
        return sum(self.outcomes.values())


def scenarios(root: Path, sessions: int) -> dict[str, str]:
    """Each agent's scenario: live (a phase), then waiting for its release file."""
    agents = {}
    for i in range(sessions):
        name = f"s{i:03d}"
        wait = f"phase=awaiting_ci wait={root / 'release' / name} phase=done"
        if i % 20 == 7:
            # Its first session dies once at work; the recovered one goes on.
            wait = f"phase=awaiting_ci crash_once {wait}"
        elif i % 10 == 3:
            wait = f"phase=awaiting_ci chatter=20 {wait}"  # a transcript, its tokens counted
        agents[name] = wait
    return agents


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return None
    ts = [t / 3600 for t, _ in points]
    vs = [v for _, v in points]
    mean_t, mean_v = statistics.fmean(ts), statistics.fmean(vs)
    var = sum((t - mean_t) ** 2 for t in ts)
    if var == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in zip(ts, vs, strict=True)) / var


def redis_memory(client: redis.Redis) -> dict[str, float]:
    """Redis's dataset, and the part of it the runs' kept records take, in MiB."""
    info = client.info("memory")
    kept_bytes = 0
    keys = 0
    batch: list[str] = []

    def measure() -> int:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        total = sum(size or 0 for size in pipe.execute())
        batch.clear()
        return total

    for key in client.scan_iter(count=1000):
        keys += 1
        name = key.decode() if isinstance(key, bytes) else key
        if name.startswith(KEPT_PER_RUN) or name == RUN_INDEX:
            batch.append(name)
            if len(batch) >= 1000:
                kept_bytes += measure()
    kept_bytes += measure()
    dataset = float(info["used_memory_dataset"])
    return {
        "redis_used_memory_mib": info["used_memory"] / 2**20,
        "redis_kept_mib": kept_bytes / 2**20,
        "redis_unkept_mib": (dataset - kept_bytes) / 2**20,
        "redis_keys": keys,
    }


def fd_kinds(pid: int) -> dict[str, int]:
    """A process's open fds by kind: socket, pipe, anon_inode (inotify, eventfd), file."""
    kinds: dict[str, int] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":", 1)[0]
        kind = kind if kind in ("socket", "pipe", "anon_inode") else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


class FdFloor:
    """The fewest open fds of a process seen since the last sample.

    Read every second: at any one moment a few of the worker's threads run
    a subprocess (git, tmux, a hook's pipes) whose fds come and go; the
    floor over a minute is what the process holds for good.
    """

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.least: int | None = None
        self.kinds: dict[str, int] = {}

    def read(self) -> None:
        count = self.proc.num_fds()
        if self.least is None or count < self.least:
            self.least = count
            self.kinds = fd_kinds(self.proc.pid)

    def take(self) -> tuple[int | None, dict[str, int]]:
        """The floor and its kinds since the last take; starts a new window."""
        least, kinds = self.least, self.kinds
        self.least, self.kinds = None, {}
        return least, kinds


def thread_cpu(proc: psutil.Process, thread_id: int | None) -> float | None:
    """CPU seconds of one thread of ``proc`` (None when it is not found)."""
    for thread in proc.threads():
        if thread.id == thread_id:
            return float(thread.user_time + thread.system_time)
    return None


def watcher_thread(log: Path) -> int | None:
    """The native id of the worker's watcher thread, from its log line."""
    found = WATCHER_LINE.search(log.read_text(errors="replace")) if log.exists() else None
    return int(found.group(1)) if found else None


class Soak:
    """The soak's state: its agents, what they ran, and the samples taken."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        (root / "release").mkdir(parents=True)
        self.agents = [
            Agent(name, root / "release" / name) for name in scenarios(root, args.sessions)
        ]
        self.tally = Tally()
        self.samples: list[dict[str, Any]] = []
        self.sent_ids: set[str] = set()

    def launch(self, app: Any, agent: Agent) -> None:
        """Send the agent's next run, with its own random life."""
        agent.release.unlink(missing_ok=True)
        agent.run_id = send_run(app, agent.name)
        self.sent_ids.add(agent.run_id)
        self.tally.sent += 1
        agent.due = time.monotonic() + self.rng.uniform(self.args.min_life, self.args.max_life)
        agent.cancel = self.rng.random() < self.args.cancel_share
        agent.told = agent.cancel_requested = False

    def end_due(self, client: redis.Redis, now: float) -> None:
        """Tell the runs whose time has come to end."""
        for agent in self.agents:
            if agent.run_id is None or agent.told or agent.due > now:
                continue
            if agent.cancel:
                registry.request_cancel(client, agent.run_id, "the soak")
                agent.cancel_requested = True
            else:
                agent.release.touch()
            agent.told = True

    def release_all(self) -> None:
        """Tell every agent to finish its run (the soak's end)."""
        for agent in self.agents:
            agent.release.touch()
            agent.told = True

    def collect(self, client: redis.Redis) -> list[Agent]:
        """The agents whose run has ended (its outcome counted)."""
        live = [a for a in self.agents if a.run_id is not None]
        if not live:
            return []
        metas = client.mget([f"celery-task-meta-{a.run_id}" for a in live])
        done = []
        for agent, raw in zip(live, metas, strict=True):
            if raw is None or json.loads(raw).get("status") not in FINAL_STATES:
                continue
            assert agent.run_id is not None
            record = registry.get(client, agent.run_id) or {}
            outcome = str(record.get("outcome"))
            self.tally.outcomes[outcome] = self.tally.outcomes.get(outcome, 0) + 1
            # Done when released; cancelled only when the soak asked (a cancel
            # may also come after the agent wrote its phase: done then).
            expected = ("done", "cancelled") if agent.cancel_requested else ("done",)
            if outcome not in expected:
                self.tally.unexpected.append(
                    f"{agent.run_id} ({agent.name}): {outcome}: {record.get('reason')}"
                )
            agent.run_id = None
            done.append(agent)
        return done


def sample(
    soak: Soak,
    client: redis.Redis,
    worker: psutil.Process,
    fds: FdFloor,
    watcher_id: int | None,
    socket: str,
    started: float,
    last: dict[str, float | None],
) -> dict[str, Any]:
    """One row of figures; ``last`` carries the CPU counters from the row before."""
    now = time.monotonic()
    tmux = tmux_server_process(socket)
    cpu = cpu_seconds([worker])
    watcher = thread_cpu(worker, watcher_id)
    before, minutes = last.get("at"), None
    if before is not None:
        minutes = (now - before) / 60

    def per_minute(value: float | None, key: str) -> float | None:
        earlier = last.get(key)
        if minutes is None or value is None or earlier is None:
            return None
        return (value - earlier) / minutes

    fds.read()
    least_fds, kinds = fds.take()

    def per_run(value: float | None, key: str) -> float | None:
        earlier, ended_before = last.get(key), last.get("ended")
        runs = soak.tally.ended - ended_before if ended_before is not None else 0
        if value is None or earlier is None or runs <= 0:
            return None
        return (value - earlier) * 1000 / runs

    row: dict[str, Any] = {
        "t_s": round(now - started, 1),
        "worker_rss_mib": worker.memory_info().rss / 2**20,
        "worker_fds": least_fds,
        "worker_fd_kinds": kinds,
        "tmux_rss_mib": tmux.memory_info().rss / 2**20 if tmux else None,
        **redis_memory(client),
        "worker_cpu_s_per_min": per_minute(cpu, "cpu"),
        "watcher_cpu_s_per_min": per_minute(watcher, "watcher"),
        "watcher_cpu_ms_per_run": per_run(watcher, "watcher"),
        "live_sessions": len(tmux_sessions(socket)),
        "runs_ended": soak.tally.ended,
        "runs_per_min": per_minute(soak.tally.ended, "ended"),
        "load_1m": round(os.getloadavg()[0], 2),
    }
    last.update(at=now, cpu=cpu, watcher=watcher, ended=soak.tally.ended)
    return row


def print_row(row: dict[str, Any]) -> None:
    def shown(key: str, fmt: str = ".1f") -> str:
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    print(
        f"[{row['t_s'] / 60:5.1f} min] live {row['live_sessions']:3d}  "
        f"ended {row['runs_ended']:5d} ({shown('runs_per_min')}/min, load {row['load_1m']})  "
        f"worker {shown('worker_rss_mib')} MiB {row['worker_fds']} fds "
        f"{shown('worker_cpu_s_per_min', '.2f')} cpu-s/min (watcher "
        f"{shown('watcher_cpu_s_per_min', '.3f')}, {shown('watcher_cpu_ms_per_run')} ms/run)  "
        f"tmux {shown('tmux_rss_mib')} MiB  "
        f"redis {shown('redis_used_memory_mib')} MiB ({shown('redis_unkept_mib', '.2f')} "
        "beyond the kept records)",
        flush=True,
    )


def verdicts(samples: list[dict[str, Any]], warmup_s: float) -> tuple[dict[str, Any], list[str]]:
    """Each series' slope per hour after the warm-up, and the ones beyond tolerance."""
    after = [row for row in samples if row["t_s"] >= warmup_s]
    slopes: dict[str, Any] = {}
    failures = []

    def fit(key: str) -> float | None:
        points = [(row["t_s"], row[key]) for row in after if row.get(key) is not None]
        value = slope_per_hour(points)
        slopes[key] = None if value is None else round(value, 4)
        return value

    for key, (limit, unit) in TOLERANCES.items():
        value = fit(key)
        if value is not None and value > limit:
            failures.append(f"{key} grows {value:.3f} {unit} (tolerance {limit:g} {unit})")
    watcher = fit("watcher_cpu_ms_per_run")
    levels = [row["watcher_cpu_ms_per_run"] for row in after if row.get("watcher_cpu_ms_per_run")]
    if watcher is not None and levels:
        mean = statistics.fmean(levels)
        slopes["watcher_cpu_ms_per_run_mean"] = round(mean, 3)
        if watcher > WATCHER_CPU_SHARE * mean:
            failures.append(
                f"the watcher's CPU per run grows {watcher:.3f} ms per hour "
                f"(tolerance {WATCHER_CPU_SHARE:.0%} of its mean {mean:.3f} ms)"
            )
    for key in REPORTED:
        fit(key)
    return slopes, failures


def leftovers(client: redis.Redis, root: Path, socket: str) -> dict[str, Any]:
    """What is still held once every run has ended: all of it must be empty."""
    runs_dir = root / "state" / "runs"
    worktrees = subprocess.run(
        ["git", "-C", str(root / "project"), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return {
        "leases_and_slots": held_claims(client),
        "tmux_sessions": tmux_sessions(socket),
        "live_runs": [s["id"] for s in registry.live_states(client, HOST)],
        "run_dirs": sorted(p.name for p in runs_dir.iterdir()) if runs_dir.exists() else [],
        "worktrees": [
            line.split(" ", 1)[1]
            for line in worktrees.splitlines()
            if line.startswith("worktree ") and Path(line.split(" ", 1)[1]) != root / "project"
        ],
    }


def run_soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The soak itself; its figures."""
    soak = Soak(args, root)
    agents = scenarios(root, args.sessions)
    with bench_host(root, agents, args.sessions) as (stack, server):
        app = client_app(stack.cfg)
        client = server.client()
        socket = stack.cfg.tmux_socket or ""
        worker = psutil.Process(next(p.pid for n, p in stack.procs if n == "worker"))
        fds = FdFloor(worker)
        started = time.monotonic()
        end = started + args.minutes * 60
        for agent in soak.agents:
            soak.launch(app, agent)
        last: dict[str, float | None] = {}
        next_sample = started
        watcher_id = None
        while time.monotonic() < end:
            now = time.monotonic()
            soak.end_due(client, now)
            for agent in soak.collect(client):
                soak.launch(app, agent)
            fds.read()
            if now >= next_sample:
                watcher_id = watcher_id or watcher_thread(root / "logs" / "worker.log")
                row = sample(soak, client, worker, fds, watcher_id, socket, started, last)
                soak.samples.append(row)
                print_row(row)
                next_sample += args.sample
            time.sleep(1.0)
        # The end: every run is told to finish, and each must end.
        soak.release_all()

        def drained() -> bool:
            soak.collect(client)
            return all(agent.run_id is None for agent in soak.agents)

        wait_for(drained, 600)
        lost = sorted(i for i in soak.sent_ids if not run_ended(client, i))
        left = leftovers(client, root, socket)
        redis_version = client.info("server")["redis_version"]
    slopes, failures = verdicts(soak.samples, args.warmup * 60)
    if lost:
        failures.append(f"{len(lost)} runs never ended: {', '.join(lost[:10])}")
    for what, items in left.items():
        if items:
            failures.append(f"left after the soak: {what}: {items[:10]}")
    if soak.tally.unexpected:
        failures.append(
            f"{len(soak.tally.unexpected)} runs ended unexpectedly: "
            + "; ".join(soak.tally.unexpected[:10])
        )
    return {
        "minutes": args.minutes,
        "sessions": args.sessions,
        "life_s": [args.min_life, args.max_life],
        "cancel_share": args.cancel_share,
        "warmup_minutes": args.warmup,
        "runs_sent": soak.tally.sent,
        "runs_completed": soak.tally.ended,
        "outcomes": soak.tally.outcomes,
        "lost": lost,
        "leftovers": left,
        "slopes_per_hour": slopes,
        "tolerances": {k: f"{v:g} {u}" for k, (v, u) in TOLERANCES.items()}
        | {"watcher_cpu_ms_per_run": f"{WATCHER_CPU_SHARE:.0%} of its mean per hour"},
        "failures": failures,
        "samples": soak.samples,
        **where_and_when(redis_version),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print its slopes and verdict, write bench/soak.json."""
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--min-life", type=float, default=60.0, help="seconds")
    parser.add_argument("--max-life", type=float, default=240.0, help="seconds")
    parser.add_argument("--cancel-share", type=float, default=0.25)
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes left out of the fit")
    parser.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="formulabeat-soak-") as tmp:
        results = run_soak(args, Path(tmp))
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"runs sent {results['runs_sent']}, completed {results['runs_completed']} "
        f"{results['outcomes']}, lost {len(results['lost'])}"
    )
    for key, value in results["slopes_per_hour"].items():
        print(f"  {key}: {value}" + ("" if key.endswith("_mean") else " per hour"))
    for failure in results["failures"]:
        print(f"FAIL: {failure}")
    print(f"written to {args.output}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
