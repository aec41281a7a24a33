"""The Celery app: configured lazily from ``formulabeat.toml``.

``celery -A tasks.app worker|beat|flower`` works as Celery users expect; the
config is found through $FORMULABEAT_CONFIG or ./formulabeat.toml, and read
only when Celery first needs a setting.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.app.amqp import AMQP
from celery.result import AsyncResult
from celery.utils import uuid
from kombu.entity import Queue

from beat_schedule import CLEANUP_TASK, DEFAULT_QUEUE, REAP_TASK, RUN_TASK, build_schedule
from tasks.transport import BrokerConnection
from workers import embedded, registry, sentinel
from workers.agents import checked
from workers.config import Config, load_config
from workers.errors import BrokerError, ConfigError
from workers.lanes import with_redis

log = logging.getLogger("formulabeat.app")

RESULT_EXPIRES_SECONDS = 7 * 24 * 3600
VISIBILITY_TIMEOUT = 60
SESSION_TASK = "formulabeat.session"
# How long a run step being sent waits for the Sentinels to name a new master
# (measured: at most 7.3 s in make chaos REDIS=sentinel, a master killed).
FAILOVER_PATIENCE = 30.0
# Celery's ``<backend class>+<url>`` form: the result backend of a Sentinel URL.
SENTINEL_BACKEND = "tasks.backend:SentinelBackend+"
# The tasks whose messages must not get lost, and the step each claims,
# named from its task id (the run id): see FormulabeatCelery.
LEDGER_STEPS: dict[str, Callable[[str], str]] = {
    RUN_TASK: str,
    SESSION_TASK: registry.session_step,
}


# What a running process cannot change: its broker, its host's name, where its
# runs and sessions live. A changed value waits for the process's restart.
_FIXED = ("state_dir", "broker_url", "result_backend", "host", "tmux_socket", "concurrency")


@dataclass
class _Loaded:
    cfg: Config
    stamp: tuple[int, int] | None
    at: float
    # Why the file as it is now is not the one in use (it does not load).
    stale: str | None = None


_loaded: _Loaded | None = None
_config_lock = threading.Lock()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def config() -> Config:
    """This process's configuration, read again once its file has changed.

    So a running worker or beat takes an agent added to the file. A change
    that does not load keeps the configuration in use (logged once, and named
    by :func:`stale_config`); the settings in ``_FIXED`` keep their values
    until the process restarts.
    """
    global _loaded
    with _config_lock:
        if _loaded is None:
            cfg = checked(load_config())
            _loaded = _Loaded(cfg, _stamp(cfg.path), time.time())
            return cfg
        stamp = _stamp(_loaded.cfg.path)
        if stamp == _loaded.stamp:
            return _loaded.cfg
        old = _loaded.cfg
        try:
            fresh = checked(load_config(old.path))
        except ConfigError as exc:
            log.error(
                "%s changed but does not load, still using it as read before: %s", old.path, exc
            )
            _loaded.stamp, _loaded.stale = stamp, str(exc)
            return old
        changed = [name for name in _FIXED if getattr(fresh, name) != getattr(old, name)]
        if changed:
            log.warning(
                "%s: %s changed; restart this process for that to take effect",
                old.path,
                ", ".join(changed),
            )
            fresh = dataclasses.replace(fresh, **{name: getattr(old, name) for name in changed})
        log.info("%s changed: configuration read again", old.path)
        for warning in fresh.warnings:
            log.warning("%s", warning)
        _loaded = _Loaded(fresh, stamp, time.time())
        return fresh


def stale_config() -> str | None:
    """Why this process runs an older configuration than its file's, if it does."""
    with _config_lock:
        if _loaded is None or _loaded.stale is None:
            return None
        read = time.strftime("%H:%M:%S", time.gmtime(_loaded.at))
        return (
            f"this process runs {_loaded.cfg.path} as read at {read} UTC: "
            f"the file changed since and does not load ({_loaded.stale})"
        )


def host_queue(host: str) -> str:
    """The queue only the worker of ``host`` consumes: its sessions live there."""
    return f"formulabeat.host.{host}"


def broker_url(cfg: Config) -> str:
    """The configured broker URL, else this host's embedded Redis started by ``up``."""
    if cfg.broker_url:
        return cfg.broker_url
    url = embedded.published_url(cfg.state_dir)
    if url is None:
        raise BrokerError(
            f"{cfg.path}: [broker] url is not set and no embedded Redis runs on this host "
            f"(state dir {cfg.state_dir}): start one with `formulabeat up`, or set [broker] url"
        )
    return url


_clients: dict[tuple[str, float], redis.Redis] = {}
_clients_lock = threading.Lock()


def redis_client(cfg: Config, timeout: float = 10.0) -> redis.Redis:
    """A client for formulabeat's own keys (leases, registry, flags) on the broker.

    One per URL and timeout, shared by the threads of a process: its pool
    keeps connections open instead of one TCP and AUTH handshake per report.
    """
    return _client_for(broker_url(cfg), timeout, cfg.master_name, cfg.sentinel_password)


def _client_for(
    url: str,
    timeout: float,
    master_name: str | None = None,
    sentinel_password: str | None = None,
) -> redis.Redis:
    if sentinel.is_sentinel_url(url) and master_name:
        name = master_name
        return _cached(
            (f"{url}#{name}", timeout),
            lambda: sentinel.master_client(url, name, sentinel_password, timeout),
        )
    return _cached(
        (url, timeout),
        lambda: redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        ),
    )


def _cached(key: tuple[str, float], make: Callable[[], redis.Redis]) -> redis.Redis:
    """The process's client under ``key``, made by ``make`` the first time."""
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = make()
        return client


def celery_settings(cfg: Config) -> dict[str, Any]:
    """Celery settings for ``cfg``; each choice is explained in the README."""
    url = broker_url(cfg)
    settings: dict[str, Any] = {
        "broker_url": url,
        "result_backend": cfg.result_backend or url,
        "broker_connection_retry_on_startup": True,
        # kombu's Redis transport, except that a channel of a lost connection
        # fails as a lost connection, not as an error that ends the worker.
        "broker_transport": "tasks.transport:Transport",
        "task_default_queue": DEFAULT_QUEUE,
        "task_queues": (Queue(DEFAULT_QUEUE), Queue(host_queue(cfg.host))),
        # Acked when they start: kombu's Redis transport redelivers unacked
        # messages after the visibility timeout even while a task still runs.
        # No task follows a session (the watcher does); the one exception,
        # the short ``run`` step, is acked late so that a kill before its
        # claim loses nothing.
        "task_acks_late": False,
        # A message a dead worker had reserved (or was running, for ``run``)
        # comes back within about a minute; every step claims itself in
        # Redis, so a second delivery does nothing.
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        },
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "result_extended": True,
        "result_expires": RESULT_EXPIRES_SECONDS,
        # Monitoring a session is mostly waiting: threads are cheap slots.
        "worker_pool": "threads",
        "worker_concurrency": cfg.concurrency,
        # libtmux reads sys.stdout.encoding at import; Celery's LoggingProxy has none.
        "worker_redirect_stdouts": False,
        "beat_schedule": build_schedule(cfg),
        # redbeat keeps the schedule and a lock in Redis: two beats may run,
        # one schedules, and the other takes over within the lock timeout
        # (+ one loop) when it dies. Its default (25 min) is far too long.
        "beat_scheduler": "tasks.beat:Scheduler",
        "redbeat_redis_url": url,
        "redbeat_key_prefix": "formulabeat:redbeat",
        "redbeat_lock_timeout": int(cfg.beat_lock_timeout),
        "beat_max_loop_interval": max(1, min(5, int(cfg.beat_lock_timeout / 3))),
        "timezone": "UTC",
        "enable_utc": True,
    }
    if sentinel.is_sentinel_url(url):
        _follow_sentinels(settings, cfg, url)
    return settings


def _follow_sentinels(settings: dict[str, Any], cfg: Config, url: str) -> None:
    """Point the broker, the result backend and redbeat at the master the Sentinels name.

    Each of the three asks the Sentinels again after a lost connection (the
    broker and the result backend every second besides), so a failover needs
    no restart; each takes the master's name and the Sentinels' own password
    in its own option (README "Redis behind Sentinel"). A ``sentinels://``
    URL's TLS settings go to each in its own setting (broker_use_ssl,
    redis_backend_use_ssl, redbeat_redis_use_ssl: the master's connections)
    and in ``sentinel_kwargs`` (the Sentinels'); the URLs handed over leave
    them out (workers.sentinel.without_tls).
    """
    parsed = sentinel.parse(url)
    options = _sentinel_options(cfg, parsed)
    settings["broker_url"] = sentinel.without_tls(url)
    settings["broker_transport"] = "tasks.transport:SentinelTransport"
    settings["broker_transport_options"] = {**settings["broker_transport_options"], **options}
    if parsed.tls is not None:
        # Flower's connection to the broker is the app's: it takes these too.
        settings["broker_use_ssl"] = dict(parsed.tls)
    backend = settings["result_backend"]
    if sentinel.is_sentinel_url(backend):
        # tasks.backend's class for it: it follows the master and keeps each store.
        stored = sentinel.parse(backend)
        settings["result_backend"] = SENTINEL_BACKEND + sentinel.without_tls(backend)
        settings["result_backend_transport_options"] = _sentinel_options(cfg, stored)
        if stored.tls is not None:
            settings["redis_backend_use_ssl"] = dict(stored.tls)
    # redbeat 2.4.2 takes the Sentinel route only for a URL that starts with
    # "redis-sentinel" and reads the Sentinels and master from its options.
    settings["redbeat_redis_url"] = "redis-sentinel://"
    settings["redbeat_redis_options"] = {
        "sentinels": list(parsed.sentinels),
        "service_name": cfg.master_name,
        "password": parsed.password,
        "sentinel_kwargs": options["sentinel_kwargs"],
        "socket_timeout": 10,
    }
    if parsed.tls is not None:
        settings["redbeat_redis_use_ssl"] = dict(parsed.tls)


def _sentinel_options(cfg: Config, parsed: sentinel.SentinelURL) -> dict[str, Any]:
    """The master's name, and how to reach the Sentinels: their password, TLS."""
    asked = parsed.connection_kwargs()
    if cfg.sentinel_password:
        asked["password"] = cfg.sentinel_password
    return {"master_name": cfg.master_name, "sentinel_kwargs": asked}


# Upkeep every host runs often (the reaper every 15 s): no task events, so
# Flower's task list is the runs', not the upkeep's.
QUIET_TASKS = frozenset({REAP_TASK, CLEANUP_TASK})


class QuietAMQP(AMQP):
    """Celery's AMQP, sending no ``task-sent`` event for the quiet upkeep tasks.

    Its broker connections stay on a Sentinel URL's transport and password
    after a connection error (tasks.transport.BrokerConnection).
    """

    Connection = BrokerConnection

    def _create_task_sender(self) -> Callable[..., Any]:
        send = super()._create_task_sender()

        def send_task_message(producer: Any, name: str, message: Any, **options: Any) -> Any:
            if name in QUIET_TASKS:
                message = message._replace(sent_event=None)
            return send(producer, name, message, **options)

        return send_task_message


class FormulabeatCelery(Celery):
    """Celery that writes each run step it sends into the ledger of sent steps.

    kombu's Redis transport pops a message before it records it as unacked,
    so a worker killed (or Redis stopped) in between loses it; the reaper
    sends again a step that stays in the ledger, unclaimed, with no message
    left in the broker.
    """

    amqp_cls = QuietAMQP
    # The config a client app was made for (client_app); else the process's.
    client_config: Config | None = None

    def send_task(
        self, name: str, args: Any = None, kwargs: Any = None, **options: Any
    ) -> AsyncResult:
        if name in LEDGER_STEPS:
            task_id = options["task_id"] = options.get("task_id") or uuid()
            message = {
                "task": name,
                "task_id": task_id,
                "args": list(args or ()),
                "kwargs": dict(kwargs or {}),
                "queue": options.get("queue") or DEFAULT_QUEUE,
            }
            # From the config, not the app's broker_url: a Sentinel URL's TLS
            # settings are not in that one (see _follow_sentinels).
            client = redis_client(self.client_config or config())
            step = LEDGER_STEPS[name](task_id)
            # Through a failover too: on the master (or refused and written
            # again) before the message goes, which may be lost with it. A
            # plain Redis that does not answer is said at once.
            failover = sentinel.is_sentinel_url(str(self.conf.broker_url))
            with_redis(
                lambda: registry.note_sent(client, step, message),
                patience=FAILOVER_PATIENCE if failover else 0.0,
            )
        return super().send_task(name, args, kwargs, **options)


app = FormulabeatCelery("formulabeat", include=["tasks.runs", "tasks.maintenance", "tasks.hosts"])
app.add_defaults(lambda: celery_settings(config()))


def client_app(cfg: Config) -> Celery:
    """A Celery app for clients of ``cfg`` (CLI, demo, tests): sends and reads, runs nothing."""
    client = FormulabeatCelery("formulabeat-client", set_as_current=False)
    client.client_config = cfg
    client.conf.update(celery_settings(cfg))
    return client
