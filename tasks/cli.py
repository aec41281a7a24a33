"""The ``formulabeat`` command line.

Errors formulabeat can explain are printed as one line naming what is wrong
(exit status 4); run outcomes map to exit statuses with ``run --wait``. The
README's exit status table lists every status below.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from workers.errors import FormulabeatError

if TYPE_CHECKING:
    from tasks.stack import Stack
    from workers.config import Config

# Hooks run through this module on every tool call of every agent: it imports
# only what argument parsing needs, each command the rest.

# Exit statuses. An error formulabeat explains, a usage error included: 2,
# argparse's usual status, is escalate's here.
EXIT_ERROR = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports git or cat ended by `| head`
# `run --wait` exit statuses, by outcome; any other outcome (failed, crashed, …) is 1.
EXIT_BY_OUTCOME = {"done": 0, "merged": 0, "escalate": 2, "skipped": 3}
EXIT_RUN_FAILED = 1
# The broker URL of the config this command read, for error messages (redacted there).
_broker_shown: list[str] = []


def _config(args: argparse.Namespace) -> Config:
    from workers.agents import checked
    from workers.config import CONFIG_ENV, load_config

    cfg = checked(load_config(args.config))
    # Children (Celery's commands) and the lazily configured app read the same file.
    os.environ[CONFIG_ENV] = str(cfg.path)
    _broker_shown.append(cfg.broker_url or "")
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


def cmd_up(args: argparse.Namespace) -> int:
    """Start the embedded Redis (if no broker is configured), a worker, beat and Flower."""
    from tasks.stack import Stack

    cfg = _config(args)
    stack = Stack(cfg, flower=not args.no_flower, end_runs=True)
    # From here a Ctrl-C (or TERM) is counted, not raised: one that comes
    # while the parts start, or a second one while they stop, must not cut a
    # step in half and leave a live run behind (see tasks.stack).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stack.interrupt())
    # A part that fails to start stops them all (its runs ended) and raises.
    started = stack.start()
    try:
        return _watch_up(stack, args) if started else 0
    finally:
        print("formulabeat up: stopping (live runs end as cancelled)", file=sys.stderr)
        ended = stack.stop()
        if ended:
            print(f"formulabeat up: cancelled {', '.join(ended)}", file=sys.stderr)


def _watch_up(stack: Stack, args: argparse.Namespace) -> int:
    """Until a Ctrl-C (0) or a part's exit (1)."""
    parts = "worker, beat" + ("" if args.no_flower else f", Flower at {stack.flower_url}")
    print(f"formulabeat up: {parts} for {stack.cfg.path} (Ctrl-C stops)", file=sys.stderr)
    while not stack.interrupts:
        dead = stack.alive()
        if dead:
            print(f"formulabeat up: {', '.join(dead)} exited; stopping", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


def _celery_args(args: argparse.Namespace) -> list[str]:
    """What follows the command, for Celery: a leading ``--`` only separates them."""
    extra = list(args.celery_args)
    return extra[1:] if extra[:1] == ["--"] else extra


def _exec_celery(cfg: Config, argv: list[str], env: dict[str, str]) -> int:
    from tasks.app import broker_url

    # Without a broker Celery would fail deep in its start, with a traceback.
    broker_url(cfg)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one Celery worker for this config (``celery -A tasks.app worker``)."""
    from tasks.stack import child_env, worker_argv

    cfg = _config(args)
    return _exec_celery(cfg, worker_argv(cfg, _celery_args(args)), child_env(cfg))


def cmd_beat(args: argparse.Namespace) -> int:
    """Run Celery beat for this config (``celery -A tasks.app beat``)."""
    from tasks.stack import beat_argv, child_env

    cfg = _config(args)
    return _exec_celery(cfg, beat_argv(cfg, _celery_args(args)), child_env(cfg))


def cmd_flower(args: argparse.Namespace) -> int:
    """Run Flower for this config (``celery -A tasks.app flower``)."""
    from tasks.stack import child_env, flower_argv

    cfg = _config(args)
    return _exec_celery(cfg, flower_argv(cfg, _celery_args(args)), child_env(cfg, flower=True))


def _progress_line(started: float, meta: dict[str, Any], state: str) -> str:
    phase = meta.get("final_phase") or "-"
    line = (
        f"[{time.monotonic() - started:7.1f}s] {state:<12} phase {phase:<22} "
        f"host {meta.get('host') or '-'}  session {meta.get('session') or '-'}"
    )
    waiting = _waiting_text(meta)
    return f"{line}  {waiting}" if waiting else line


def _waiting_text(meta: dict[str, Any]) -> str | None:
    """A waiting run's error, try and when it goes on, as status and run --wait show it."""
    waiting = meta.get("waiting")
    if not isinstance(waiting, dict):
        return None
    return (
        f"waiting for the API: {waiting.get('error')} (try {waiting.get('try')} of "
        f"{waiting.get('of')}), goes on at {waiting.get('until_text')}"
    )


def wait_for(
    cfg: Config, run_id: str, timeout: float | None, show: Callable[[str], None]
) -> dict[str, Any]:
    """Follow a run's states until it has a result; return the result dict."""
    from tasks.app import client_app
    from tasks.reporting import result_of, snapshot_of

    app = client_app(cfg)
    result = app.AsyncResult(run_id)
    started = time.monotonic()
    last: tuple[str, str | None, object] | None = None
    try:
        while True:
            state = result.state
            ended = result_of(result)
            if ended is not None:
                return ended
            if state in ("FAILURE", "REVOKED"):
                raise FormulabeatError(f"run {run_id} failed inside formulabeat: {result.info!r}")
            info = snapshot_of(result)
            if info is not None and "phases" in info:
                key = (state, info.get("final_phase"), info.get("api_retries"))
                if key != last:
                    last = key
                    show(_progress_line(started, info, state))
            if timeout is not None and time.monotonic() - started > timeout:
                raise FormulabeatError(f"run {run_id} did not end within {timeout:g} s")
            time.sleep(0.2)
    finally:
        app.close()


def cmd_run(args: argparse.Namespace) -> int:
    """Enqueue a run now; with --wait, follow it and exit with its outcome."""
    from beat_schedule import DEFAULT_QUEUE, RUN_TASK
    from tasks.app import client_app

    cfg = _config(args)
    cfg.agent(args.project, args.agent)
    app = client_app(cfg)
    try:
        sent = app.send_task(
            RUN_TASK,
            args=[args.project, args.agent],
            kwargs={"trigger": "cli"},
            queue=DEFAULT_QUEUE,
        )
    finally:
        app.close()
    if args.json and not args.wait:
        # What `status RUN_ID --json` shows of a run no worker has taken yet.
        queued = {"run_id": sent.id, "project": args.project, "agent": args.agent, "state": "SENT"}
        print(json.dumps(queued), flush=True)
        return 0
    # With --json, stdout is kept for the result's one line.
    print(sent.id, file=sys.stderr if args.json else sys.stdout, flush=True)
    if not args.wait:
        return 0

    def show(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = wait_for(cfg, sent.id, args.timeout, show)
    outcome = result.get("outcome") or "failed"
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        reason = f" ({result['reason']})" if result.get("reason") else ""
        print(f"{outcome}{reason}")
    return EXIT_BY_OUTCOME.get(outcome, EXIT_RUN_FAILED)


def cmd_status(args: argparse.Namespace) -> int:
    """Show recent runs, or one run in detail."""
    from tasks.app import redis_client
    from workers import registry
    from workers.usage import total_tokens

    cfg = _config(args)
    client = redis_client(cfg)
    if args.run_id:
        snapshot = _snapshot(cfg, resolve_run_id(cfg, args.run_id))
        if args.json:
            print(json.dumps(snapshot))
        else:
            for key, value in snapshot.items():
                if key not in ("phases", "usage", "api_waits", "waiting"):
                    print(f"{key:>18}: {_shown(value)}")
            waiting = _waiting_text(snapshot)
            if waiting:
                print(f"{'waiting':>18}: {waiting}")
            for wait in snapshot.get("api_waits") or []:
                went = f", went on {wait['went_on']}" if wait.get("went_on") else ""
                print(
                    f"{'api wait':>18}: {wait.get('at')}  try {wait.get('try')} of "
                    f"{wait.get('of')}: {wait.get('error')} (until {wait.get('until_text')}{went})"
                )
            for phase in snapshot.get("phases", []):
                print(f"{'phase':>18}: {phase['at']}  {phase['phase']}")
            for model, kinds in (snapshot.get("usage") or {}).items():
                counts = "  ".join(f"{kind} {count}" for kind, count in kinds.items())
                print(f"{'tokens':>18}: {model}  {counts}")
        return 0
    runs = registry.recent(client, args.limit)
    if args.json:
        print(json.dumps(runs))
        return 0
    print(
        f"{'run':<8} {'project':<12} {'agent':<12} {'host':<12} {'phase':<20} "
        f"{'age':>7} {'tokens':>7} {'outcome':<12} reason"
    )
    now = time.time()
    for snap in runs:
        started = _epoch(snap.get("started_at"))
        age = _age(now - started) if started else "-"
        phase = snap.get("final_phase") or snap.get("state") or "-"
        tokens = total_tokens(snap.get("usage") or {})
        print(
            f"{snap['run_id'][:8]:<8} {_shown(snap.get('project')):<12} "
            f"{_shown(snap.get('agent')):<12} {_shown(snap.get('host')):<12} {phase:<20} "
            f"{age:>7} {_count(tokens) if tokens else '-':>7} "
            f"{snap.get('outcome') or 'live':<12} "
            f"{_shown(snap.get('reason') or _waiting_text(snap))}"
        )
    return 0


def _shown(value: object) -> str:
    """A snapshot's value as printed: ``-`` where it has none (not Python's ``None``)."""
    return "-" if value is None or value == "" else str(value)


def _count(number: float) -> str:
    """A token count, short: 950, 12.3k, 4.1M."""
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if number >= limit:
            return f"{number / limit:.1f}{suffix}"
    return f"{number:.0f}"


USAGE_BY = ("project", "agent", "model", "day")


def cmd_usage(args: argparse.Namespace) -> int:
    """Tokens and cost from the history in Redis, grouped as asked."""
    from tasks.app import redis_client
    from workers import spending

    cfg = _config(args)
    days = _days(args.since)
    if days > cfg.history_keep_days:
        print(
            f"warning: the history keeps {cfg.history_keep_days} days ([history] keep_days)",
            file=sys.stderr,
        )
    totals: dict[str, dict[str, float]] = {}
    for row in spending.rows(redis_client(cfg), days):
        key = f"{row.project}/{row.agent}" if args.by == "agent" else str(getattr(row, args.by))
        into = totals.setdefault(key, {"tokens": 0.0, "cost_usd": 0.0})
        into.setdefault(row.kind, 0.0)
        into[row.kind] += row.value
        if row.kind != spending.COST:
            into["tokens"] += row.value
    if args.json:
        print(json.dumps({key: totals[key] for key in sorted(totals)}))
        return 0
    kinds = ("input", "output", "cache_read", "cache_creation")
    header = f"{args.by:<24} " + " ".join(f"{k:>14}" for k in (*kinds, "tokens")) + "  cost_usd"
    print(header)
    for key in sorted(totals):
        group = totals[key]
        counts = " ".join(f"{int(group.get(k, 0)):>14}" for k in (*kinds, "tokens"))
        print(f"{key:<24} {counts}  {group['cost_usd']:.4f}")
    return 0


def _days(since: str) -> int:
    """``7d`` (or ``7``) as a number of days, today included."""
    text = since.strip().lower().removesuffix("d")
    if not text.isdigit() or int(text) < 1:
        raise FormulabeatError(f"--since {since!r}: give a number of days, like 7d")
    return int(text)


def _epoch(stamp: object) -> float | None:
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_cancel(args: argparse.Namespace) -> int:
    """Stop a run from any host: its monitor kills the session and reports it cancelled."""
    from tasks.app import redis_client
    from workers import registry

    cfg = _config(args)
    client = redis_client(cfg)
    run_id = resolve_run_id(cfg, args.run_id)
    snap = _snapshot(cfg, run_id)
    if snap.get("outcome"):
        print(f"run {run_id} already ended: {snap['outcome']}")
        return 0
    registry.request_cancel(client, run_id, f"formulabeat cancel on host {cfg.host}")
    print(
        f"cancel requested for run {run_id} (on host {_shown(snap.get('host'))})", file=sys.stderr
    )
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        snap = _snapshot(cfg, run_id)
        if snap.get("outcome"):
            print(f"{snap['outcome']} ({_shown(snap.get('reason'))})")
            return 0
        time.sleep(0.3)
    raise FormulabeatError(f"run {run_id} has not stopped within {args.timeout:g} s")


def cmd_enable(args: argparse.Namespace) -> int:
    """Enable or disable an agent on every host."""
    from tasks.app import redis_client
    from workers.guards import set_enabled

    cfg = _config(args)
    cfg.agent(args.project, args.agent)
    enabled = args.command == "enable"
    set_enabled(redis_client(cfg), args.project, args.agent, enabled)
    print(f"{args.project}/{args.agent}: {'enabled' if enabled else 'disabled'}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check tmux, git, the agent commands, Redis, clocks, memory and the state dir."""
    from tasks.app import broker_url, redis_client
    from workers import sentinel
    from workers.doctor import fix_agents, run_checks, sentinel_check

    cfg = _config(args)
    if args.fix:
        for line in fix_agents(cfg):
            print(f"fixed {line}")
    try:
        url: str | None = broker_url(cfg)
    except FormulabeatError:
        url = None
    if url is not None and sentinel.is_sentinel_url(url):
        check = sentinel_check(url, cfg.master_name or "", cfg.sentinel_password)
        print(f"{'ok  ' if check.ok else 'FIX '} {check.name:<22} {check.detail}")
        if not check.ok:
            return EXIT_ERROR
    checks = run_checks(cfg, url, lambda: redis_client(cfg))
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FIX '} {check.name:<22} {check.detail}")
    return 0 if all(check.ok for check in checks) else 1


# The shortest run id prefix taken: `status` shows 8 characters, and 3 or
# fewer would name a good share of a busy week's runs.
MIN_RUN_PREFIX = 4
# An ambiguous prefix names at most this many of the runs it fits.
_CANDIDATES_SHOWN = 10


def resolve_run_id(cfg: Config, given: str) -> str:
    """The run id ``given`` names: a whole run id, or a prefix that fits one known run only.

    Every command taking a run id resolves it here; an ambiguous prefix, a
    short one or one no run fits is a :class:`FormulabeatError` saying so.
    """
    from tasks.app import redis_client
    from workers import registry

    client = redis_client(cfg)
    # A whole id is itself, even if it were the prefix of a longer one.
    if client.exists(registry.run_key(given)) or registry.awaits_claim(client, given):
        return given
    if len(given) < MIN_RUN_PREFIX:
        raise FormulabeatError(
            f"run id {given!r} is too short: give at least {MIN_RUN_PREFIX} characters"
        )
    found = registry.runs_starting(client, given)
    if len(found) == 1:
        return found[0]
    if found:
        shown = ", ".join(found[:_CANDIDATES_SHOWN])
        more = (
            f" and {len(found) - _CANDIDATES_SHOWN} more" if len(found) > _CANDIDATES_SHOWN else ""
        )
        raise FormulabeatError(
            f"run id {given!r} is ambiguous: it fits {shown}{more}; give more characters"
        )
    raise FormulabeatError(f"no run {given} is known (runs are kept 7 days)")


def _snapshot(cfg: Config, run_id: str) -> dict[str, Any]:
    """The latest snapshot of a resolved run id (a run sent and not yet taken: its ``SENT`` one)."""
    from tasks.app import redis_client
    from workers import registry

    client = redis_client(cfg)
    snapshot = registry.get(client, run_id) or registry.sent(client, run_id)
    if snapshot is None:
        raise FormulabeatError(f"no run {run_id} is known (runs are kept 7 days)")
    return snapshot


def _tmux_argv(cfg: Config) -> list[str]:
    if not cfg.tmux_socket:
        return ["tmux"]
    flag = "-S" if "/" in cfg.tmux_socket else "-L"
    return ["tmux", flag, cfg.tmux_socket]


def cmd_attach(args: argparse.Namespace) -> int:
    """Attach to a run's tmux session, or say how to from its host."""
    import shlex

    cfg = _config(args)
    run_id = resolve_run_id(cfg, args.run_id)
    snap = _snapshot(cfg, run_id)
    if not snap.get("session") or snap.get("outcome"):
        state = snap.get("outcome") or snap.get("state")
        raise FormulabeatError(f"run {run_id} has no live session ({_shown(state)})")
    argv = [*_tmux_argv(cfg), "attach-session", "-t", f"={snap['session']}"]
    if snap.get("host") != cfg.host:
        print(f"run {run_id} lives on host {snap['host']}; there, run: {shlex.join(argv)}")
        return 0
    os.execvp(argv[0], argv)
    return 0  # not reached


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the agent's pane, from any host; --follow prints its new lines until the run ends."""
    from tasks.app import redis_client
    from workers import registry

    cfg = _config(args)
    client = redis_client(cfg)
    run_id = resolve_run_id(cfg, args.run_id)
    seen: str | None = None  # the pane as last printed
    with _CtrlC() as ctrl_c:
        while not ctrl_c.pressed:
            snap = _snapshot(cfg, run_id)
            if snap.get("outcome"):
                if args.follow:
                    # Its host published the screen once more as the session ended.
                    _print_new_lines(seen, registry.published_pane(client, run_id))
                print(f"run {run_id} ended: {snap['outcome']} ({_shown(snap.get('reason'))})")
                return 0
            # The session's host publishes its pane while someone asks for it.
            registry.request_pane(client, run_id)
            text = _next_pane(cfg, run_id, seen if args.follow else None, ctrl_c)
            if text is not None:
                _print_new_lines(seen, text)
                seen = text
            elif seen is None and not ctrl_c.pressed and not _snapshot(cfg, run_id).get("outcome"):
                raise FormulabeatError(
                    f"run {run_id}: its host {_shown(snap.get('host'))} did not publish the pane; "
                    "is its worker running?"
                )
            if not args.follow and not ctrl_c.pressed:
                return 0
            ctrl_c.sleep(1)
    return EXIT_INTERRUPTED


class _CtrlC:
    """A Ctrl-C (SIGINT) noted, not raised, while a loop follows a run.

    Raised as KeyboardInterrupt it can land in a finaliser (a Redis
    connection's or a result's ``__del__``), where Python prints it and goes
    on following (the likely cause of a follower in the suite, on a loaded
    machine, still running 30 s after its Ctrl-C). Noted, the loop sees it
    at its next step.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._before: Any = None

    def __enter__(self) -> _CtrlC:
        self._before = signal.signal(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._before)

    def _press(self, signum: int, frame: object) -> None:
        self.pressed = True

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, less once Ctrl-C is pressed."""
        deadline = time.monotonic() + seconds
        while not self.pressed and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def _next_pane(
    cfg: Config, run_id: str, unlike: str | None, ctrl_c: _CtrlC, seconds: float = 10
) -> str | None:
    """The pane the run's host publishes next, other than ``unlike``; None if none came
    within ``seconds``, the run ended or Ctrl-C was pressed."""
    from tasks.app import redis_client
    from workers import registry

    client = redis_client(cfg)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ctrl_c.pressed:
        text = registry.published_pane(client, run_id)
        if text is not None and text != unlike:
            return text
        if _snapshot(cfg, run_id).get("outcome"):
            return None
        ctrl_c.sleep(0.3)
    return None


def _screen_lines(text: str | None) -> list[str]:
    lines = [line.rstrip() for line in (text or "").splitlines()]
    while lines and not lines[-1]:
        lines.pop()  # the screen's empty rows below the text
    return lines


def new_lines(before: str | None, after: str | None) -> list[str]:
    """The lines of screen ``after`` that screen ``before`` did not show.

    A screen scrolls and redraws parts of itself (a TUI's input box): lines
    the two screens share in order were printed already; lines inserted or
    changed are new.
    """
    import difflib

    old, new = _screen_lines(before), _screen_lines(after)
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    return [
        line
        for tag, _, _, start, end in matcher.get_opcodes()
        if tag in ("insert", "replace")
        for line in new[start:end]
    ]


def _print_new_lines(before: str | None, after: str | None) -> None:
    for line in new_lines(before, after):
        print(line)
    sys.stdout.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo project end to end and check every run's outcome."""
    from tasks.demo import run_demo

    return run_demo(keep=args.keep, timeout=args.timeout)


def _broker_problem(exc: BaseException) -> str | None:
    """A one-line explanation of a Redis/broker failure, or None for other errors."""
    import kombu.exceptions
    import redis

    from workers.config import redact_url

    url = (
        redact_url(_broker_shown[-1])
        if _broker_shown and _broker_shown[-1]
        else "the configured Redis"
    )
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, redis.exceptions.AuthenticationError) or "WRONGPASS" in str(seen):
            return f"Redis at {url} refused the password: fix the password in [broker] url"
        if isinstance(seen, redis.exceptions.RedisError | kombu.exceptions.OperationalError):
            return f"cannot reach Redis at {url}: {seen}; is it running? (formulabeat doctor)"
        seen = seen.__cause__ or seen.__context__
    return None


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with EXIT_ERROR, not 2 (escalate's)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and the problem; exit with EXIT_ERROR."""
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (theirs are made of the same class)."""
    from workers.config import CONFIG_ENV

    parser = _Parser(
        prog="formulabeat", description="Run scheduled AI coding agents on Celery, tmux and git."
    )
    parser.add_argument(
        "--config", help=f"config file (default: ${CONFIG_ENV}, then ./formulabeat.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start Redis (embedded default), a worker, beat and Flower")
    up.add_argument("--no-flower", action="store_true", help="do not start Flower")
    up.set_defaults(func=cmd_up)

    for name, func, what in (
        ("worker", cmd_worker, "one Celery worker for this host"),
        ("beat", cmd_beat, "Celery beat, scheduling the agents"),
        ("flower", cmd_flower, "Flower, the Celery monitoring UI"),
    ):
        part = sub.add_parser(name, help=f"run {what}; extra arguments go to Celery")
        part.add_argument("celery_args", nargs=argparse.REMAINDER, help="passed to celery")
        part.set_defaults(func=func)

    run = sub.add_parser("run", help="enqueue a run of an agent now and print its run id")
    run.add_argument("project")
    run.add_argument("agent")
    run.add_argument("--wait", action="store_true", help="follow the run until it ends")
    run.add_argument(
        "--json",
        action="store_true",
        help="print the run (with --wait: its result) as one JSON line",
    )
    run.add_argument("--timeout", type=float, default=None, help="give up waiting after S s")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="recent runs, or one run in detail")
    status.add_argument("run_id", nargs="?")
    status.add_argument("--json", action="store_true")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(func=cmd_status)

    cancel = sub.add_parser("cancel", help="stop a run, from any host")
    cancel.add_argument("run_id")
    cancel.add_argument("--timeout", type=float, default=60.0, help="wait this long for it")
    cancel.set_defaults(func=cmd_cancel)

    hook = sub.add_parser("hook", help="Claude Code hook entry points (installed by formulabeat)")
    hook.add_argument("name")
    for name in ("enable", "disable"):
        flag = sub.add_parser(name, help=f"{name} an agent on every host")
        flag.add_argument("project")
        flag.add_argument("agent")
        flag.set_defaults(func=cmd_enable)

    usage = sub.add_parser("usage", help="tokens and cost of the runs, from the history")
    usage.add_argument("--since", default="7d", help="this many days back, today included (7d)")
    usage.add_argument("--by", choices=USAGE_BY, default="agent", help="group by (agent)")
    usage.add_argument("--json", action="store_true", help="print one JSON object")
    usage.set_defaults(func=cmd_usage)

    doctor = sub.add_parser("doctor", help="check this host: tmux, git, agents, Redis, clock")
    doctor.add_argument(
        "--fix",
        action="store_true",
        help="first apply the agent CLI setup you may delegate (Claude Code: trust of the "
        "worktree root, onboarding with an API key, key approval, bypass acceptance)",
    )
    doctor.set_defaults(func=cmd_doctor)

    for name, func, what in (
        ("attach", cmd_attach, "attach to a run's tmux session"),
        ("logs", cmd_logs, "print a run's agent pane"),
    ):
        part = sub.add_parser(name, help=what)
        part.add_argument("run_id")
        if name == "logs":
            part.add_argument(
                "--follow", "-f", action="store_true", help="print new lines until it ends"
            )
        part.set_defaults(func=func)

    demo = sub.add_parser("demo", help="run a throwaway demo project end to end")
    demo.add_argument("--keep", action="store_true", help="keep the demo directory")
    demo.add_argument("--timeout", type=float, default=120.0, help="give up after S s")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``formulabeat`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hook"]:
        # Hooks run on every tool call of every agent: skip everything else.
        from workers.hooks import main as hook_main

        return hook_main(argv[1:])
    try:
        try:
            return _command(argv)
        finally:
            # Here, not at the interpreter's exit, so that a closed pipe is caught below.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout went away (`formulabeat status | head`): stop
        # quietly, as git does. What is still buffered goes nowhere: else
        # Python's own flush at exit would complain about the pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _command(argv: list[str]) -> int:
    """Parse ``argv`` and run its command; errors formulabeat explains give EXIT_ERROR."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except FormulabeatError as exc:
        print(f"formulabeat: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        message = _broker_problem(exc)
        if message is None:
            raise
        print(f"formulabeat: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
