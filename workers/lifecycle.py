"""A run's life on its host: prepare, start the session, monitor, finish.

These are the steps the Celery tasks call, one each. They change the run in
place and raise only typed errors; progress goes to a ``ProgressSink`` that
the task layer supplies, so this module never imports Celery.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import redis

from workers import guards, quota, registry, rundir, spending, worktrees
from workers import launcher as launcher_module
from workers import run as outcomes
from workers.agents import Launch, driver_for
from workers.agents.base import OneshotReport
from workers.analysis import structural_report
from workers.apierrors import ApiFailure, format_time, write_record
from workers.config import Config
from workers.environment import agent_env
from workers.errors import ConfigError, ContextError, PhaseFileError, RepoError, SessionError
from workers.forge import git_auth_env, resolve_identity
from workers.formula import Formula, load_formula
from workers.hooks import hook_command
from workers.lanes import with_redis
from workers.locks import Lease, agent_lock_key, holder, release_run
from workers.monitor import MonitorExit, SessionWatch, judge_api_error
from workers.oneshot import run_oneshot, wait_out
from workers.phases import TERMINAL, read_phase
from workers.prompt import build_prompt
from workers.repos import ensure_ops_repo, load_profile_formula, ops_commit_and_push
from workers.run import Run, now_iso
from workers.slots import Slots
from workers.statedir import new_run_dir, private_dir, runs_dir, write_private
from workers.tmux import AgentSession, TmuxServer, session_name
from workers.usage import Meter, Usage, cost_usd
from workers.usage import add as add_usage

log = logging.getLogger("formulabeat.lifecycle")
MAX_PROMPT_BYTES = 1024 * 1024
# Of a one-shot CLI's answer, what the result keeps.
TAIL_CHARS = 2000
# A crashed session is started again once in the same worktree; a second
# crash ends the run (as the original's phase callback did).
MAX_RECOVERIES = 1


class ProgressSink(Protocol):
    """Where a step publishes the run's state (the task layer's Reporter)."""

    def progress(self, run: Run, state: str) -> None:
        """Publish ``state`` with the run's snapshot."""


def prepare(run: Run, cfg: Config, client: redis.Redis, sink: ProgressSink) -> None:
    """Guards, lease, formula, prompt and worktree; ends the run if any of them says no."""
    if not admit(run, cfg, client, sink):
        return
    formula = load_run_formula(run, cfg)
    agent = cfg.agent(run.project, run.agent)
    program = agent.argv()[0]
    driver_for(agent)  # a driver the config names must be known
    if shutil.which(program, path=agent_env(agent).get("PATH")) is None:
        raise SessionError(
            f"agent command {program!r} (agents {agent.key}: command) not found on PATH"
        )
    make_run_dir(run, cfg, formula)


def admit(run: Run, cfg: Config, client: redis.Redis, sink: ProgressSink) -> bool:
    """Cancel request, skip guards, the agent's lease and a credential slot; False ends it."""
    agent = cfg.agent(run.project, run.agent)
    who = registry.cancel_requested(client, run.id)
    if who:
        run.end(outcomes.CANCELLED, f"cancelled by {who} before it started")
        return False
    reason = (
        guards.skip_reason(client, agent)
        or spending.budget_reason(client, cfg, agent)
        or _limit_reason(run, cfg, client)
    )
    if reason:
        run.end(outcomes.SKIPPED, reason)
        return False
    key = agent_lock_key(run.project, run.agent)
    lease = Lease.acquire(client, key, run.id, run.host, cfg.monitor.lease_seconds)
    if lease is None:
        owner = holder(client, key)
        who = f"run {owner.run_id} on host {owner.host}" if owner else "another run"
        run.end(outcomes.SKIPPED, f"agent {agent.key} is already running: {who} holds its lease")
        return False
    run.lease_key, run.lease_token, run.lease_fence = lease.key, lease.token, lease.fence
    sink.progress(run, "PREPARING")
    return _take_slot(run, cfg, client, sink)


def _limit_reason(run: Run, cfg: Config, client: redis.Redis) -> str | None:
    """Why a run is not started while its credential is limited (and, if the agent says
    so, the run sent again for after the reset); None while it is not limited."""
    agent = cfg.agent(run.project, run.agent)
    limit = quota.limited(client, agent.credential)
    if limit is None:
        return None
    if agent.on_limit != "defer":
        return limit.reason()
    due = quota.due_after_reset(limit.until)
    again = str(uuid.uuid4())
    quota.defer(client, again, run.project, run.agent, due)
    return f"{limit.reason()}; sent again for {format_time(due)} as run {again}"


def load_run_formula(run: Run, cfg: Config) -> Formula:
    """The agent's formula (its forge identity's .profile one first) and the ops repo."""
    agent = cfg.agent(run.project, run.agent)
    project = cfg.project(run.project)
    token = os.environ.get(agent.forge_token_env) or None
    login = resolve_identity(project.forge_url, token) if token else None
    formula_path, run.formula_source = load_profile_formula(
        project.forge_url, token, cfg.state_dir / "profiles", agent.formula, login
    )
    formula = load_formula(formula_path)
    if project.ops_repo_root is not None:
        ensure_ops_repo(
            project.ops_repo_root,
            project.forge_url,
            project.ops_repo,
            project.primary_branch,
            git_auth_env(login, token) if login and token else {"GIT_TERMINAL_PROMPT": "0"},
        )
    return formula


def make_run_dir(run: Run, cfg: Config, formula: Formula) -> None:
    """The run's private directory: prompt, worktree, the driver's files, the launch file.

    Everything that can be refused (the prompt's size) is checked before
    the worktree is made.
    """
    agent = cfg.agent(run.project, run.agent)
    project = cfg.project(run.project)
    oneshot = agent.mode == "oneshot"
    run.mode = agent.mode
    # One-shot runs work from the forge's latest primary branch, as the
    # original's formula_worktree_setup did; sessions from the repo's HEAD.
    ref = worktrees.fresh_ref(project.repo_root, project.primary_branch) if oneshot else "HEAD"
    run_dir = new_run_dir(cfg.state_dir, run.id)
    run.run_dir = str(run_dir)
    worktree = worktrees.worktree_path(run_dir, run.id)
    phase_file = run_dir / rundir.PHASE
    scratch = scratch_file(cfg, run) if agent.scratch else None
    parts = build_prompt(
        run_id=run.id,
        project=project,
        agent=agent,
        formula=formula,
        formula_source=run.formula_source or str(agent.formula),
        phase_file=str(phase_file),
        worktree=str(worktree),
        protocol=not oneshot,
        scratch_file=scratch,
        graph_json=structural_report(project),
    )
    size = len(parts.prompt.encode("utf-8"))
    if size > MAX_PROMPT_BYTES:
        raise ContextError(f"the prompt is {size} bytes, over the {MAX_PROMPT_BYTES} byte limit")
    run.prompt_sha256 = hashlib.sha256(parts.prompt.encode("utf-8")).hexdigest()
    write_private(phase_file, "")
    run.phase_file = str(phase_file)
    write_private(run_dir / rundir.PROMPT, parts.prompt)
    run.prompt_file = str(run_dir / rundir.PROMPT)
    write_private(run_dir / rundir.CONTEXT, parts.footer + "\n")
    worktrees.add_worktree(project.repo_root, worktree, ref)
    run.worktree = str(worktree)
    driver = driver_for(agent)
    if driver.names_sessions:
        run.session_uuid = str(uuid.uuid4())
    driver.install(agent, launch_of(run, cfg))
    if oneshot:
        write_launch(run, cfg)


def write_launch(run: Run, cfg: Config, resume: bool = False) -> Launch:
    """The launch file of the run's next session: its argv, its whole environment, its cwd."""
    assert run.run_dir and run.worktree
    agent = cfg.agent(run.project, run.agent)
    driver = driver_for(agent)
    launch = launch_of(run, cfg, resume)
    spec = {
        "argv": driver.command(agent, launch, agent.mode == "oneshot"),
        "env": {**launch.env, **driver.launch_env(agent, launch)},
        "cwd": run.worktree,
        "exit_file": str(Path(run.run_dir) / rundir.EXIT_STATUS),
        "nice": agent.nice,
    }
    write_private(Path(run.run_dir) / rundir.LAUNCH, json.dumps(spec))
    return launch


def launch_of(run: Run, cfg: Config, resume: bool = False) -> Launch:
    """What the agent's driver knows of the run (its environment included)."""
    assert run.run_dir and run.worktree and run.phase_file
    agent = cfg.agent(run.project, run.agent)
    driver = driver_for(agent)
    env = agent_env(agent, credentials=driver.credentials)
    for name, value in driver.environment_defaults().items():
        env.setdefault(name, value)
    env.update(
        {
            "PHASE_FILE": run.phase_file,
            "FORMULABEAT_RUN_ID": run.id,
            "FORMULABEAT_RUN_DIR": run.run_dir,
            "FORMULABEAT_PROJECT": run.project,
            "FORMULABEAT_AGENT": agent.name,
        }
    )
    return Launch(
        run_id=run.id,
        run_dir=Path(run.run_dir),
        worktree=Path(run.worktree),
        worktree_root=runs_dir(cfg.state_dir),
        primary_branch=cfg.project(run.project).primary_branch,
        hook_command=tuple(hook_command()),
        env=env,
        session_uuid=run.session_uuid,
        resume=resume,
        repo_root=cfg.project(run.project).repo_root,
    )


def _take_slot(run: Run, cfg: Config, client: redis.Redis, sink: ProgressSink) -> bool:
    """Hold one of the agent credential's session slots, waiting as configured."""
    credential = cfg.credential(cfg.agent(run.project, run.agent).credential)
    slots = Slots(client, credential.name, cfg.monitor.lease_seconds)
    if not slots.try_acquire(run.id, credential.max_sessions):
        sink.progress(run, "WAITING_FOR_SLOT")
        lease = Lease(run.lease_key or "", run.lease_token or "", slots.ttl_ms, run.lease_fence)
        renewed = time.monotonic()

        def give_up() -> bool:
            # The wait may outlast the lease: it is kept meanwhile.
            nonlocal renewed
            if time.monotonic() - renewed >= cfg.monitor.lease_seconds / 3:
                if not lease.extend(client) and not _reassert(run, lease, client):
                    run.end(outcomes.LOST_LEASE, "the agent's lease is no longer ours")
                    return True
                renewed = time.monotonic()
            return registry.cancel_requested(client, run.id) is not None

        if not slots.acquire(run.id, credential.max_sessions, credential.wait, give_up):
            if run.ended:
                return False
            who = registry.cancel_requested(client, run.id)
            if who:
                run.end(outcomes.CANCELLED, f"cancelled by {who} while waiting for a session slot")
            else:
                busy = ", ".join(slots.holders()) or "runs that have since ended"
                run.end(
                    outcomes.SKIPPED,
                    f"credential {credential.name!r}: all {credential.max_sessions} session "
                    f"slot(s) stayed busy for {credential.wait:g} s (held by {busy})",
                )
            return False
        sink.progress(run, "PREPARING")
    run.slot = credential.name
    return True


def undo_prepare(run: Run, cfg: Config, client: redis.Redis) -> None:
    """Give back what a preparation cut short took: its lease, slot and run directory.

    A worker that died while preparing may have made the run directory (and
    its worktree) without recording it: the run's own are found by name.
    """
    release_claims(run, client, cfg)
    for run_dir in runs_dir(cfg.state_dir).glob(f"{run.id[:8]}-*"):
        worktree = worktrees.worktree_path(run_dir, run.id)
        try:
            ours = worktree.exists() or run.id in (run_dir / rundir.PROMPT).read_text("utf-8")
        except OSError:
            ours = str(run_dir) == run.run_dir
        if not ours:
            continue
        worktrees.remove_worktree(cfg.project(run.project).repo_root, worktree)
        shutil.rmtree(run_dir, ignore_errors=True)


def release_claims(run: Run, client: redis.Redis, cfg: Config) -> None:
    """Give back the run's lease and session slot, if it still holds them.

    A worker killed between taking them and publishing that left them
    unrecorded in the run's state: whoever ends the run (its adopter, the
    reaper) finds them by the run's id. No other run holds a lease or a
    slot under this run's id, so that is always right.
    """
    credentials = {run.slot} if run.slot else set()
    with contextlib.suppress(ConfigError):
        credentials.add(cfg.agent(run.project, run.agent).credential)

    def release() -> None:
        # By the run's id, not the token its state names: a preparation that
        # started over took the lease again under a token the dead worker may
        # not have published (the lease was then never given back, and the
        # run prepared anew was skipped as "already running" by itself).
        release_run(client, run.lease_key or agent_lock_key(run.project, run.agent), run.id)
        for credential in credentials:
            Slots(client, credential, 0).release(run.id)

    # Through a restart or a failover, for as long as the lease would last:
    # given up earlier, the agent stays locked until it expires.
    with contextlib.suppress(redis.exceptions.RedisError):
        with_redis(release, cfg.monitor.lease_seconds)


def scratch_file(cfg: Config, run: Run) -> Path:
    """The agent's scratch file: it outlives runs, so it lives beside them."""
    return private_dir(cfg.state_dir / "scratch") / f"{run.project}-{run.agent}.md"


def session_of(run: Run, cfg: Config) -> AgentSession:
    """The run's tmux session, by its recorded ids (SessionError: it has none)."""
    if not (run.session and run.session_id and run.pane_id):
        raise SessionError(f"run {run.id} has no session")
    return AgentSession(
        server=TmuxServer(cfg.tmux_socket),
        name=run.session,
        session_id=run.session_id,
        pane_id=run.pane_id,
        exit_file=Path(run.run_dir) / rundir.EXIT_STATUS if run.run_dir else None,
    )


def start(run: Run, cfg: Config, sink: ProgressSink, resume: bool = False) -> None:
    """Start the agent in tmux, wait until it is ready, deliver the prompt and see it taken.

    ``resume``: the CLI goes on with the run's conversation and is told to
    finish, instead of being given the whole prompt again.
    """
    agent = cfg.agent(run.project, run.agent)
    assert run.run_dir and run.worktree and run.prompt_file
    if agent.mode == "oneshot":
        # A one-shot agent is a child of the monitoring task, started there.
        return
    run_dir = Path(run.run_dir)
    for stale in rundir.SESSION_MARKERS:
        (run_dir / stale).unlink(missing_ok=True)
    launch = write_launch(run, cfg, resume)
    launcher = [sys.executable, "-I", "-S", str(Path(launcher_module.__file__).resolve())]
    session = AgentSession.start(
        TmuxServer(cfg.tmux_socket),
        session_name(run.project, run.agent, run.id),
        Path(run.worktree),
        [*launcher, str(run_dir / rundir.LAUNCH)],
        run_dir / rundir.EXIT_STATUS,
    )
    run.session, run.session_id, run.pane_id = session.name, session.session_id, session.pane_id
    sink.progress(run, "STARTING")
    driver = driver_for(agent)
    driver.wait_ready(session, agent, launch, cfg.monitor)
    driver.deliver(session, agent, launch, cfg.monitor)
    (run_dir / rundir.PROMPT_DELIVERED).touch()
    if driver.resumes:
        remember_session(run)
    sink.progress(run, "RUNNING")


def remember_session(run: Run) -> None:
    """Record the conversation and its transcript the CLI named to the prompt-submit hook.

    A CLI that names its own conversations (Codex) is resumed by that id
    after a crash; one formulabeat named (Claude Code, Gemini CLI) confirms
    the id it was given.
    """
    assert run.run_dir
    try:
        record = json.loads((Path(run.run_dir) / rundir.PROMPT_SUBMITTED).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(record, dict):
        return
    session_id, transcript = record.get("session_id"), record.get("transcript_path")
    if isinstance(session_id, str) and session_id:
        run.session_uuid = session_id
    if isinstance(transcript, str) and transcript:
        run.transcript = transcript


def prompt_delivered(run: Run) -> bool:
    """Whether the run's current session got its prompt (known on its host only)."""
    if run.run_dir is None:
        return False
    run_dir = Path(run.run_dir)
    return (run_dir / rundir.PROMPT_DELIVERED).exists() or (
        run_dir / rundir.PROMPT_SUBMITTED
    ).exists()


def renewer(run: Run, cfg: Config, client: redis.Redis) -> Callable[[], bool | None]:
    """Renew the run's lease (and session slot): True, False (not ours) or None (no answer)."""
    agent = cfg.agent(run.project, run.agent)
    assert run.lease_key and run.lease_token
    ttl_ms = int(cfg.monitor.lease_seconds * 1000)
    lease = Lease(key=run.lease_key, token=run.lease_token, ttl_ms=ttl_ms, fence=run.lease_fence)
    credential = cfg.credential(agent.credential)
    slots = Slots(client, credential.name, cfg.monitor.lease_seconds) if run.slot else None

    def renew() -> bool | None:
        try:
            if not lease.extend(client) and not _reassert(run, lease, client):
                return False
            # A slot that expired (Redis lost it) is taken again while there is room.
            return slots is None or (
                slots.renew(run.id) or slots.try_acquire(run.id, credential.max_sessions)
            )
        except redis.exceptions.RedisError:
            return None

    return renew


def _reassert(run: Run, lease: Lease, client: redis.Redis) -> bool:
    """Take back the run's lease if Redis lost it and no verdict ended the run meanwhile."""
    if (registry.get(client, run.id) or {}).get("outcome"):
        return False  # reaped while its host was silent: the verdict stands
    if not lease.reassert(client):
        return False
    log.warning("run %s: its lease was gone from Redis (lost writes); taken back", run.id)
    return True


def monitor_oneshot(
    run: Run,
    cfg: Config,
    client: redis.Redis,
    on_phase: Callable[[Run], None],
    on_wait: Callable[[Run, ApiFailure], None],
    sink: ProgressSink,
) -> None:
    """Run a one-shot agent as a child of this task and follow it to its outcome.

    A run of the CLI that ends on a transient API error is waited out (its
    lease kept) and the CLI run again: resuming its conversation with the go-on
    message where it can, else with the whole prompt.
    """
    agent = cfg.agent(run.project, run.agent)
    driver = driver_for(agent)
    assert run.run_dir

    def cancelled() -> str | None:
        try:
            return registry.cancel_requested(client, run.id)
        except redis.exceptions.RedisError:
            return None

    renew = renewer(run, cfg, client)
    stdin: Path | None = None
    reports: list[OneshotReport] = []
    while True:
        ended = run_oneshot(run, agent, cfg.monitor, on_phase, renew, cancelled, stdin)
        report = driver.oneshot_report(_read_output(run), launch_of(run, cfg))
        if report is not None:
            reports.append(report)
        if ended.outcome != outcomes.FAILED or _terminal_phase(run):
            break
        failed = driver.oneshot_api_error(_read_output(run), launch_of(run, cfg))
        if failed is not None:
            write_record(run.run_dir, failed)
        verdict = judge_api_error(run, agent, driver.api_failure)
        if verdict is None:
            break
        if isinstance(verdict, MonitorExit):
            ended = verdict
            break
        on_wait(run, verdict)
        stopped = wait_out(run, agent, cfg.monitor, renew, cancelled)
        if stopped is not None:
            ended = stopped
            break
        stdin = _oneshot_go_on(run, cfg)
        sink.progress(run, "RUNNING")
    run.end(ended.outcome, ended.reason)
    if reports:
        # Each run of the CLI reports its own figures (measured with 2.1.197: a
        # resumed `-p` run's usage is its own, not the conversation's).
        for report in reports:
            for model, kinds in report.usage.items():
                add_usage(run.usage, model, kinds)
        costs = [r.cost_usd for r in reports]
        run.cli_cost_usd = None if None in costs else sum(c or 0.0 for c in costs)
        run.cost_usd = cost_usd(run.usage, cfg.prices)
        run.output_tail = reports[-1].text[-TAIL_CHARS:]


def _read_output(run: Run) -> str:
    assert run.run_dir
    try:
        return (Path(run.run_dir) / rundir.OUTPUT).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _terminal_phase(run: Run) -> bool:
    assert run.phase_file
    try:
        reading = read_phase(run.phase_file)
    except PhaseFileError:
        return True  # the run fails for it; nothing to wait for
    return reading is not None and reading.phase in TERMINAL


def _oneshot_go_on(run: Run, cfg: Config) -> Path:
    """The next one-shot run of the CLI after a wait: its launch file; what it reads."""
    assert run.run_dir
    run_dir = Path(run.run_dir)
    driver = driver_for(cfg.agent(run.project, run.agent))
    # The CLI took the prompt, so a conversation may exist to resume (by the id
    # its prompt-submit hook named): one its transcript still holds (Gemini CLI
    # keeps none of a session whose only turn failed, measured with 0.61.0).
    if driver.resumes and (run_dir / rundir.PROMPT_SUBMITTED).exists():
        remember_session(run)
    resume = resumable(run, cfg)
    if resume:
        write_private(run_dir / rundir.RESUME, go_on_message(run) + "\n")
    else:
        _new_conversation(run, driver.names_sessions)
    write_launch(run, cfg, resume)
    if run.api_waits:
        run.api_waits[-1]["went_on"] = "resumed" if resume else "reinjected"
    return run_dir / (rundir.RESUME if resume else rundir.PROMPT)


def session_watch(
    run: Run,
    cfg: Config,
    client: redis.Redis,
    on_phase: Callable[[Run], None],
    on_usage: Callable[[Run, Usage], None],
    on_wait: Callable[[Run, ApiFailure], None],
) -> SessionWatch:
    """What the host's watcher needs to follow the run's session (count its tokens, and
    judge the API errors that end its turns)."""
    agent = cfg.agent(run.project, run.agent)
    driver = driver_for(agent)

    def explain(how: str, screen: str) -> str:
        return driver.ended(how, screen, agent, launch_of(run, cfg))

    meter = Meter(run, cfg.prices, driver.transcript_format) if driver.transcripts else None
    return SessionWatch(
        run,
        session_of(run, cfg),
        agent,
        cfg.monitor,
        on_phase,
        renewer(run, cfg, client),
        explain,
        meter,
        on_usage,
        driver.api_failure,
        on_wait,
    )


def kill_session(run: Run, cfg: Config) -> None:
    """Kill the run's tmux session (gone already is fine).

    By its exact name, which is the run's own: it also finds a session that
    a worker created and died before recording.
    """
    name = session_name(run.project, run.agent, run.id)
    with contextlib.suppress(SessionError):
        TmuxServer(cfg.tmux_socket).cmd("kill-session", "-t", f"={name}")


def may_recover(run: Run, ended: MonitorExit) -> bool:
    """Whether a session that ended so is started again (a first crash only)."""
    return ended.outcome == outcomes.CRASHED and run.recoveries < MAX_RECOVERIES


GO_ON_MESSAGE = (
    "The API was unavailable ({error}), so formulabeat paused run {run_id} and now lets "
    "you go on (wait {attempt} of {of}). Your conversation above is intact: carry on with "
    "the formula where you stopped, without redoing the steps already done, and finish by "
    "writing the phase: echo 'PHASE:done' > '{phase}' (or PHASE:failed with a Reason: line)."
)


def go_on_message(run: Run) -> str:
    """What the agent is told when its wait for the API is over (never the whole prompt)."""
    wait = run.api_waits[-1] if run.api_waits else {}
    return GO_ON_MESSAGE.format(
        error=wait.get("error", "an API error"),
        run_id=run.id,
        attempt=wait.get("try", 1),
        of=wait.get("of", 1),
        phase=run.phase_file,
    )


RESUME_MESSAGE = (
    "Your session of run {run_id} ended unexpectedly and was restarted; the "
    "conversation above is intact. Carry on with the formula where you left off, "
    "and finish by writing the phase: echo 'PHASE:done' > '{phase}' "
    "(or PHASE:failed with a Reason: line)."
)


def recover(run: Run, cfg: Config, sink: ProgressSink) -> None:
    """Start the crashed session again in the same worktree (raises SessionError).

    A CLI that keeps its conversation and has a transcript of it is resumed
    and told to finish; otherwise a new conversation gets the whole prompt.
    """
    assert run.run_dir and run.phase_file
    run.recoveries += 1
    resume = resumable(run, cfg)
    if resume:
        message = RESUME_MESSAGE.format(run_id=run.id, phase=run.phase_file)
        write_private(Path(run.run_dir) / rundir.RESUME, message + "\n")
    run.recovered_by.append("resumed" if resume else "reinjected")
    sink.progress(run, "RECOVERING")
    run.recovered_by[-1] = restart(run, cfg, sink, resume)


def resumable(run: Run, cfg: Config) -> bool:
    """Whether the run's CLI can go on with its conversation in a new session."""
    driver = driver_for(cfg.agent(run.project, run.agent))
    return (
        driver.resumes
        and run.session_uuid is not None
        and run.transcript is not None
        and Path(run.transcript).exists()
    )


def restart(run: Run, cfg: Config, sink: ProgressSink, resume: bool) -> str:
    """Start the run's agent in a new session: "resumed" (its conversation, told what
    resume.md says) or "reinjected" (a new conversation, the whole prompt)."""
    driver = driver_for(cfg.agent(run.project, run.agent))
    if not resume:
        _new_conversation(run, driver.names_sessions)
        start(run, cfg, sink)
        return "reinjected"
    try:
        start(run, cfg, sink, resume=True)
        return "resumed"
    except SessionError as exc:
        # A CLI killed early may have a transcript it cannot resume ("No
        # conversation found"): a new conversation gets the whole prompt.
        log.warning("run %s: could not resume (%s); giving the prompt again", run.id, exc)
        kill_session(run, cfg)
        _new_conversation(run, driver.names_sessions)
        start(run, cfg, sink)
        return "reinjected"


def _new_conversation(run: Run, named: bool) -> None:
    """Forget the run's conversation: the next session starts a new one (named by us or not)."""
    run.session_uuid = str(uuid.uuid4()) if named else None


def finish(run: Run, cfg: Config, client: redis.Redis) -> None:
    """Kill the session, release the lease, remove (or keep) the worktree."""
    if run.outcome is None:
        run.end(outcomes.FAILED, "the run ended without an outcome")
    if run.session_id:
        with contextlib.suppress(SessionError):
            session_of(run, cfg).kill()
    if run.lease_key and run.lease_token:
        lease = Lease(key=run.lease_key, token=run.lease_token, ttl_ms=0, fence=run.lease_fence)
        try:
            lost = lease.lost_because(client)
        except redis.exceptions.RedisError as exc:
            lost = f"Redis did not answer ({exc})"
        if lost is None:
            _commit_ops(run, cfg)
        else:
            # Another run may hold the agent now: no side effect on shared state.
            log.warning(
                "run %s: lease %s is no longer ours (%s); ops not pushed", run.id, lease.fence, lost
            )
    release_claims(run, client, cfg)
    if run.run_dir:
        run_dir = Path(run.run_dir)
        run.nudges = _count(run_dir / rundir.NUDGES)
        if run.outcome == outcomes.CRASHED:
            worktrees.preserve(run_dir, run.reason or "crashed")
            run.worktree_preserved = True
        else:
            if run.worktree:
                worktrees.remove_worktree(cfg.project(run.project).repo_root, Path(run.worktree))
            shutil.rmtree(run_dir, ignore_errors=True)
    run.finished_at = now_iso()
    run.state = (run.outcome or outcomes.FAILED).upper()


def _commit_ops(run: Run, cfg: Config) -> None:
    """Commit and push the agent's ops files when they changed (a failure is logged)."""
    agent = cfg.agent(run.project, run.agent)
    project = cfg.project(run.project)
    if not agent.ops_commit or project.ops_repo_root is None or run.outcome == outcomes.SKIPPED:
        return
    token = os.environ.get(agent.forge_token_env) or None
    login = resolve_identity(project.forge_url, token) if token else None
    env = git_auth_env(login, token) if login and token else {"GIT_TERMINAL_PROMPT": "0"}
    message = f"{run.agent}: run {run.id} ({run.outcome})"
    try:
        ops_commit_and_push(
            project.ops_repo_root, message, list(agent.ops_commit), project.primary_branch, env
        )
    except RepoError as exc:
        log.warning("run %s: ops commit failed: %s", run.id, exc)


def _count(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
