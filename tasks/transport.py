"""The broker transport: kombu's Redis transport, safe to use after a lost connection.

When Redis goes away, Celery collects the broken connection, which detaches
its transport; a channel of that connection can still be asked for a Redis
client afterwards (acking a task that finishes after the reconnect, Celery
5.7.0 closing the collected connection once more). kombu then reads the
detached transport's settings and raises ``AttributeError: 'NoneType' object
has no attribute 'hostname'``, an error Celery calls unrecoverable: the
worker exits, its host stops heartbeating, and its runs are reaped as
``lost`` (``make chaos`` found it). Here that channel raises a connection
error instead, which Celery handles as it does any lost connection: the ack
is logged as failed (the message comes back after the visibility timeout,
and the step's claim drops it) and the worker reconnects.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class _FailsWhenClosed:
    """A channel that fails like a lost connection once its connection is closed."""

    connection: Any

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError("this channel's broker connection was closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]
        return params


class Channel(_FailsWhenClosed, kombu_redis.Channel):
    """kombu's Redis channel, failing like a lost connection once its connection is closed."""


class Transport(kombu_redis.Transport):
    """kombu's Redis transport (``redis://`` and ``rediss://``) with :class:`Channel`."""

    Channel = Channel


class SentinelChannel(_FailsWhenClosed, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel, failing like a lost connection once its connection is closed."""


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (``sentinel://``) with :class:`SentinelChannel`."""

    Channel = SentinelChannel
