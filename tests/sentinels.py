"""A Sentinel-managed Redis on loopback for the tests: one master, two replicas, three Sentinels.

Every server is a real ``redis-server`` (the Sentinels with ``--sentinel``),
on free ports, its config (with the password) in a private directory, never
on the command line. ``down-after-milliseconds`` is short so that a master
killed is replaced within a few seconds.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from workers.embedded import free_port, redis_server_binary
from workers.statedir import private_dir, write_private

MASTER_NAME = "fbmaster"
DOWN_AFTER_MS = 1000


@dataclass
class SentinelLab:
    """The servers of one Sentinel group and what a client needs to reach its master."""

    root: Path
    # Where every server listens besides loopback, and the address the
    # Sentinels hand out (a bridge's for hosts in network namespaces).
    address: str = "127.0.0.1"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    data_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Celery's Sentinel form, the data password in its first part."""
        first, *rest = self.sentinel_ports
        parts = [f"sentinel://:{self.password}@{self.address}:{first}"]
        parts += [f"sentinel://{self.address}:{port}" for port in rest]
        return ";".join(parts)

    @property
    def _bind(self) -> str:
        return " ".join(dict.fromkeys((self.address, "127.0.0.1")))

    def start(self) -> None:
        """Start the master, its two replicas and three Sentinels; wait until all agree."""
        binary = redis_server_binary()
        self.data_ports = [free_port() for _ in range(3)]
        master = self.data_ports[0]
        for index, port in enumerate(self.data_ports):
            lines = [
                f"port {port}",
                f"bind {self._bind}",
                f"requirepass {self.password}",
                f"masterauth {self.password}",
                "appendonly yes",
            ]
            if index:
                lines.append(f"replicaof {self.address} {master}")
            self._spawn(binary, port, lines, sentinel=False)
        for _ in range(3):
            port = free_port()
            self.sentinel_ports.append(port)
            lines = [
                f"port {port}",
                f"bind {self._bind}",
                f"sentinel monitor {MASTER_NAME} {self.address} {master} 2",
                f"sentinel auth-pass {MASTER_NAME} {self.password}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER_NAME} 10000",
                f"sentinel parallel-syncs {MASTER_NAME} 2",
            ]
            self._spawn(binary, port, lines, sentinel=True)
        self.wait_for(lambda: self._agreed(replicas=2), 30, "the Sentinels to see both replicas")

    def _spawn(self, binary: str, port: int, lines: list[str], sentinel: bool) -> None:
        where = private_dir(self.root / str(port))
        conf = where / "redis.conf"
        write_private(conf, "\n".join([*lines, f'dir "{where}"']) + "\n")
        argv = [binary, str(conf), *(["--sentinel"] if sentinel else [])]
        log = (where / "log").open("wb")
        self.procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5, decode_responses=True)

    def master_port(self) -> int:
        """The master's port as the first Sentinel that answers names it."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                _, master = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(master)
        raise AssertionError("no Sentinel answered")

    def master(self) -> redis.Redis:
        """A client of the current master."""
        return redis.Redis(port=self.master_port(), password=self.password, socket_timeout=5)

    def _agreed(self, replicas: int) -> bool:
        seen = set()
        for port in self.sentinel_ports:
            try:
                client = self.sentinel(port)
                info = client.sentinel_master(MASTER_NAME)
                seen.add(int(info["port"]))
                up = [r for r in client.sentinel_slaves(MASTER_NAME) if not r["is_odown"]]
                if len(up) < replicas or info["num-other-sentinels"] < 2:
                    return False
            except redis.RedisError:
                return False
        return len(seen) == 1

    def failover(self) -> int:
        """``SENTINEL FAILOVER``; the new master's port once every Sentinel names it."""
        old = self.master_port()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sentinel(self.sentinel_ports[0]).execute_command(
                    "SENTINEL", "FAILOVER", MASTER_NAME
                )
                break
            except redis.ResponseError as exc:
                # NOGOODSLAVE: a replica just started is promotable only once
                # the Sentinel has its INFO (every 10 s before a failover).
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return self._moved_from(old)

    def kill_master(self) -> int:
        """``kill -9`` the master; the new master's port once the Sentinels name it."""
        old = self.master_port()
        self.procs[old].kill()
        self.procs[old].wait(10)
        return self._moved_from(old)

    def _moved_from(self, old: int) -> int:
        self.wait_for(lambda: self.master_port() != old, 60, "a new master")
        new = self.master_port()
        self.wait_for(
            lambda: self.master().info("replication")["role"] == "master", 30, "the new master"
        )
        return new

    @staticmethod
    def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, ValueError, KeyError):
                if predicate():
                    return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def stop(self) -> None:
        """Stop every server of the group."""
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
