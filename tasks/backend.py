"""The result backend on a Sentinel-managed Redis: it follows the master and keeps what it stores.

Celery's Sentinel backend takes the master the first Sentinel that answers
names and stores a result with a plain ``SETEX``: right after a failover it
can write to a demoted master, which acknowledges the write and loses it
once it is made a replica, so a run's phase or its end would be missing
from its result. Here the backend asks Sentinels as formulabeat's own client
does (the master of the newest failover, a Sentinel down passed over at
once), its pool is followed, and each store is kept
(workers.sentinel.kept): it returns once every replica up has it and the
server written to is still the master, else it fails as a lost connection,
which Celery's own retry of a store (and, above it, the reporting lanes)
takes to the new master. A result stored twice is the same value: the
run's reports are idempotent.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import SentinelBackend as CelerySentinelBackend

from workers import sentinel


class SentinelBackend(CelerySentinelBackend):
    """Celery's Sentinel result backend, following the master and keeping each store."""

    def _get_sentinel_instance(self, **params: Any) -> sentinel.EpochSentinel:
        params = dict(params)
        hosts = params.pop("hosts")
        return sentinel.group(
            [(host["host"], host["port"]) for host in hosts],
            self._transport_options.get("sentinel_kwargs"),
            **params,
        )

    def _get_pool(self, **params: Any) -> Any:
        pool = super()._get_pool(**params)
        sentinel.follow(pool)
        return pool

    def _set(self, key: str, value: Any, expires: Any = None) -> None:
        if expires is None:
            expires = self.expires
        store = ("SETEX", key, int(expires), value) if expires else ("SET", key, value)
        sentinel.kept(self.client, store, ("PUBLISH", key, value))
