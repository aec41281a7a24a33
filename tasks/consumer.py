"""The worker's broker consumer: Celery's own, made to outlive a lost broker.

When the broker connection breaks, Celery 5.7.0 first collects the broken
connection (which detaches its transport) and then closes it once more. If
Redis went away in the middle of a read, that second close reaches for the
detached transport (``'NoneType' object has no attribute 'hostname'``), and
Celery treats the error as unrecoverable: the worker process exits. Every
session it watched then goes unwatched and its host stops heartbeating, so
one Redis restart can turn finished runs into ``lost`` ones (seen in
``make chaos``).
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("formulabeat.consumer")


class Consumer(CeleryConsumer):
    """Celery's consumer whose cleanup after a lost connection cannot end the worker."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Release the broken connection; whatever that cleanup hits, reconnect.

        Celery has dropped its reference to the connection before the step
        that fails, so the reconnect that follows starts from a fresh one;
        what the failure skips (lowering the prefetch count while tasks run)
        only tunes the first moments after reconnecting.
        """
        try:
            super().on_connection_error_after_connected(exc)
        except Exception:
            # Broad on purpose: the alternative is Celery's "unrecoverable
            # error", a worker exit that orphans every session on this host.
            log.exception("cleaning up the lost broker connection failed; reconnecting anyway")
