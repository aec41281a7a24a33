"""What the runs of every host spent, by UTC day, in Redis: daily budgets and the history.

One hash per day (``formulabeat:usage:<YYYY-MM-DD>``); a field per project,
agent, credential, model and kind of token, counted as the transcripts grow,
and the cost in USD beside them. The daily budgets read today's hash; the
``usage`` command reads as many days as it is asked for. Each hash expires
``[history] keep_days`` after its day, so the history never grows past that.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from workers.config import AgentConfig, Budget, Config
from workers.sentinel import kept
from workers.usage import cost_usd

KEY_PREFIX = "formulabeat:usage:"
SEP = "\t"
COST = "cost_usd"


def day_of(moment: dt.datetime | None = None) -> str:
    """The UTC day of ``moment`` (now), as budgets and the history count it."""
    return (moment or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).date().isoformat()


def day_key(day: str) -> str:
    """The Redis hash of one UTC day."""
    return f"{KEY_PREFIX}{day}"


@dataclass(frozen=True)
class Row:
    """One counter of one day: tokens of a kind, or the cost (kind ``cost_usd``)."""

    day: str
    project: str
    agent: str
    credential: str
    model: str
    kind: str
    value: float


# A run's batch of tokens adds to the day's counters once: a batch tried
# again (a failover refused its write after a replica may have taken it, a
# reply lost in a restart) finds its number already applied. A run's
# batches go in order (its lane), numbered by the clock, so a later worker
# of the same run numbers its batches above the earlier worker's.
_ADD_ONCE = """
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
for i = 4, #ARGV, 3 do
  if ARGV[i + 1] == 'f' then
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 2])
  else
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
APPLIED_PREFIX = "formulabeat:usage-applied:"
# Long past any retry of a batch (a lane retries until Redis answers).
APPLIED_TTL_SECONDS = 86400


def record(
    client: redis.Redis,
    agent: AgentConfig,
    fresh: Mapping[str, Mapping[str, int]],
    prices: Mapping[str, Mapping[str, float]],
    keep_days: int,
    *,
    run_id: str,
    batch: int,
    day: str | None = None,
) -> bool:
    """Add tokens a run of ``agent`` just used to the day's counters (one round trip).

    ``batch`` numbers this run's batches in the order they are added: one
    numbered no higher than the run's last applied is not added again
    (False). Kept through a failover (workers.sentinel.kept).
    """
    key = day_key(day or day_of())
    base = SEP.join((agent.project, agent.name, agent.credential))
    changes: list[str | int | float] = []
    for model, kinds in fresh.items():
        for kind, tokens in kinds.items():
            if tokens:
                changes += [f"{base}{SEP}{model}{SEP}{kind}", "i", tokens]
        cost = cost_usd({model: kinds}, prices)
        if cost:
            changes += [f"{base}{SEP}{model}{SEP}{COST}", "f", repr(cost)]
    if not changes:
        return False
    # The day's hash is kept for keep_days after the day ends.
    args = (batch, (keep_days + 1) * 86400, APPLIED_TTL_SECONDS, *changes)
    return bool(kept(client, ("EVAL", _ADD_ONCE, 2, key, APPLIED_PREFIX + run_id, *args))[0])


def rows(client: redis.Redis, days: int, today: str | None = None) -> list[Row]:
    """Every counter of the last ``days`` UTC days (today included)."""
    last = dt.date.fromisoformat(today or day_of())
    wanted = [(last - dt.timedelta(days=n)).isoformat() for n in range(days)]
    pipe = client.pipeline(transaction=False)
    for day in wanted:
        pipe.hgetall(day_key(day))
    found = []
    for day, fields in zip(wanted, pipe.execute(), strict=True):
        for field, value in fields.items():
            parts = _text(field).split(SEP)
            if len(parts) != 5:
                continue
            try:
                number = float(_text(value))
            except ValueError:
                continue
            project, agent, credential, model, kind = parts
            found.append(Row(day, project, agent, credential, model, kind, number))
    return found


def spent_today(client: redis.Redis, budget: Budget, today: str | None = None) -> tuple[int, float]:
    """(tokens, USD) that ``budget``'s project or credential spent today."""
    tokens, cost = 0, 0.0
    position = 0 if budget.kind == "project" else 2
    for row in rows(client, 1, today):
        subject = (row.project, row.agent, row.credential)[position]
        if subject != budget.name:
            continue
        if row.kind == COST:
            cost += row.value
        else:
            tokens += int(row.value)
    return tokens, cost


def budget_reason(client: redis.Redis, cfg: Config, agent: AgentConfig) -> str | None:
    """Why a new run of ``agent`` is skipped for a spent daily budget (None: it may run)."""
    today = day_of()
    for budget in cfg.budgets_of(agent):
        tokens, cost = spent_today(client, budget, today)
        subject = f"{budget.kind} {budget.name}"
        if budget.max_tokens is not None and tokens >= budget.max_tokens:
            return (
                f"budget: {subject} has used {tokens} tokens today (UTC {today}), "
                f"its daily max_tokens is {budget.max_tokens}"
            )
        if budget.max_cost_usd is not None and cost >= budget.max_cost_usd:
            return (
                f"budget: {subject} has spent ${cost:.4f} today (UTC {today}), "
                f"its daily max_cost_usd is {budget.max_cost_usd:g}"
            )
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
