"""``make chaos``: many runs on several hosts while workers die and Redis restarts.

Three hosts (network namespaces when this machine can make them, else plain
processes with their own worker, tmux socket and state dir) share one Redis.
Runs of a dozen agents are sent back to back; every few seconds a random
host's worker is killed with -9 and started again, and once Redis is
restarted. ``--redis sentinel``: the hosts reach a Sentinel group (a master,
two replicas, three Sentinels) instead, and its master is failed over
(``SENTINEL FAILOVER``) once and killed with -9 once, among the worker kills.
At the end it prints one line:

    runs: N, lost: L, duplicated: D, leaked locks: K, leaked sessions: S

(with Sentinel, also ``longest write wait``: the longest a write through
formulabeat's own client, made every 0.1 s by a probe, waited for a master).

``lost``: runs with no outcome, ended ``lost``/``lost_lease`` (no host
vanished, so none should be), or skipped for a lease they held themselves.
``duplicated``: runs whose agent got the prompt in more than one process, or
that overlapped another run of the same agent (both from the agents' own logs).
``leaked locks``: leases and session slots still held once every run has ended.
``leaked sessions``: tmux sessions left on any host. A worker that exits on its
own (chaos only kills them with -9) is started again, as systemd would, and
told on stderr with the end of its log. The exit status is 0 only when all are
zero and no worker exited on its own.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import random
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from beat_schedule import DEFAULT_QUEUE, REAP_EVERY_SECONDS, REAP_TASK, RUN_TASK
from tasks.app import client_app
from tests.conftest import commit_files, formula_text, held_claims, tmux_sessions
from tests.netlab import NetLab, host_config, unavailable
from tests.sentinels import MASTER_NAME, SentinelLab
from workers import sentinel
from workers.lanes import REDIS_PATIENCE, RETRYABLE, with_redis
from workers.sentinel import replicated

TROUBLE = ("lost", "lost_lease")
# A message its dead worker had reserved comes back after the visibility
# timeout (60 s); far longer than that with no run ending is a hang.
STUCK_SECONDS = 240
# Worker log lines that tell when a worker came up, connected and adopted.
LIFE_WORDS = ("ready", "adopt", "Connected", "rror", "heartbeat", "serves")


def main(argv: list[str] | None = None) -> int:
    """Run the chaos and print its one-line verdict."""
    parser = argparse.ArgumentParser(prog="chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--agents", type=int, default=12)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=8.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--redis", choices=("plain", "sentinel"), default="plain")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="formulabeat-chaos-") as tmp:
        root = Path(tmp)
        agents = [f"agent{i:02d}" for i in range(args.agents)]
        log = root / "agents.jsonl"
        formulas = {
            f"formulas/{name}.toml": formula_text(
                name, f"log={log} phase=awaiting_ci sleep={rng.uniform(0.5, 4):.1f} phase=done"
            )
            for name in agents
        }
        commit_files(root / "project", {"README.md": "# chaos\n", **formulas})
        commit_files(root / "ops", {"journal.md": "# journal\n"})
        reason = unavailable()
        lab = NetLab(root, isolated=reason is None, sentinel=args.redis == "sentinel")
        if reason:
            print(f"chaos: {reason}; hosts share this machine's network", file=sys.stderr)
        try:
            lab.start()
            broker = f'master_name = "{MASTER_NAME}"\n' if lab.sentinel else ""
            text = host_config(
                lab.host_url, agents, lease_seconds=30, host_timeout=30, broker=broker
            )
            for index in range(args.hosts):
                lab.start_worker(lab.add_host(f"h{index + 1}", text))
            counts = _chaos(lab, agents, args, rng, log)
        finally:
            lab.close()
    if counts["crashed"]:
        print(f"chaos: {counts['crashed']} worker(s) exited on their own", file=sys.stderr)
    waited = counts.pop("write_wait_ms", None)
    print(
        f"runs: {counts['runs']}, lost: {counts['lost']}, duplicated: {counts['duplicated']}, "
        f"leaked locks: {counts['locks']}, leaked sessions: {counts['sessions']}"
        + (f", longest write wait: {waited / 1000:.1f} s" if waited is not None else "")
    )
    return 0 if not any(v for k, v in counts.items() if k != "runs") else 1


def _chaos(
    lab: NetLab, agents: list[str], args: argparse.Namespace, rng: random.Random, log: Path
) -> dict[str, int]:
    app = client_app(next(iter(lab.hosts.values())).config())
    sent: dict[str, str] = {}  # run id -> agent
    busy: dict[str, str] = {}  # agent -> its run in flight
    redis_restarted = False
    faults = 0
    probe = _WriteProbe(lab.group) if lab.group is not None else None
    next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
    progress = next_note = next_reap = time.monotonic()
    crashed = 0
    while len(sent) < args.runs or busy:
        client = lab.client()
        for agent, run_id in list(busy.items()):
            if _outcome(client, run_id):
                del busy[agent]
                progress = time.monotonic()
        free = [a for a in agents if a not in busy]
        if free and len(sent) < args.runs:
            agent = rng.choice(free)
            result = app.send_task(RUN_TASK, args=["proj", agent], queue=DEFAULT_QUEUE)
            sent[result.id] = agent
            busy[agent] = result.id
        if len(sent) < args.runs and time.monotonic() >= next_kill:
            host = rng.choice(list(lab.hosts.values()))
            print(f"chaos: kill -9 the worker of {host.name}", file=sys.stderr)
            lab.kill_worker(host)
            time.sleep(rng.uniform(0.2, 2.0))
            lab.start_worker(host)
            next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
        crashed += _restart_crashed(lab)
        if lab.group is not None:
            # The master failed over at a third of the runs, killed at two thirds.
            due = [n for n in (args.runs // 3, 2 * args.runs // 3) if len(sent) >= n]
            if len(due) > faults:
                fault = "SENTINEL FAILOVER" if faults == 0 else "kill -9 of the master"
                print(f"chaos: {fault}", file=sys.stderr)
                moved = lab.group.failover() if faults == 0 else lab.group.kill_master()
                print(f"chaos: the master is now on port {moved}", file=sys.stderr)
                faults += 1
        elif not redis_restarted and len(sent) >= args.runs // 2:
            print("chaos: restarting Redis", file=sys.stderr)
            lab.restart_redis(down_seconds=2)
            app = client_app(next(iter(lab.hosts.values())).config())
            redis_restarted = True
        if time.monotonic() >= next_reap:
            # As beat does: the reaper also sends again runs the broker lost.
            app.send_task(REAP_TASK, queue=DEFAULT_QUEUE)
            next_reap = time.monotonic() + REAP_EVERY_SECONDS
        if time.monotonic() >= next_note:
            ended = len(sent) - len(busy)
            print(f"chaos: {len(sent)} sent, {ended} ended", file=sys.stderr)
            next_note = time.monotonic() + 15
        if time.monotonic() - progress > STUCK_SECONDS:
            print(f"chaos: no run ended for {STUCK_SECONDS} s; giving up", file=sys.stderr)
            _where(client, list(busy.values()))
            for host in lab.hosts.values():
                for line in _worker_log(lab, host.name)[-25:]:
                    print(f"chaos: {host.name} log: {line[:300]}", file=sys.stderr)
            break
        time.sleep(0.2)
    counts = {**_verdict(lab, sent, log), "crashed": crashed}
    if probe is not None:
        counts["write_wait_ms"] = probe.stop()
    return counts


class _WriteProbe:
    """Writes through formulabeat's own Sentinel client every 0.1 s; the longest one took."""

    def __init__(self, group: SentinelLab) -> None:
        url = group.url.replace(group.address, "127.0.0.1")
        self.client = sentinel.master_client(url, MASTER_NAME, None, 5.0)
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def _write(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            started = time.monotonic()
            # Given up after REDIS_PATIENCE, its time counts all the same.
            with contextlib.suppress(*RETRYABLE):
                with_redis(partial(replicated, self.client, "SET", "chaos:probe", count))
            self.longest = max(self.longest, time.monotonic() - started)
            time.sleep(0.1)

    def stop(self) -> int:
        """Stop writing; the longest write's time in ms."""
        self._stop.set()
        self._thread.join(REDIS_PATIENCE + 10)
        return round(self.longest * 1000)


def _restart_crashed(lab: NetLab) -> int:
    """Start again (as systemd would) each worker that exited on its own; how many did."""
    crashed = 0
    for host in lab.hosts.values():
        if host.stack is None or not host.stack.alive():
            continue
        print(f"chaos: the worker of {host.name} exited on its own; its log ends:", file=sys.stderr)
        for line in _worker_log(lab, host.name)[-40:]:
            print(f"chaos: {host.name} log: {line[:300]}", file=sys.stderr)
        lab.kill_worker(host)
        lab.start_worker(host)
        crashed += 1
    return crashed


def _where(client: Any, run_ids: list[str]) -> None:
    """Print where the broker holds the messages of runs that never ended."""
    places: dict[str, list[str]] = {run_id: [] for run_id in run_ids}
    for key in client.scan_iter("*"):
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "list":
            texts = [m.decode(errors="replace") for m in client.lrange(key, 0, -1)]
        elif kind == "hash" and key == b"unacked":
            texts = [m.decode(errors="replace") for m in client.hvals(key)]
        else:
            continue
        for run_id in run_ids:
            if any(run_id in text for text in texts):
                places[run_id].append(key.decode(errors="replace"))
    ttl = client.ttl("unacked_mutex")
    for run_id, keys in places.items():
        print(
            f"chaos: run {run_id} is in {keys or 'no queue'}; unacked_mutex ttl {ttl}",
            file=sys.stderr,
        )


def _outcome(client: Any, run_id: str) -> str | None:
    raw = client.get(f"formulabeat:run:{run_id}")
    return json.loads(raw).get("outcome") if raw else None


def _verdict(lab: NetLab, sent: dict[str, str], log: Path) -> dict[str, int]:
    client = lab.client()
    outcomes = {run_id: _outcome(client, run_id) for run_id in sent}
    tally = collections.Counter(o or "none" for o in outcomes.values())
    print(f"chaos: outcomes {dict(tally)}", file=sys.stderr)
    for run_id, outcome in outcomes.items():
        if outcome != "done":
            record = json.loads(client.get(f"formulabeat:run:{run_id}") or b"{}")
            print(f"chaos: run {run_id} {outcome}: {record.get('reason')}", file=sys.stderr)
    # A run skipped for a lease it holds itself never ran its agent: lost too.
    reasons = {
        run_id: str(json.loads(client.get(f"formulabeat:run:{run_id}") or b"{}").get("reason"))
        for run_id, outcome in outcomes.items()
        if outcome == "skipped"
    }
    self_skipped = {run_id for run_id, reason in reasons.items() if f"run {run_id} " in reason}
    lost = sum(1 for o in outcomes.values() if o is None or o in TROUBLE) + len(self_skipped)
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    prompted: dict[str, set[int]] = collections.defaultdict(set)
    spans: dict[str, list[float]] = {}
    for event in events:
        run_id = event.get("run")
        if not run_id:
            continue
        if event["event"] == "prompt":
            prompted[run_id].add(event["pid"])
        span = spans.setdefault(run_id, [event["at"], event["at"]])
        span[0], span[1] = min(span[0], event["at"]), max(span[1], event["at"])
    duplicated = {run_id for run_id, pids in prompted.items() if len(pids) > 1}
    for run_id in duplicated:
        print(
            f"chaos: run {run_id}: the prompt reached {len(prompted[run_id])} agents",
            file=sys.stderr,
        )
    by_agent: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for run_id, (start, end) in spans.items():
        by_agent[sent.get(run_id, "?")].append((start, end, run_id))
    for runs in by_agent.values():
        runs.sort()
        for (_, end, _), (start, _, run_id) in itertools.pairwise(runs):
            if start < end:
                print(
                    f"chaos: run {run_id} of {sent.get(run_id)} overlapped the one before",
                    file=sys.stderr,
                )
                duplicated.add(run_id)
    troubled = {r for r, o in outcomes.items() if o is None or o in TROUBLE}
    troubled |= duplicated | self_skipped
    for run_id in sorted(troubled):
        _explain(lab, run_id, [e for e in events if e.get("run") == run_id])
    time.sleep(2)  # a session being killed as the last run ended
    sessions = sum(len(tmux_sessions(h.tmux_socket)) for h in lab.hosts.values())
    return {
        "runs": len(sent),
        "lost": lost,
        "duplicated": len(duplicated),
        "locks": len(held_claims(client)),
        "sessions": sessions,
    }


def _worker_log(lab: NetLab, host: str) -> list[str]:
    """The lines a host's workers logged so far (each restart appends)."""
    path = lab.root / f"logs-{host}" / "worker.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def _explain(lab: NetLab, run_id: str, events: list[dict[str, Any]]) -> None:
    """Print what the workers logged about a run that went wrong, and its agents' events."""
    print(f"chaos: --- run {run_id} ---", file=sys.stderr)
    for host in lab.hosts.values():
        for line in _worker_log(lab, host.name):
            if run_id in line or run_id[:8] in line:
                print(f"chaos: {host.name}: {line[:300]}", file=sys.stderr)
    for event in events:
        print(f"chaos: agent: {json.dumps(event)[:300]}", file=sys.stderr)
    for host in lab.hosts.values():
        for line in _worker_log(lab, host.name):
            if any(word in line for word in LIFE_WORDS):
                print(f"chaos: {host.name} life: {line[:300]}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
