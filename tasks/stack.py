"""The processes ``formulabeat up`` runs: embedded Redis, a worker, beat, Flower.

Each Celery part is Celery's own command (``celery -A tasks.app …``) in its
own process group, so a Ctrl-C reaches ``up`` alone, which then stops the
parts in order: Flower and beat first (no new runs), then this host's live
runs (cancelled, their sessions killed), the worker next, Redis last (so no
run loses its broker before its worker is down).

``up`` counts its Ctrl-Cs (:meth:`Stack.interrupt`) instead of raising them
in the middle of a step: one while it starts stops the starting, one more
while it stops cuts the wait for the watcher short. Whatever the worker did
not end (cut short, killed, dead already), ``up`` ends itself once the
worker is gone, so no run of its host outlives it live, with a session or a
lease.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import redis
from kombu.exceptions import OperationalError

from tasks.app import client_app, redis_client
from workers import embedded, registry
from workers.config import CONFIG_ENV, HOST_ENV, Config
from workers.errors import BrokerError, FormulabeatError
from workers.statedir import private_dir

log = logging.getLogger("formulabeat.stack")
CELERY = [sys.executable, "-m", "celery", "-A", "tasks.app"]


def worker_argv(cfg: Config, extra: list[str] | None = None) -> list[str]:
    """``celery worker`` for this host (its node name carries the host)."""
    return [*CELERY, "worker", "-n", f"formulabeat@{cfg.host}", "-l", "info", *(extra or [])]


def beat_argv(cfg: Config, extra: list[str] | None = None) -> list[str]:
    """``celery beat`` with redbeat (configured in the app)."""
    # No pid file: two beats may run on one host (the schedule and its lock
    # live in Redis), and a stale pid file would only stop the second.
    return [*CELERY, "beat", "-l", "info", "--pidfile=", *(extra or [])]


def flower_argv(cfg: Config, extra: list[str] | None = None) -> list[str]:
    """``celery flower`` on the configured address and port."""
    return [
        *CELERY,
        "flower",
        f"--address={cfg.flower_address}",
        f"--port={cfg.flower_port}",
        *(extra or []),
    ]


def is_loopback(address: str) -> bool:
    """Whether ``address`` only listens on this machine."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


MALLOC_ARENA_MAX = "2"


def child_env(cfg: Config, flower: bool = False) -> dict[str, str]:
    """The environment of a Celery part: the config path, plus Flower's API switch."""
    env = dict(os.environ)
    env[CONFIG_ENV] = str(cfg.path)
    env[HOST_ENV] = cfg.host
    # glibc gives each thread that allocates its own malloc arena (up to 8 per
    # core): a worker's dozens of threads kept growing its RSS with arenas
    # half free (make soak). Two arenas hold it; a value set outside wins.
    env.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX)
    if flower:
        if is_loopback(cfg.flower_address):
            env["FLOWER_UNAUTHENTICATED_API"] = "true"
        elif not env.get("FLOWER_BASIC_AUTH"):
            raise FormulabeatError(
                f"{cfg.path}: flower.address {cfg.flower_address} listens beyond loopback: "
                "set FLOWER_BASIC_AUTH=user:password in the environment first"
            )
    return env


class Stack:
    """A running set of parts for one config on this host."""

    def __init__(
        self,
        cfg: Config,
        *,
        flower: bool = True,
        beat: bool = True,
        log_dir: Path | None = None,
        wrap: list[str] | None = None,
        end_runs: bool = False,
    ) -> None:
        self.cfg = cfg
        # `formulabeat up`: stopping ends this host's live runs. Otherwise (a
        # worker restart, a test's or the benchmark's worker) they live on for
        # the next worker to adopt.
        self.end_runs = end_runs
        # Ctrl-Cs (and TERMs) so far: see interrupt().
        self.interrupts = 0
        # A command each part runs under (``nice -n 5``, ``ip netns exec NS``).
        self.wrap = wrap or []
        self.with_flower = flower
        self.with_beat = beat
        self.log_dir = log_dir
        self.redis: embedded.EmbeddedRedis | None = None
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: list[IO[bytes]] = []

    @property
    def flower_url(self) -> str:
        """Where Flower answers."""
        return f"http://{self.cfg.flower_address}:{self.cfg.flower_port}/"

    def check(self) -> None:
        """Refuse settings that would stop a part, before any part starts."""
        if not self.with_flower:
            return
        child_env(self.cfg, flower=True)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((self.cfg.flower_address, self.cfg.flower_port))
            except OSError as exc:
                raise FormulabeatError(
                    f"{self.cfg.path}: flower.port {self.cfg.flower_port} on "
                    f"{self.cfg.flower_address}: {exc.strerror}: choose another port"
                ) from None

    def interrupt(self) -> None:
        """A Ctrl-C (a signal handler calls this): a start stops starting, a stop hurries.

        Counted, never raised: a step (Redis, a ping, a cancel request) is
        never left half done.
        """
        self.interrupts += 1

    def start(self, ready_timeout: float = 60.0) -> bool:
        """Check the settings, start every part and wait until the worker answers a ping.

        False when :meth:`interrupt` came first: the parts started so far run
        on for the caller to :meth:`stop`. A part that fails stops them all.
        """
        self.check()
        private_dir(self.cfg.state_dir)
        try:
            if self.cfg.broker_url is None:
                running = embedded.published_url(self.cfg.state_dir)
                if running:
                    raise BrokerError(
                        f"an embedded Redis already runs for state dir {self.cfg.state_dir}: "
                        "is another `formulabeat up` running?"
                    )
                self.redis = embedded.start_redis(self.cfg.state_dir / "redis")
                embedded.publish(self.cfg.state_dir, self.redis)
            if self.interrupts:
                return False
            self._spawn("worker", worker_argv(self.cfg), child_env(self.cfg))
            if not self._wait_worker(ready_timeout):
                return False
            # Flower before beat: it builds task pages from events, and a run
            # that beat starts at once must not happen before it listens.
            if self.with_flower:
                self._spawn("flower", flower_argv(self.cfg), child_env(self.cfg, flower=True))
                if not self._wait_flower(ready_timeout):
                    return False
            if self.with_beat:
                self._spawn("beat", beat_argv(self.cfg), child_env(self.cfg))
        except BaseException:
            self.stop()
            raise
        return True

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            private_dir(self.log_dir)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop)
            self._logs.append(out)
        proc = subprocess.Popen(
            [*self.wrap, *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        self.procs.append((name, proc))

    def _wait_worker(self, timeout: float) -> bool:
        """True once the worker answers a ping; False when interrupted first."""
        app = client_app(self.cfg)
        node = f"formulabeat@{self.cfg.host}"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._check_children()
                if self.interrupts:
                    return False
                try:
                    if app.control.ping(destination=[node], timeout=0.5):
                        return True
                except (OperationalError, redis.exceptions.ConnectionError):
                    time.sleep(0.2)  # Redis restarting: ask again
            raise FormulabeatError(f"the worker {node} did not answer within {timeout:g} s")
        finally:
            app.close()

    def _wait_flower(self, timeout: float) -> bool:
        """True once Flower listens; False when interrupted first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_children()
            if self.interrupts:
                return False
            try:
                with socket.create_connection((self.cfg.flower_address, self.cfg.flower_port), 0.5):
                    time.sleep(0.5)  # listening on HTTP; its event consumer follows at once
                    return True
            except OSError:
                time.sleep(0.1)
        raise FormulabeatError(f"Flower did not listen on {self.flower_url} within {timeout:g} s")

    def _check_children(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise FormulabeatError(f"the {name} exited at start (status {proc.returncode})")

    def alive(self) -> list[str]:
        """Names of parts that have exited (empty while all run)."""
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop(self, grace: float = 15.0) -> list[str]:
        """Stop every part: Flower and beat, then the worker, then Redis.

        With ``end_runs``, this host's live runs are cancelled in between, once
        no beat can start more, and their sessions end with them: the worker's
        watcher is asked to end them, and what it left when it stopped (an
        interrupt cut the wait short, it died) is ended here, with Redis still
        up. Returns the ids of the runs it ended.
        """
        at_entry = self.interrupts
        order = {"flower": 0, "beat": 1, "worker": 2}
        ended: set[str] = set()
        for name, proc in sorted(self.procs, key=lambda item: order.get(item[0], 3)):
            if name == "worker" and self.end_runs and proc.poll() is None:
                try:
                    ended.update(self._cancel_live_runs(proc, grace * 4, at_entry))
                except redis.exceptions.RedisError as exc:
                    log.warning("could not ask this host's runs to stop: %s", exc)
            _terminate(proc, grace if name == "worker" else 10.0)
        stopped_parts = bool(self.procs) or self.redis is not None
        self.procs.clear()
        if self.end_runs and stopped_parts:
            from tasks.hosts import end_runs_left

            try:
                ended.update(end_runs_left(self.cfg, self._who()))
            except redis.exceptions.RedisError as exc:
                log.warning("could not end this host's live runs: %s", exc)
        if self.redis is not None:
            embedded.stop_redis(self.redis)
            embedded.unpublish(self.cfg.state_dir)
            self.redis = None
        for log_file in self._logs:
            log_file.close()
        self._logs.clear()
        return sorted(ended)

    def _who(self) -> str:
        return f"formulabeat up stopping on host {self.cfg.host}"

    def _cancel_live_runs(
        self, worker: subprocess.Popen[bytes], timeout: float, at_entry: int
    ) -> set[str]:
        """Ask the worker's watcher to cancel this host's live runs; wait while it does.

        The wait ends when no run is live, the worker exited, ``timeout``
        passed, or an interrupt came: another since the stop began, or a
        second in all ("a second Ctrl-C stops without waiting").
        """
        client = redis_client(self.cfg)
        ended: set[str] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and worker.poll() is None:
            if self.interrupts > at_entry or self.interrupts >= 2:
                break
            live = [state["id"] for state in registry.live_states(client, self.cfg.host)]
            if not live:
                break
            for run_id in set(live) - ended:
                registry.request_cancel(client, run_id, self._who())
            ended.update(live)
            time.sleep(0.2)
        return ended


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """TERM (Celery's warm shutdown), then QUIT (cold), then KILL, to the process group."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
