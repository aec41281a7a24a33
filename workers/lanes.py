"""Lanes: background jobs that keep each run's order and retry until Redis answers.

A run's reports must land in the order its phases happened, its final
result after its last phase, and none may be lost while Redis restarts. Each
run's jobs go to one lane (a thread picked by the run id), so they keep
their order while other runs' jobs go on in the other lanes; a job that
fails on a connection error is tried again, with a growing pause, until it
goes through.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

log = logging.getLogger("formulabeat.lanes")

Job = Callable[[], None]
T = TypeVar("T")
# How long a step waits for Redis to come back (a restart, a failover) before it gives up.
REDIS_PATIENCE = 120.0
# Errors that mean "Redis is away": anything else is a bug, logged and dropped.
RETRYABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OperationalError,
    OSError,
)


def with_redis(call: Callable[[], T], patience: float = REDIS_PATIENCE) -> T:
    """``call()``, tried again while Redis is unreachable (for up to ``patience`` s)."""
    deadline = time.monotonic() + patience
    pause = 0.1
    while True:
        try:
            return call()
        except RETRYABLE:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(2.0, pause * 2)


class Lanes:
    """A fixed set of threads; the jobs of one key run one after another."""

    def __init__(self, count: int = 4, name: str = "lane", max_pause: float = 5.0) -> None:
        self.max_pause = max_pause
        self._queues: list[queue.SimpleQueue[Job]] = [queue.SimpleQueue() for _ in range(count)]
        self._threads = [
            threading.Thread(
                target=self._work, args=(jobs,), name=f"formulabeat-{name}-{index}", daemon=True
            )
            for index, jobs in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, key: str, job: Job) -> None:
        """Queue ``job`` behind the earlier jobs of ``key``."""
        self._queues[zlib.crc32(key.encode()) % len(self._queues)].put(job)

    def settle(self, key: str, timeout: float) -> bool:
        """Wait until the jobs of ``key`` queued so far have gone through; False after ``timeout``.

        A job of a lane does not wait: its lane would wait for itself.
        """
        if threading.current_thread() in self._threads:
            return False
        through = threading.Event()
        self.submit(key, through.set)
        return through.wait(timeout)

    def _work(self, jobs: queue.SimpleQueue[Job]) -> None:
        while True:
            job = jobs.get()
            pause = 0.1
            while True:
                try:
                    job()
                    break
                except RETRYABLE as exc:
                    log.warning("Redis unreachable (%s); trying again in %.1f s", exc, pause)
                    time.sleep(pause)
                    pause = min(self.max_pause, pause * 2)
                except Exception:
                    log.exception("background job failed")
                    break
