"""A Sentinel-managed Redis on loopback for the tests: one master, two replicas, three Sentinels.

Every server is a real ``redis-server`` (the Sentinels with ``--sentinel``),
on free ports, its config (with the password) in a private directory, never
on the command line. ``down-after-milliseconds`` is short so that a master
killed is replaced within a few seconds. With ``tls``, every server speaks
TLS only (replication and the Sentinels' own links too), with certificates
from trustme, and asks each client for a certificate.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import trustme

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
    # TLS only, every client presenting a certificate (see _tls_lines).
    tls: bool = False

    @property
    def url(self) -> str:
        """Celery's Sentinel form, the data password in its first part.

        With TLS: the CA on the first part, the client's certificate on the
        last, as a URL may give them (kombu would read the first part only).
        """
        first, *rest = self.sentinel_ports
        scheme = "sentinels" if self.tls else "sentinel"
        parts = [f"{scheme}://:{self.password}@{self.address}:{first}"]
        parts += [f"{scheme}://{self.address}:{port}" for port in rest]
        if self.tls:
            files = self.tls_files
            parts[0] += f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(files['ca']))}"
            parts[-1] += (
                f"?ssl_certfile={quote(str(files['client']))}"
                f"&ssl_keyfile={quote(str(files['client_key']))}"
            )
        return ";".join(parts)

    @property
    def tls_files(self) -> dict[str, Path]:
        """The CA, the servers' certificate and key, a client's (written by start)."""
        where = self.root / "tls"
        names = ("ca", "server", "server_key", "client", "client_key")
        return {name: where / f"{name}.pem" for name in names}

    @property
    def client_tls(self) -> dict[str, Any]:
        """redis-py's arguments for a client of any server of the lab."""
        if not self.tls:
            return {}
        files = self.tls_files
        return {
            "ssl": True,
            "ssl_ca_certs": str(files["ca"]),
            "ssl_certfile": str(files["client"]),
            "ssl_keyfile": str(files["client_key"]),
        }

    @property
    def _bind(self) -> str:
        return " ".join(dict.fromkeys((self.address, "127.0.0.1")))

    def _listen(self, port: int) -> list[str]:
        """Where a server listens: ``port`` in plain TCP, or TLS only."""
        if not self.tls:
            return [f"port {port}", f"bind {self._bind}"]
        files = self.tls_files
        return [
            "port 0",
            f"tls-port {port}",
            f"bind {self._bind}",
            f'tls-cert-file "{files["server"]}"',
            f'tls-key-file "{files["server_key"]}"',
            f'tls-ca-cert-file "{files["ca"]}"',
            # A client without a certificate the CA signed is refused: a
            # connection that leaves out the URL's ssl_certfile fails.
            "tls-auth-clients yes",
            # Replicas to their master, the Sentinels to the servers and to
            # one another: over TLS too (the server's certificate as the client's).
            "tls-replication yes",
        ]

    def _write_certificates(self) -> None:
        files = self.tls_files
        private_dir(files["ca"].parent)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(files["ca"]))
        server = ca.issue_cert(*dict.fromkeys((self.address, "127.0.0.1", "localhost")))
        server.cert_chain_pems[0].write_to_path(str(files["server"]))
        server.private_key_pem.write_to_path(str(files["server_key"]))
        client = ca.issue_cert("formulabeat-client")
        client.cert_chain_pems[0].write_to_path(str(files["client"]))
        client.private_key_pem.write_to_path(str(files["client_key"]))

    def start(self) -> None:
        """Start the master, its two replicas and three Sentinels; wait until all agree."""
        binary = redis_server_binary()
        if self.tls:
            self._write_certificates()
        self.data_ports = [free_port() for _ in range(3)]
        master = self.data_ports[0]
        for index, port in enumerate(self.data_ports):
            lines = [
                *self._listen(port),
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
                *self._listen(port),
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
        return redis.Redis(port=port, socket_timeout=5, decode_responses=True, **self.client_tls)

    def master_port(self) -> int:
        """The master's port as the first Sentinel that answers names it."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                _, master = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(master)
        raise AssertionError("no Sentinel answered")

    def master(self) -> redis.Redis:
        """A client of the current master."""
        return redis.Redis(
            port=self.master_port(), password=self.password, socket_timeout=5, **self.client_tls
        )

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


def doctor(where: Path, url: str, master_name: str) -> subprocess.CompletedProcess[str]:
    """``formulabeat doctor`` for a config in ``where`` naming ``url`` and ``master_name``."""
    config = where / "formulabeat.toml"
    broker = f'[broker]\nurl = "{url}"\nmaster_name = "{master_name}"\n'
    config.write_text(f'state_dir = "state"\n{broker}')
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--config", str(config), "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
