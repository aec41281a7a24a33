"""Tokens and the Redis password never show where they must not, across whole runs."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.app import client_app
from tests.conftest import Fleet, wait_result, wait_until
from workers.config import load_config

FORGE = "tok-FORGE-5f3a9c"
API_KEY = "sk-API-KEY-77e1d0"
PROXY_PASSWORD = "PROXY-PASS-91c2"
LITERAL = "lit-SECRET-4e07"


def _all_redis_bytes(client: redis.Redis) -> bytes:
    chunks = []
    for key in client.scan_iter("*"):
        chunks.append(key)
        kind = client.type(key)
        if kind == b"string":
            chunks.append(client.get(key) or b"")
        elif kind == b"list":
            chunks += client.lrange(key, 0, -1)
        elif kind == b"hash":
            chunks += [k + v for k, v in client.hgetall(key).items()]
        elif kind == b"zset":
            chunks += client.zrange(key, 0, -1)
        elif kind == b"set":
            chunks += list(client.smembers(key))
    return b"\n".join(chunks)


def test_no_secret_leaks_from_a_run(
    fleet: Fleet, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = fleet.redis_url.split(":")[2].split("@")[0] if fleet.redis_url else ""
    monkeypatch.setenv("FORGE_TOKEN", FORGE)
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.setenv("HTTPS_PROXY", f"http://fb:{PROXY_PASSWORD}@proxy.internal:3128")
    agent_log = fleet.root / "agent.log"
    fleet.add_agent(
        "planner",
        f"log={agent_log} phase=awaiting_ci sleep=2 phase=done",
        pass_env=["HTTPS_PROXY", "NOT_SET_ANYWHERE"],
        env={"CUSTOM_TOKEN": LITERAL},
    )
    fleet.write_config()
    fleet.start_worker()
    app = client_app(load_config(fleet.config_path))
    events: list[dict[str, Any]] = []
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        listener = threading.Thread(
            target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True
        )
        listener.start()
        sent = fleet.send_live("planner")
        # While the session lives: what other sessions on the server could read.
        server_env = subprocess.run(
            ["tmux", "-L", fleet.tmux_socket, "show-environment", "-g"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        sessions = subprocess.run(
            ["tmux", "-L", fleet.tmux_socket, "list-sessions", "-F", "#{session_name}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        session_env = subprocess.run(
            ["tmux", "-L", fleet.tmux_socket, "show-environment", "-t", f"={sessions.split()[0]}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        cmdlines = b"".join(
            p.joinpath("cmdline").read_bytes()
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and p.joinpath("cmdline").exists()
        )
        result = wait_result(sent)
        wait_until(lambda: any(e.get("type") == "task-succeeded" for e in events), 30, "events")
        receiver.should_stop = True
    assert result["outcome"] == "done"
    places = {
        "result": json.dumps(result).encode(),
        "events": json.dumps(events, default=str).encode(),
        "redis": _all_redis_bytes(redis_client),
        "tmux server environment": server_env.encode(),
        "tmux session environment": session_env.encode(),
        "session names": sessions.encode(),
        "process arguments": cmdlines,
        "worker log": (fleet.root / "logs-host-a" / "worker.log").read_bytes(),
        "git config": b"".join(p.read_bytes() for p in fleet.root.rglob(".git/config")),
    }
    assert len(events) > 5
    for place, data in places.items():
        for secret in (FORGE, API_KEY, PROXY_PASSWORD, LITERAL, password):
            assert secret.encode() not in data, f"{secret[:6]}… found in {place}"
    # The agent got them, through its 0600 launch file (the log has names only).
    start = next(
        json.loads(line) for line in agent_log.read_text().splitlines() if '"start"' in line
    )
    assert {"HTTPS_PROXY", "CUSTOM_TOKEN", "FORGE_TOKEN", "ANTHROPIC_API_KEY"} <= set(start["env"])
    assert "NOT_SET_ANYWHERE" not in start["env"]
