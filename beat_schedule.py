"""Celery beat's schedule, built from the agents in ``formulabeat.toml``.

One entry per agent, named ``<project>/<agent>``, sending ``formulabeat.run``
with the crontab from the config. An agent with ``run_on_start = true`` is
also due the moment a beat starts with no record of its previous run.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from celery.schedules import crontab

from workers.config import Config

RUN_TASK = "formulabeat.run"
DEFAULT_QUEUE = "formulabeat"
CLEANUP_TASK = "formulabeat.cleanup"
REAP_TASK = "formulabeat.reap"
REAP_EVERY_SECONDS = 15
# A last run far in the past makes the entry due at once on a fresh beat.
_LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def crontab_of(schedule: str) -> crontab:
    """Celery's crontab for a validated 5-field schedule string."""
    minute, hour, day_of_month, month_of_year, day_of_week = schedule.split()
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
    )


def build_schedule(config: Config) -> dict[str, dict[str, Any]]:
    """The ``beat_schedule`` setting for ``config``."""
    schedule: dict[str, dict[str, Any]] = {}
    for agent in config.agents:
        entry: dict[str, Any] = {
            "task": RUN_TASK,
            "schedule": crontab_of(agent.schedule),
            "args": (agent.project, agent.name),
            "kwargs": {"trigger": "beat"},
            "options": {"queue": DEFAULT_QUEUE},
        }
        if agent.run_on_start:
            entry["last_run_at"] = _LONG_AGO
        schedule[agent.key] = entry
    schedule["formulabeat/cleanup"] = {
        "task": CLEANUP_TASK,
        "schedule": crontab(minute="17"),
        "options": {"queue": DEFAULT_QUEUE},
    }
    schedule["formulabeat/reap"] = {
        "task": REAP_TASK,
        "schedule": dt.timedelta(seconds=REAP_EVERY_SECONDS),
        "options": {"queue": DEFAULT_QUEUE},
    }
    return schedule
