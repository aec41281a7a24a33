"""The processes ``formulabeat up`` runs: embedded Redis, a worker, beat, Flower.

Each Celery part is Celery's own command (``celery -A tasks.app …``) in its
own process group, so a Ctrl-C reaches ``up`` alone, which then stops the
parts in order: Flower and beat first (no new runs), then this host's live
runs (cancelled, their sessions killed), the worker next, Redis last (so no
run loses its broker before its worker is down).
"""

from __future__ import annotations

import contextlib
import ipaddress
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


def child_env(cfg: Config, flower: bool = False) -> dict[str, str]:
    """The environment of a Celery part: the config path, plus Flower's API switch."""
    env = dict(os.environ)
    env[CONFIG_ENV] = str(cfg.path)
    env[HOST_ENV] = cfg.host
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
    ) -> None:
        self.cfg = cfg
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

    def start(self, ready_timeout: float = 60.0) -> None:
        """Check the settings, start every part and wait until the worker answers a ping."""
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
            self._spawn("worker", worker_argv(self.cfg), child_env(self.cfg))
            self._wait_worker(ready_timeout)
            # Flower before beat: it builds task pages from events, and a run
            # that beat starts at once must not happen before it listens.
            if self.with_flower:
                self._spawn("flower", flower_argv(self.cfg), child_env(self.cfg, flower=True))
                self._wait_flower(ready_timeout)
            if self.with_beat:
                self._spawn("beat", beat_argv(self.cfg), child_env(self.cfg))
        except BaseException:
            self.stop()
            raise

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

    def _wait_worker(self, timeout: float) -> None:
        app = client_app(self.cfg)
        node = f"formulabeat@{self.cfg.host}"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for name, proc in self.procs:
                    if proc.poll() is not None:
                        raise FormulabeatError(
                            f"the {name} exited at start (status {proc.returncode})"
                        )
                try:
                    if app.control.ping(destination=[node], timeout=0.5):
                        return
                except (OperationalError, redis.exceptions.ConnectionError):
                    time.sleep(0.2)  # Redis restarting: ask again
            raise FormulabeatError(f"the worker {node} did not answer within {timeout:g} s")
        finally:
            app.close()

    def _wait_flower(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_children()
            try:
                with socket.create_connection((self.cfg.flower_address, self.cfg.flower_port), 0.5):
                    time.sleep(0.5)  # listening on HTTP; its event consumer follows at once
                    return
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

    def stop(self, grace: float = 15.0, end_runs: bool = False) -> list[str]:
        """Stop every part: Flower and beat, then the worker, then Redis.

        With ``end_runs``, this host's live runs are cancelled in between, once
        no beat can start more, and their sessions end with them: without it
        (a worker restart) they live on for the next worker to adopt. Returns
        the ids of the runs it ended.
        """
        order = {"flower": 0, "beat": 1, "worker": 2}
        ended: list[str] = []
        for name, proc in sorted(self.procs, key=lambda item: order.get(item[0], 3)):
            if name == "worker" and end_runs and proc.poll() is None:
                # A second Ctrl-C, or no broker: stop without waiting.
                with contextlib.suppress(KeyboardInterrupt, redis.exceptions.RedisError):
                    ended = self._end_live_runs(grace * 4)
            _terminate(proc, grace if name == "worker" else 10.0)
        self.procs.clear()
        if self.redis is not None:
            embedded.stop_redis(self.redis)
            embedded.unpublish(self.cfg.state_dir)
            self.redis = None
        for log in self._logs:
            log.close()
        self._logs.clear()
        return ended

    def _end_live_runs(self, timeout: float) -> list[str]:
        client = redis_client(self.cfg)
        who = f"formulabeat up stopping on host {self.cfg.host}"
        ended: set[str] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [state["id"] for state in registry.live_states(client, self.cfg.host)]
            if not live:
                break
            for run_id in set(live) - ended:
                registry.request_cancel(client, run_id, who)
            ended.update(live)
            time.sleep(0.2)
        return sorted(ended)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """TERM (Celery's warm shutdown), then QUIT (cold), then KILL, to the process group."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
