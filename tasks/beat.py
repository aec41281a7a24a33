"""Beat's scheduler: redbeat's, following the config file while beat runs.

An agent added, removed or rescheduled in the file is scheduled from the next
tick (at most ``beat_max_loop_interval``, 5 s, away); ``SIGHUP`` asks for the
same at once, and no longer stops beat.

It also comes through a Redis failover or restart, which redbeat 2.4.2 does
not: an error of Redis in a tick ended beat, and so did its lock gone from
the new master (``LockNotOwnedError`` when it extends it; ``make sentinel``
found both). Here the tick is tried again, and a lost lock is taken again
(or waited for, as a standby does, when another beat took it meanwhile).
An entry's next run time, which redbeat writes before it sends the entry, is
kept through a failover (workers.sentinel.kept): lost with a demoted master,
the entry would be found due again and sent twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from datetime import datetime
from typing import Any

import redis
from celery.beat import ScheduleEntry
from redbeat import RedBeatScheduler, RedBeatSchedulerEntry
from redbeat.decoder import RedBeatJSONEncoder
from redis.exceptions import LockNotOwnedError

from beat_schedule import build_schedule
from tasks.app import config, redis_client
from workers.lanes import with_redis
from workers.sentinel import kept

log = logging.getLogger("formulabeat.beat")


# Seconds before a tick that met a Redis error is tried again.
RETRY_TICK = 1.0


class Entry(RedBeatSchedulerEntry):
    """redbeat's entry, whose next run time is kept through a failover."""

    def _next_instance(
        self, last_run_at: datetime | None = None, only_update_last_run_at: bool = False
    ) -> ScheduleEntry:
        # redbeat's own, but for the write: kept, and tried again while the
        # master changes (each try writes the same values).
        entry = ScheduleEntry._next_instance(self, last_run_at=last_run_at)
        if only_update_last_run_at:
            entry.total_run_count = self.total_run_count
        meta = {"last_run_at": entry.last_run_at, "total_run_count": entry.total_run_count}
        commands = (
            ("HSET", self.key, "meta", json.dumps(meta, cls=RedBeatJSONEncoder)),
            ("ZADD", self.app.redbeat_conf.schedule_key, entry.score, entry.key),
        )
        with_redis(lambda: kept(redis_client(config()), *commands))
        return entry

    __next__ = next = _next_instance


class Scheduler(RedBeatScheduler):
    """RedBeatScheduler whose static entries are the current config's agents."""

    Entry = Entry

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._hangup = False
        super().__init__(*args, **kwargs)
        self._following = config()
        # Outside beat's main thread (an embedded beat) no handler can be set:
        # the file is still followed.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._hangup = True

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Reschedule first if the config changed, then redbeat's tick.

        Redis away (a restart, a failover) does not end beat: the tick is
        tried again; a lock that is no longer beat's is taken again.
        """
        self._follow_config()
        try:
            interval: float = super().tick(*args, **kwargs)
        except LockNotOwnedError:
            log.warning("beat: its lock is gone from Redis (a failover or a long outage)")
            self._take_lock_again()
            return 0.0
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("beat: Redis unreachable (%s); trying again in %.0f s", exc, RETRY_TICK)
            return RETRY_TICK
        return interval

    def _take_lock_again(self) -> None:
        """Take the lock again, waiting as a standby while another beat holds it."""
        while True:
            try:
                if self.lock.acquire(blocking=False):
                    log.info("beat: Acquired lock")
                    return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("beat: Redis unreachable (%s) while taking the lock", exc)
            time.sleep(self.max_interval)

    def _follow_config(self) -> None:
        cfg = config()
        if cfg is self._following and not self._hangup:
            return
        self._hangup = False
        self._following = cfg
        self.app.conf.beat_schedule = build_schedule(cfg)
        # Drops the entries of agents no longer there, adds and updates the rest.
        self.setup_schedule()
        log.info("beat: schedule of %s now has %d agents", cfg.path, len(cfg.agents))
