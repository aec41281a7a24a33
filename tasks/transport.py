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
from kombu.connection import Connection
from kombu.transport import redis as kombu_redis
from kombu.utils.url import _parse_url

from workers import sentinel


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
    """kombu's Sentinel channel, following the master as formulabeat's own client does.

    It fails like a lost connection once its connection is closed; it takes
    the master of the newest failover (kombu takes the first Sentinel's
    answer, which just after a failover may still name the old master); its
    pool is followed (workers.sentinel.follow), so the acks and sends of a
    worker leave a demoted master within a second instead of going on to it
    until it refuses them; and it reads every Sentinel of a ``sentinels://``
    URL, which kombu passes over (it reads ``sentinel://`` parts only). Over
    TLS, the master's connections take ``broker_use_ssl`` (kombu puts it in
    the connection parameters), the Sentinels' the ``sentinel_kwargs``.
    """

    # Set from the transport options (kombu's from_transport_options).
    master_name: str | None = None
    sentinel_kwargs: dict[str, Any] | None = None

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        params = self._connparams(asynchronous)
        params.pop("host", None)
        params.pop("port", None)
        sentinels = [
            (url.hostname, url.port or self.connection.default_port)
            for url in map(_parse_url, self.connection.client.alt)
            if url.scheme in ("sentinel", "sentinels")
        ]
        group = sentinel.group(sentinels, self.sentinel_kwargs, **params)
        # kombu closes the Sentinels' connections through these (kombu#1108).
        if asynchronous:
            self._async_sentinel_manager = group
        else:
            self._sentinel_manager = group
        if self.master_name is None:
            raise ValueError("'master_name' transport option must be specified.")
        credentials = {key: params[key] for key in ("username", "password") if key in params}
        client = group.master_for(self.master_name, redis.Redis, **credentials)
        sentinel.follow(client.connection_pool)
        return client.connection_pool


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (``sentinel://``) with :class:`SentinelChannel`."""

    Channel = SentinelChannel


class BrokerConnection(Connection):
    """kombu's Connection, which does not switch between the parts of a Sentinel URL.

    After a connection error kombu 5.7.0 switches to the URL's next part and
    takes that part for the whole broker: its scheme as the transport (the
    one configured is dropped) and its password, none after the first part.
    A ``sentinel://`` broker then went on with kombu's own Sentinel transport
    and no Redis password; a ``sentinels://`` one failed every reconnect with
    KeyError 'No such transport: sentinels'. Every part names the same group,
    which :class:`SentinelChannel` asks whole: there is nothing to switch to.
    """

    def maybe_switch_next(self) -> None:
        first = self.alt[0] if self.alt else None
        if not (isinstance(first, str) and sentinel.is_sentinel_url(first)):
            super().maybe_switch_next()
