"""Redis behind Sentinel: the ``sentinel://`` URL form and a client that follows the master.

Celery's Sentinel form is ``sentinel://[:password@]host:port;sentinel://host:port;...``;
the password, when given, is the Redis (data) password. redis-py's
SentinelConnectionPool asks the Sentinels for the master again after a
connection error or a READONLY reply, so a client built here follows a
failover without a restart; but only then: a master demoted by SENTINEL
FAILOVER kept taking writes for more than 10 s (Redis 7.0.15), and a client
still connected to it wrote there (issue 21 is not done).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SCHEMES = ("sentinel://", "sentinels://")


@dataclass(frozen=True)
class SentinelURL:
    """What a ``sentinel://`` URL names: the Sentinels, the Redis password, TLS or not."""

    sentinels: tuple[tuple[str, int], ...]
    password: str | None
    ssl: bool


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` is in Celery's Sentinel form."""
    return url.startswith(SCHEMES)


def parse(url: str) -> SentinelURL:
    """The Sentinels and password of ``url``; ValueError (without the password) if malformed."""
    sentinels: list[tuple[str, int]] = []
    password: str | None = None
    ssl = url.startswith("sentinels://")
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        if not part.startswith(SCHEMES):
            raise ValueError(f"{len(sentinels) + 1}. part is not sentinel://host:port")
        split = urlsplit(part)
        try:
            port = split.port or 26379
        except ValueError:
            raise ValueError(f"{len(sentinels) + 1}. part has an invalid port") from None
        if not split.hostname:
            raise ValueError(f"{len(sentinels) + 1}. part has no host")
        if split.password:
            password = unquote(split.password)
        sentinels.append((split.hostname, port))
    if not sentinels:
        raise ValueError("names no Sentinel")
    return SentinelURL(tuple(sentinels), password, ssl)


def master_client(
    url: str,
    master_name: str,
    sentinel_password: str | None,
    timeout: float,
) -> redis.Redis:
    """A client of the master the Sentinels of ``url`` name for ``master_name``."""
    parsed = parse(url)
    sentinel_kwargs: dict[str, object] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "ssl": parsed.ssl,
    }
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    # redis-py's Sentinel API carries no annotations.
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels),
        sentinel_kwargs=sentinel_kwargs,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        password=parsed.password,
        ssl=parsed.ssl,
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master_name, health_check_interval=30
    )
    return client
