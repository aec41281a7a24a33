"""Redis behind Sentinel: the ``sentinel://`` URL form and a client that follows the master.

Celery's Sentinel form is ``sentinel://[:password@]host:port;sentinel://host:port;...``;
the password, when given, is the Redis (data) password. ``sentinels://`` is
TLS to every Sentinel and to the master, with a ``rediss://`` URL's query
parameters (TLS_PARAMETERS) on any part. redis-py's
SentinelConnectionPool asks the Sentinels for the master again after a
connection error or a READONLY reply; a master demoted by SENTINEL FAILOVER
kept taking writes for more than 10 s (Redis 7.0.15), so a client built here
also asks every second and leaves the old master at once (``_follow``).

Replication is asynchronous: a write the master acknowledged may be missing
on the replica promoted in its place. The writes a run's safety rests on
(its lease, fencing number, claims and slot) go through ``replicated``,
which does not return until a replica has the write too.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

log = logging.getLogger("formulabeat.sentinel")

SCHEMES = ("sentinel://", "sentinels://")
# What a sentinels:// URL takes in its query, as a rediss:// URL does (the
# keys of redis-py's TLS arguments and of Celery's broker_use_ssl).
TLS_PARAMETERS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
# ssl_cert_reqs's values, in redis-py's spelling or Celery's (CERT_REQUIRED).
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
# How often a client asks the Sentinels who the master is. After a failover
# the old master keeps accepting writes until the Sentinels turn it into a
# replica (measured: more than 10 s after SENTINEL FAILOVER), and those
# writes are lost when it resyncs: a client must leave it as soon as the
# Sentinels name another master, not when it first refuses a write.
FOLLOW_SECONDS = 1.0
# How long a write that must survive a failover waits for the replicas to have it.
REPLICA_WAIT_MS = 2000
# From a replica's promotion (it leaves the old master) until the Sentinels
# name it: a write acknowledged by the other replicas only is asked about again
# after this (measured: about 1 s in the tests' group).
PROMOTION_GRACE = 2.5
# How long a Sentinel may take to answer before the next one is asked.
SENTINEL_TIMEOUT = 2.0


class EpochSentinel(Sentinel):
    """redis-py's Sentinel, following the master of the latest failover, never the one it replaces.

    redis-py takes the master the first Sentinel that answers names. Right
    after a failover, a Sentinel that has not yet heard of it names the old
    master, which still takes writes (and loses them when it is made a
    replica): here every Sentinel is asked, and the master of the highest
    ``config-epoch`` (the newest failover) wins. The Sentinel leading a
    failover goes on naming the old master, with the new epoch, until the
    replicas are moved (measured: 5 s after the others named the new one),
    and from the promotion until the others hear of it (about 1 s) every
    Sentinel names the old one: no master is named while a failover is under
    way but by a Sentinel that already names a new one (MasterNotFoundError,
    a connection error the callers wait out).
    """

    def discover_master(self, service_name: str) -> tuple[str, int]:
        named: list[tuple[int, tuple[str, int]]] = []
        replaced: set[tuple[str, int]] = set()
        for masters in self._ask_every("SENTINEL MASTERS"):
            state = cast(dict[str, dict[str, object]], masters).get(service_name)
            if not state:
                continue
            address = (str(state["ip"]), int(str(state["port"])))
            flags = state.get("flags", "")  # a set in RESP3, a string in RESP2
            flags = flags if isinstance(flags, set) else set(str(flags).split(","))
            if "failover_in_progress" in flags:
                replaced.add(address)
            elif self.check_master_state(state, service_name):  # type: ignore[no-untyped-call]
                named.append((int(str(state.get("config-epoch", 0))), address))
        candidates = [(epoch, address) for epoch, address in named if address not in replaced]
        if not candidates:
            during = " (a failover is under way)" if replaced else ""
            raise MasterNotFoundError(f"No master found for {service_name!r}{during}")
        return max(candidates)[1]

    def _ask_every(self, command: str) -> list[Any]:
        """The replies of the Sentinels that answer ``command``, one each.

        Every write kept through a failover asks this once it is made (is the
        server written to still the master?): the question goes to all the
        Sentinels before any answer is read, so it costs one round trip, not
        one per Sentinel.
        """
        asked: list[tuple[redis.Redis, Any]] = []
        replies: list[Any] = []
        try:
            for each in self.sentinels:
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    asked.append((each, _sent(each.connection_pool, command)))
            while asked:
                each, connection = asked.pop(0)
                try:
                    raw = connection.read_response()
                except (redis.ConnectionError, redis.TimeoutError):
                    connection.disconnect()
                    continue
                finally:
                    each.connection_pool.release(connection)
                replies.append(each.response_callbacks[command](raw))
        finally:
            # Interrupted: an answer left unread would be read as the next one's.
            for each, connection in asked:
                connection.disconnect()
                each.connection_pool.release(connection)
        return replies


def _sent(pool: redis.ConnectionPool, *command: Any) -> Any:
    """A connection of ``pool`` on which ``command`` is sent, its answer not yet read."""
    connection: Any = pool.get_connection()  # redis-py's Connection is untyped
    try:
        connection.send_command(*command)
    except BaseException:
        connection.disconnect()
        pool.release(connection)
        raise
    return connection


@dataclass(frozen=True)
class SentinelURL:
    """What a ``sentinel://`` URL names: the Sentinels, the Redis password, TLS or not."""

    sentinels: tuple[tuple[str, int], ...]
    password: str | None
    # sentinels:// only: the TLS_PARAMETERS of every part, ssl_cert_reqs as
    # ssl.VerifyMode; the form Celery's broker_use_ssl takes.
    tls: dict[str, Any] | None = None

    def connection_kwargs(self) -> dict[str, Any]:
        """redis-py's arguments for TLS to a Sentinel or the master, if the URL asks for it."""
        return {} if self.tls is None else {"ssl": True, **self.tls}


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` is in Celery's Sentinel form."""
    return url.startswith(SCHEMES)


def parse(url: str) -> SentinelURL:
    """The Sentinels, password and TLS settings of ``url``; ValueError (without the password).

    The TLS parameters may be given on any part, and apply to every Sentinel
    and the master; one given on two parts must have one value.
    """
    sentinels: list[tuple[str, int]] = []
    password: str | None = None
    tls_scheme = url.startswith("sentinels://")
    tls: dict[str, Any] = {}
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        where = f"{len(sentinels) + 1}. part"
        if not part.startswith(SCHEMES):
            raise ValueError(f"{where} is not sentinel://host:port")
        if part.startswith("sentinels://") != tls_scheme:
            raise ValueError(
                f"{where} mixes sentinel:// and sentinels:// (TLS): use one for every part"
            )
        split = urlsplit(part)
        try:
            port = split.port or 26379
        except ValueError:
            raise ValueError(f"{where} has an invalid port") from None
        if not split.hostname:
            raise ValueError(f"{where} has no host")
        if split.password:
            password = unquote(split.password)
        for name, value in _tls_parameters(split.query, where, tls_scheme):
            if tls.get(name, value) != value:
                raise ValueError(f"{where} gives {name} another value than an earlier part")
            tls[name] = value
        sentinels.append((split.hostname, port))
    if not sentinels:
        raise ValueError("names no Sentinel")
    if not tls_scheme:
        return SentinelURL(tuple(sentinels), password)
    # redis-py's default, and what a rediss:// URL without it gets from formulabeat's client.
    tls.setdefault("ssl_cert_reqs", ssl.CERT_REQUIRED)
    return SentinelURL(tuple(sentinels), password, tls)


def _tls_parameters(query: str, where: str, tls_scheme: bool) -> list[tuple[str, Any]]:
    """The TLS parameters of one part's ``query``; ValueError naming what is wrong."""
    found: list[tuple[str, Any]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in TLS_PARAMETERS:
            raise ValueError(
                f"{where} has an unknown parameter {name!r} (it takes {', '.join(TLS_PARAMETERS)})"
            )
        if not tls_scheme:
            raise ValueError(f"{where} has {name}, which needs TLS: use sentinels://")
        if any(name == seen for seen, _ in found):
            raise ValueError(f"{where} gives {name} twice")
        if not value:
            raise ValueError(f"{where} has an empty {name}")
        if name == "ssl_cert_reqs":
            mode = _CERT_REQS.get(value.lower().removeprefix("cert_"))
            if mode is None:
                raise ValueError(
                    f"{where} has ssl_cert_reqs={value!r}: use required, optional or none"
                )
            found.append((name, mode))
        else:
            found.append((name, value))
    return found


def without_tls(url: str) -> str:
    """``url`` without its TLS parameters, for Celery and kombu, which take them as settings.

    kombu reads the query of the first part only (and then in place of
    broker_use_ssl), Celery's Sentinel result backend none.
    """
    return ";".join(part.split("?", 1)[0] for part in (p.strip() for p in url.split(";")) if part)


def group(
    sentinels: list[tuple[str, int]],
    sentinel_kwargs: dict[str, Any] | None = None,
    **connection_kwargs: Any,
) -> EpochSentinel:
    """An :class:`EpochSentinel` of ``sentinels`` whose Sentinel connections fail fast.

    redis-py tries a connection three times with a backoff of up to 10 s
    before it gives up; asking every Sentinel, one that is down would then
    hold up every question by seconds (and a process whose Sentinels are all
    gone would wait minutes in a result consumer's reconnect): a Sentinel
    that does not answer at once is passed over, the next one asked.
    """
    asked: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        **(sentinel_kwargs or {}),
        "retry": Retry(NoBackoff(), 0),
    }
    # redis-py's Sentinel API carries no annotations.
    return EpochSentinel(sentinels, sentinel_kwargs=asked, **connection_kwargs)  # type: ignore[no-untyped-call]


def master_client(
    url: str,
    master_name: str,
    sentinel_password: str | None,
    timeout: float,
) -> redis.Redis:
    """A client of the master the Sentinels of ``url`` name for ``master_name``."""
    parsed = parse(url)
    asked = parsed.connection_kwargs()
    if sentinel_password:
        asked["password"] = sentinel_password
    sentinels = group(
        list(parsed.sentinels),
        asked,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        password=parsed.password,
        **parsed.connection_kwargs(),
    )
    client: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        master_name, health_check_interval=30
    )
    follow(client.connection_pool)
    return client


_followed: list[weakref.ref[redis.ConnectionPool]] = []
_followed_lock = threading.Lock()


def follow(pool: redis.ConnectionPool) -> None:
    """Ask the Sentinels for ``pool``'s master every FOLLOW_SECONDS, while the pool lives.

    When they name another, redis-py's pool drops its idle connections and
    every connection to the old master as it comes back from use, so the
    next command of each goes to the new master. Connections in use are
    never closed under their thread: that broke commands half-way with
    errors no retry expects (ValueError: I/O operation on closed file).
    One thread follows every pool of the process (formulabeat's client,
    the broker's, the result backend's).
    """
    with _followed_lock:
        _followed.append(weakref.ref(pool))
        if len(_followed) == 1:
            threading.Thread(target=_follow, name="sentinel-follow", daemon=True).start()


def _follow() -> None:
    while True:
        with _followed_lock:
            _followed[:] = [ref for ref in _followed if ref() is not None]
            pools = [pool for pool in (ref() for ref in _followed) if pool is not None]
        for pool in pools:
            if isinstance(pool, SentinelConnectionPool):
                with contextlib.suppress(redis.RedisError):
                    pool.get_master_address()  # type: ignore[no-untyped-call]
                    _count_replicas(pool)
        del pools
        time.sleep(FOLLOW_SECONDS)


def replicated(client: redis.Redis, *command: Any) -> Any:
    """``command``'s reply, once every replica up has its write too (see :func:`kept`)."""
    return kept(client, command)[0]


def kept(client: redis.Redis, *commands: tuple[Any, ...]) -> list[Any]:
    """The replies of ``commands``, once every replica up has their writes too.

    On a Sentinel-managed Redis the commands and a ``WAIT`` for every
    replica the Sentinels see up go on one connection, so the WAIT counts
    these writes; then the Sentinels are asked whether the server written to
    is still the master. If not, the writes went to a demoted master and
    will be lost: ConnectionError is raised, which the callers' Redis retries
    take to the new master (each of these writes may be repeated). A replica
    missing from the acknowledgements may be the one a failover is promoting
    (detached, the old master still taking writes, the Sentinels not yet
    naming it): the Sentinels are asked again after PROMOTION_GRACE. With no
    replica up at all the writes are kept as a plain Redis would keep them,
    and a warning says so. A plain Redis URL runs the commands in one
    transaction; on Sentinel they are sent at once with the WAIT on one
    connection (not a transaction, whose replies come on a connection of its
    own, where no WAIT could count them), and their replies are Redis's own,
    not parsed by the client.
    """
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        pipe = client.pipeline()
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return list(pipe.execute())
    wanted = max(1, _replicas_up(pool))
    connection: Any = pool.get_connection()  # redis-py's Connection is untyped
    try:
        # One round trip: the WAIT counts the writes sent before it on its connection.
        connection.send_packed_command(
            connection.pack_commands([*commands, ("WAIT", wanted, REPLICA_WAIT_MS)])
        )
        replies = [connection.read_response() for _ in commands]
        acked = int(connection.read_response())
        wrote_to = (connection.host, connection.port)
    except BaseException:
        # Replies may be left unread: the connection must not be used again.
        connection.disconnect()
        raise
    finally:
        pool.release(connection)
    # A replica's acknowledgement is not enough: a master just demoted may
    # still have a replica attached (measured: the write acknowledged, then
    # gone once the Sentinels moved that replica to the new master).
    _still_master(pool, wrote_to)
    if acked < wanted:
        time.sleep(PROMOTION_GRACE)
        _still_master(pool, wrote_to)
    if acked < 1:
        log.warning(
            "no replica of %s:%s acknowledged a write within %d ms: a failover now may lose it",
            *wrote_to,
            REPLICA_WAIT_MS,
        )
    return replies


def _still_master(pool: SentinelConnectionPool, wrote_to: tuple[str, int]) -> None:
    master = pool.get_master_address()  # type: ignore[no-untyped-call]
    if master != wrote_to:
        # The connection went back to the pool, which drops it (not the master's).
        raise redis.ConnectionError(
            f"{wrote_to[0]}:{wrote_to[1]} is no longer the master (the Sentinels name "
            f"{master[0]}:{master[1]}): the write would be lost"
        )


_replicas_seen: dict[int, tuple[float, int]] = {}
# How old a count of the replicas a kept write may use. The follow thread
# counts them every FOLLOW_SECONDS, so a write does not wait for the question
# (asked on the way, it held up the first write of every second); a pool
# nobody follows is asked on the way.
REPLICAS_SEEN_FOR = 3 * FOLLOW_SECONDS


def _replicas_up(pool: SentinelConnectionPool) -> int:
    """How many replicas of the pool's master the Sentinels see up, counted lately."""
    seen = _replicas_seen.get(id(pool))
    if seen and time.monotonic() - seen[0] < REPLICAS_SEEN_FOR:
        return seen[1]
    return _count_replicas(pool)


def _count_replicas(pool: SentinelConnectionPool) -> int:
    count = 0
    for each in pool.sentinel_manager.sentinels:
        try:
            replicas = cast(list[dict[str, object]], each.sentinel_slaves(pool.service_name))
        except (redis.ConnectionError, redis.TimeoutError):
            continue
        down = ("is_sdown", "is_odown", "is_disconnected")
        count = sum(1 for r in replicas if not any(r.get(flag) for flag in down))
        break
    _replicas_seen[id(pool)] = (time.monotonic(), count)
    return count


@dataclass(frozen=True)
class Survey:
    """What the Sentinels of a URL say of one master."""

    asked: int
    answered: int
    masters: dict[tuple[str, int], int]  # address -> how many Sentinels name it
    replicas: int
    problems: tuple[str, ...]

    @property
    def master(self) -> tuple[str, int] | None:
        """The address most Sentinels name, if any does."""
        return max(self.masters, key=lambda a: self.masters[a]) if self.masters else None


def survey(url: str, master_name: str, sentinel_password: str | None, timeout: float) -> Survey:
    """Ask each Sentinel of ``url`` for ``master_name``: who it is, its replicas, who agrees."""
    parsed = parse(url)
    masters: dict[tuple[str, int], int] = {}
    problems: list[str] = []
    answered = replicas = 0
    for host, port in parsed.sentinels:
        client = redis.Redis(
            host=host,
            port=port,
            password=sentinel_password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            **parsed.connection_kwargs(),
        )
        try:
            info = cast(dict[str, object], client.sentinel_master(master_name))
        except redis.ResponseError as exc:
            answered += 1
            problems.append(f"{host}:{port} knows no master {master_name!r} ({exc})")
            continue
        except redis.RedisError as exc:
            # redis-py's message says why: refused, a certificate refused, or
            # a CA file not found (the config does not check it, as for rediss://).
            problems.append(f"{host}:{port} did not answer ({type(exc).__name__}: {exc})")
            continue
        finally:
            client.close()
        answered += 1
        address = (str(info["ip"]), int(str(info["port"])))
        masters[address] = masters.get(address, 0) + 1
        replicas = max(replicas, int(str(info.get("num-slaves", 0))))
    return Survey(len(parsed.sentinels), answered, masters, replicas, tuple(problems))
