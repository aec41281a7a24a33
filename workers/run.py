"""A run: one value passed along the task chain and serialised as JSON.

It carries everything a later step (possibly in another task) needs: names,
paths on its host, the lease token, the phase history and, once ended, the
outcome. No run state lives in globals.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

# Outcomes a run can end with.
DONE = "done"
MERGED = "merged"
FAILED = "failed"
ESCALATE = "escalate"
CRASHED = "crashed"
IDLE_TIMEOUT = "idle_timeout"
SKIPPED = "skipped"
LOST_LEASE = "lost_lease"
CANCELLED = "cancelled"
LOST = "lost"
OVER_BUDGET = "over_budget"
OUTCOMES = (
    DONE,
    MERGED,
    FAILED,
    ESCALATE,
    CRASHED,
    IDLE_TIMEOUT,
    SKIPPED,
    LOST_LEASE,
    CANCELLED,
    LOST,
    OVER_BUDGET,
)


# The Celery state a finished run is stored in: only a run that did its work
# looks like a success (Flower, AsyncResult); one that did not run is REVOKED.
SUCCEEDED = (DONE, MERGED)
NOT_RUN = (SKIPPED, CANCELLED)
# The Celery states of a finished run: any other is a live run's (or PENDING).
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


def final_state(outcome: str | None) -> str:
    """SUCCESS (done, merged), REVOKED (skipped, cancelled) or FAILURE (any other)."""
    if outcome in SUCCEEDED:
        return "SUCCESS"
    return "REVOKED" if outcome in NOT_RUN else "FAILURE"


class RunEnded(Exception):
    """How a run that did not succeed is stored: its result dict is the one argument.

    ``AsyncResult(run_id).result`` is then this exception (``.get()`` raises
    it), and ``.result.result`` the dict, as for a successful run.
    """

    @property
    def result(self) -> dict[str, Any]:
        """The run's result dict."""
        value = self.args[0] if self.args else {}
        return value if isinstance(value, dict) else {}

    def __str__(self) -> str:
        return f"{self.result.get('outcome')}: {self.result.get('reason') or ''}".rstrip(": ")


class RunWaiting(Exception):
    """How a run waiting out an API error is stored (Celery's ``RETRY`` state).

    Celery keeps an exception for a task in ``RETRY``: ``AsyncResult(run_id)
    .info`` is this, and its ``.result`` the run's snapshot, whose
    ``waiting`` says the error, the try and when the run goes on.
    """

    @property
    def result(self) -> dict[str, Any]:
        """The run's snapshot."""
        value = self.args[0] if self.args else {}
        return value if isinstance(value, dict) else {}

    def __str__(self) -> str:
        waiting = self.result.get("waiting") or {}
        return (
            f"{waiting.get('error')} (try {waiting.get('try')} of {waiting.get('of')}, "
            f"goes on at {waiting.get('until_text')})"
        )


def now_iso() -> str:
    """The current time as an ISO 8601 UTC timestamp with microseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


@dataclass
class Run:
    """One agent run, from the moment a worker takes it until it is reported."""

    id: str
    project: str
    agent: str
    host: str
    started_at: str = field(default_factory=now_iso)
    state: str = "PREPARING"
    run_dir: str | None = None
    worktree: str | None = None
    phase_file: str | None = None
    prompt_file: str | None = None
    session: str | None = None
    session_id: str | None = None
    pane_id: str | None = None
    lease_key: str | None = None
    lease_token: str | None = None
    lease_fence: int = 0
    # The credential whose session slot the run holds, if it took one.
    slot: str | None = None
    formula_source: str | None = None
    # What the agent was given: the SHA-256 of the prompt's UTF-8 text.
    prompt_sha256: str | None = None
    phases: list[dict[str, str]] = field(default_factory=list)
    outcome: str | None = None
    final_phase: str | None = None
    reason: str | None = None
    finished_at: str | None = None
    worktree_preserved: bool = False
    recoveries: int = 0
    # Starts done again because the worker died while starting the agent (not
    # the agent's crash: they leave its one recovery untouched).
    restarts: int = 0
    nudges: int = 0
    mode: str = "session"
    output_tail: str | None = None
    # How far the hooks' phase journal has been read, and how many recorded
    # phases it has confirmed (the rest were seen only in the phase file).
    journal_offset: int = 0
    journal_confirmed: int = 0
    # The agent CLI's conversation: the id formulabeat gave it, and its transcript.
    session_uuid: str | None = None
    transcript: str | None = None
    # How each recovery restarted the agent: "resumed" (its conversation kept)
    # or "reinjected" (a new conversation, the prompt again).
    recovered_by: list[str] = field(default_factory=list)
    # Tokens by model and kind, and their cost from the config's prices (None:
    # a model without a price); a one-shot CLI's own figure beside it.
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    cost_usd: float | None = 0.0
    cli_cost_usd: float | None = None
    # Waits for the API (workers.apierrors): how many, each with its error,
    # the one going on now (Unix time it ends), the seconds waited in all
    # (not working time: max_runtime leaves them out), and the time of the
    # last API-error record judged (a record is judged once, adopters too).
    api_retries: int = 0
    api_waits: list[dict[str, Any]] = field(default_factory=list)
    waiting_until: float | None = None
    waited_seconds: float = 0.0
    api_error_seen: float = 0.0

    @property
    def ended(self) -> bool:
        """Whether an outcome has been decided (later steps only clean up)."""
        return self.outcome is not None

    def add_phase(self, phase: str, at: str | None = None) -> None:
        """Record a phase change (the phase file's new first line)."""
        self.phases.append({"phase": phase, "at": at or now_iso()})
        self.final_phase = phase

    def end(self, outcome: str, reason: str | None = None) -> None:
        """Decide the outcome; the first decision wins."""
        if self.outcome is None:
            self.outcome = outcome
            self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form passed between tasks."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        """Rebuild a run from :meth:`to_dict` output."""
        return cls(**data)

    def progress(self) -> dict[str, Any]:
        """The meta shown while the run lives (result backend, registry)."""
        return {
            "run_id": self.id,
            "project": self.project,
            "agent": self.agent,
            "state": self.state,
            "host": self.host,
            "session": self.session,
            "worktree": self.worktree,
            "started_at": self.started_at,
            "phases": list(self.phases),
            "final_phase": self.final_phase,
            "session_uuid": self.session_uuid,
            "usage": self.usage,
            "cost_usd": self.cost_usd,
            "api_retries": self.api_retries,
            "api_waits": list(self.api_waits),
            "waiting": self.api_waits[-1] if self.waiting_until is not None else None,
        }

    def result(self) -> dict[str, Any]:
        """The final result dict stored under the run id."""
        return {
            **self.progress(),
            "outcome": self.outcome,
            "reason": self.reason,
            "finished_at": self.finished_at,
            "formula_source": self.formula_source,
            "prompt_sha256": self.prompt_sha256,
            "worktree_preserved": self.worktree_preserved,
            "recoveries": self.recoveries,
            "restarts": self.restarts,
            "recovered_by": self.recovered_by,
            "transcript": self.transcript,
            "cli_cost_usd": self.cli_cost_usd,
            "nudges": self.nudges,
            "mode": self.mode,
            "output_tail": self.output_tail,
        }
