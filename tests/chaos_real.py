"""``make chaos-real``: runs of the real Claude Code CLI through the API's bad days and the
fleet's faults.

Three hosts (network namespaces when this machine can make them) share one
Redis; each runs a worker whose agents are the pinned Claude Code CLI
(tests/real_cli.py) talking to the Messages API stand-in (tests/messages_api.py),
which listens where the hosts reach it. Runs of several agents are sent back
to back while faults are injected:

- API trouble in the runs' own scenarios: an overload outlasting the CLI's
  own retries (``outage=529:3``), a rate limit (``ratelimit=3``), a CLI that
  kills itself once (``crash_once``);
- API outages for everyone (every main request fails for a few seconds);
- a random host's worker killed with -9 every so often, and started again;
- Redis restarted once.

At the end it prints one line:

    runs: N, done: D, lost: L, duplicated: X, leaked locks: K, leaked sessions: S,
    slowest recovery: R s

``lost``: runs with no outcome, or ended ``lost``/``lost_lease``.
``duplicated``: runs where a step was done twice (the stand-in served the
same phase step more than once), two CLI processes worked at once (the
``trace=`` log of which CLI did which step), or that overlapped another run
of the same agent. ``leaked``: leases and session slots held, and tmux
sessions left, once every run has ended. ``slowest recovery``: over every
fault that hit a live run (its host's worker killed, Redis restarted, an
outage, its own wait for the API, its CLI's crash), the longest time from
the fault to the run's next phase (or its end). The exit status is 0 when
lost, duplicated and leaked are all zero and every run ended.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from beat_schedule import DEFAULT_QUEUE, REAP_EVERY_SECONDS, REAP_TASK, RUN_TASK
from tasks.app import client_app
from tests import chaos
from tests.conftest import commit_files, formula_text, held_claims, tmux_sessions
from tests.messages_api import MessagesAPI
from tests.netlab import NetLab, host_config, unavailable
from tests.real_cli import BYPASS, cli_env, find_claude, run_by_hand_once

# A formula's scenario for each agent, in turn: the API's trouble and the CLI's.
SCENARIOS = (
    "phase=awaiting_ci sleep=1 phase=done",
    "phase=awaiting_ci outage=529:3 phase=done",
    "ratelimit=3 phase=awaiting_ci phase=done",
    "crash_once phase=awaiting_ci phase=done",
    "phase=awaiting_ci sleep=2 outage=500:3 phase=done",
    "phase=awaiting_ci crash_once sleep=1 phase=done",
)
# Seconds an outage for everyone lasts, and seconds between two (on average).
OUTAGE_SECONDS = 6.0
OUTAGE_EVERY = 45.0
STUCK_SECONDS = 300


def main(argv: list[str] | None = None) -> int:
    """Run the chaos and print its one-line verdict."""
    parser = argparse.ArgumentParser(prog="chaos-real", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=20.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the lab's directory (logs)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    claude, why = find_claude()
    if claude is None:
        print(f"chaos-real: {why}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="formulabeat-chaos-real-"))
    reason = unavailable()
    lab = NetLab(root, isolated=reason is None)
    if reason:
        print(f"chaos-real: {reason}; hosts share this machine's network", file=sys.stderr)
    try:
        lab.start()
        where = lab.gateway if lab.isolated else "127.0.0.1"
        with MessagesAPI(host=where) as api:
            counts = _run(lab, api, claude, root, args, rng)
    finally:
        lab.close()
        if args.keep:
            print(f"chaos-real: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"runs: {counts['runs']}, done: {counts['done']}, lost: {counts['lost']}, "
        f"duplicated: {counts['duplicated']}, leaked locks: {counts['locks']}, "
        f"leaked sessions: {counts['sessions']}, slowest recovery: {counts['slowest']:.1f} s"
    )
    bad = counts["lost"] + counts["duplicated"] + counts["locks"] + counts["sessions"]
    return 0 if bad == 0 and counts["ended"] == counts["runs"] and not counts["crashed"] else 1


def _run(
    lab: NetLab,
    api: MessagesAPI,
    claude: Path,
    root: Path,
    args: argparse.Namespace,
    rng: random.Random,
) -> dict[str, Any]:
    home = root / "claude-home"
    run_by_hand_once(claude, home, api.url, f"fbchaos-byhand-{lab.token}")
    trace = root / "trace.log"
    agents = [f"agent{i:02d}" for i in range(args.agents)]
    formulas = {
        f"formulas/{name}.toml": formula_text(
            name, f"trace={trace} {SCENARIOS[index % len(SCENARIOS)]}"
        )
        for index, name in enumerate(agents)
    }
    commit_files(root / "project", {"README.md": "# chaos\n", **formulas})
    commit_files(root / "ops", {"journal.md": "# journal\n"})
    env = ", ".join(f'{k} = "{v}"' for k, v in cli_env(home, api.url).items())
    settings = (
        f'command = "{claude} {BYPASS}"\ndriver = "claude-code"\nenv = {{ {env} }}\n'
        "api_retry_delay = 2\n"
    )
    text = host_config(
        lab.host_url,
        agents,
        lease_seconds=30,
        host_timeout=30,
        agent_settings=settings,
        # Waits of 3 s and more (a second try's) end the CLI's process: its
        # conversation is resumed after.
        monitor="park_after = 3\n",
    )
    for index in range(args.hosts):
        lab.start_worker(lab.add_host(f"h{index + 1}", text))
    faults, sent, crashed = _inject(lab, api, agents, args, rng)
    return {**_verdict(lab, api, sent, faults, trace), "crashed": crashed}


@dataclasses.dataclass(frozen=True)
class Fault:
    """A fault injected at ``at`` (ending at ``until``), on one host or on all."""

    kind: str
    at: float
    until: float
    host: str | None = None


def _inject(
    lab: NetLab,
    api: MessagesAPI,
    agents: list[str],
    args: argparse.Namespace,
    rng: random.Random,
) -> tuple[list[Fault], dict[str, str], int]:
    app = client_app(next(iter(lab.hosts.values())).config())
    sent: dict[str, str] = {}
    busy: dict[str, str] = {}
    faults: list[Fault] = []
    redis_restarted = False
    now = time.monotonic()
    next_kill = now + rng.expovariate(1 / args.kill_every)
    next_outage = now + rng.expovariate(1 / OUTAGE_EVERY)
    progress = next_note = next_reap = now
    crashed = 0
    while len(sent) < args.runs or busy:
        assert lab.redis is not None
        client = lab.redis.client()
        for agent, run_id in list(busy.items()):
            if chaos._outcome(client, run_id):
                del busy[agent]
                progress = time.monotonic()
        free = [a for a in agents if a not in busy]
        if free and len(sent) < args.runs:
            agent = rng.choice(free)
            result = app.send_task(RUN_TASK, args=["proj", agent], queue=DEFAULT_QUEUE)
            sent[result.id] = agent
            busy[agent] = result.id
        live = len(sent) < args.runs
        if busy and time.monotonic() >= next_kill:
            host = rng.choice(list(lab.hosts.values()))
            print(f"chaos-real: kill -9 the worker of {host.name}", file=sys.stderr)
            at = time.time()
            lab.kill_worker(host)
            time.sleep(rng.uniform(0.2, 2.0))
            lab.start_worker(host)
            faults.append(Fault("worker killed", at, time.time(), host.name))
            next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
        if live and time.monotonic() >= next_outage:
            status = rng.choice((529, 500, 429))
            print(f"chaos-real: API outage ({status}) for {OUTAGE_SECONDS:g} s", file=sys.stderr)
            api.outage(OUTAGE_SECONDS, status)
            faults.append(Fault(f"API outage {status}", time.time(), time.time() + OUTAGE_SECONDS))
            next_outage = time.monotonic() + rng.expovariate(1 / OUTAGE_EVERY)
        crashed += chaos._restart_crashed(lab)
        if not redis_restarted and len(sent) >= args.runs // 2:
            print("chaos-real: restarting Redis", file=sys.stderr)
            at = time.time()
            lab.restart_redis(down_seconds=2)
            faults.append(Fault("Redis restarted", at, time.time()))
            app = client_app(next(iter(lab.hosts.values())).config())
            redis_restarted = True
        if time.monotonic() >= next_reap:
            app.send_task(REAP_TASK, queue=DEFAULT_QUEUE)
            next_reap = time.monotonic() + REAP_EVERY_SECONDS
        if time.monotonic() >= next_note:
            print(f"chaos-real: {len(sent)} sent, {len(sent) - len(busy)} ended", file=sys.stderr)
            next_note = time.monotonic() + 15
        if time.monotonic() - progress > STUCK_SECONDS:
            print(f"chaos-real: no run ended for {STUCK_SECONDS} s; giving up", file=sys.stderr)
            chaos._where(client, list(busy.values()))
            break
        time.sleep(0.2)
    return faults, sent, crashed


def _verdict(
    lab: NetLab, api: MessagesAPI, sent: dict[str, str], faults: list[Fault], trace: Path
) -> dict[str, Any]:
    assert lab.redis is not None
    client = lab.redis.client()
    records = {
        run_id: json.loads(client.get(f"formulabeat:run:{run_id}") or b"{}") for run_id in sent
    }
    outcomes = {run_id: record.get("outcome") for run_id, record in records.items()}
    tally = collections.Counter(o or "none" for o in outcomes.values())
    print(f"chaos-real: outcomes {dict(tally)}", file=sys.stderr)
    for run_id, record in records.items():
        if record.get("outcome") != "done":
            print(
                f"chaos-real: run {run_id} {record.get('outcome')}: {record.get('reason')}",
                file=sys.stderr,
            )
    lost = {r for r, o in outcomes.items() if o is None or o in chaos.TROUBLE}
    duplicated = _duplicated(api, sent, records, trace)
    for run_id in sorted(lost | duplicated | {r for r, o in outcomes.items() if o != "done"}):
        chaos._explain(lab, run_id, [])
    slowest, what = _slowest_recovery(api, records, faults)
    print(f"chaos-real: slowest recovery {slowest:.1f} s ({what})", file=sys.stderr)
    time.sleep(2)  # a session being killed as the last run ended
    sessions = sum(len(tmux_sessions(h.tmux_socket)) for h in lab.hosts.values())
    return {
        "runs": len(sent),
        "ended": sum(1 for o in outcomes.values() if o),
        "done": tally.get("done", 0),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "locks": len(held_claims(client)),
        "sessions": sessions,
        "slowest": slowest,
    }


def _duplicated(
    api: MessagesAPI, sent: dict[str, str], records: dict[str, dict[str, Any]], trace: Path
) -> set[str]:
    """Runs with a step done twice, two CLIs at once, or overlapping their agent's other runs."""
    duplicated: set[str] = set()
    # The trace names a run by its phase file, beside its worktree.
    by_phase_file = {
        str(Path(r["worktree"]).parent / "phase"): i
        for i, r in records.items()
        if r.get("worktree")
    }
    for run_id, record in records.items():
        if not record.get("worktree"):
            continue
        served = collections.Counter(
            (e.cursor, e.action)
            for e in api.for_run(run_id)
            if e.status == 200 and e.action.startswith("phase")
        )
        twice = [step for step, count in served.items() if count > 1]
        if twice:
            print(f"chaos-real: run {run_id}: steps done twice: {twice}", file=sys.stderr)
            duplicated.add(run_id)
    # Which CLI process did which step: two processes of one run must not overlap.
    spans: dict[str, dict[str, list[float]]] = collections.defaultdict(dict)
    if trace.exists():
        for line in trace.read_text().splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue
            traced = by_phase_file.get(parts[0].strip("'"))
            if traced is None:
                continue
            span = spans[traced].setdefault(parts[2], [float(parts[3])] * 2)
            span[0], span[1] = min(span[0], float(parts[3])), max(span[1], float(parts[3]))
    for run_id, pids in spans.items():
        for (_, first_end), (second_start, _) in itertools.combinations(sorted(pids.values()), 2):
            if second_start < first_end:
                print(f"chaos-real: run {run_id}: two CLI processes at once", file=sys.stderr)
                duplicated.add(run_id)
    # Runs of one agent overlapping (the lease must prevent it).
    by_agent: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for run_id in records:
        stamps = [e.at for e in api.for_run(run_id)]
        if stamps:
            by_agent[sent[run_id]].append((min(stamps), max(stamps), run_id))
    for runs in by_agent.values():
        runs.sort()
        for (_, end, _), (start, _, run_id) in itertools.pairwise(runs):
            if start < end:
                print(
                    f"chaos-real: run {run_id} overlapped its agent's run before", file=sys.stderr
                )
                duplicated.add(run_id)
    return duplicated


def _slowest_recovery(
    api: MessagesAPI, records: dict[str, dict[str, Any]], faults: list[Fault]
) -> tuple[float, str]:
    """The longest time from a fault that hit a live run to that run's next phase or end."""
    slowest, what = 0.0, "no fault hit a live run"
    for run_id, record in records.items():
        started, finished = _epoch(record.get("started_at")), _epoch(record.get("finished_at"))
        if started is None or finished is None:
            continue
        marks = sorted(t for p in record.get("phases", []) if (t := _epoch(p.get("at"))))
        hits = [
            (f.until, f.kind)
            for f in faults
            if started <= f.until <= finished and f.host in (None, record.get("host"))
        ]
        hits += [(float(w["since"]), f"its wait for {w['kind']}") for w in record["api_waits"]]
        hits += [
            (e.at, "its CLI's crash")
            for e in api.for_run(run_id)
            if e.status == 200 and e.action.startswith("crash")
        ]
        for at, kind in hits:
            after = next((t for t in marks if t > at), finished)
            if after - at > slowest:
                slowest, what = after - at, f"run {run_id[:8]} after {kind}"
    return slowest, what


def _epoch(stamp: object) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return dt.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
