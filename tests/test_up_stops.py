"""`formulabeat up` stops what it started, live runs included, and checks its settings first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import Fleet, tmux_sessions, wait_until
from workers import embedded, registry
from workers.locks import agent_lock_key

FORMULABEAT = [sys.executable, "-m", "tasks.cli"]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FORMULABEAT, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_ctrl_c_on_up_ends_the_live_runs_and_their_sessions(fleet: Fleet) -> None:
    fleet.redis_url = None  # the embedded default
    fleet.add_agent("planner", "phase=awaiting_ci sleep=300")
    fleet.write_config()
    env = {**os.environ, "FORMULABEAT_CONFIG": str(fleet.config_path)}
    state = fleet.root / "state"
    with (fleet.root / "up.log").open("wb") as log:
        up = subprocess.Popen(
            [*FORMULABEAT, "up", "--no-flower"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            url = wait_until(lambda: embedded.published_url(state), 30, "embedded Redis")
            sent = _cli(env, "run", "proj", "planner")
            assert sent.returncode == 0, sent.stderr
            run_id = sent.stdout.strip()
            client = embedded.EmbeddedRedis(url, 0, 0, state).client()
            wait_until(
                lambda: (registry.get(client, run_id) or {}).get("state") == "AWAITING_CI",
                60,
                "the run to be live",
            )
            assert len(tmux_sessions(fleet.tmux_socket)) == 1
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=120)
    assert up.returncode == 0
    assert tmux_sessions(fleet.tmux_socket) == []
    assert f"cancelled {run_id}" in (fleet.root / "up.log").read_text()
    # The run's end is in the embedded Redis's data: cancelled, its lease free.
    again = embedded.start_redis(state / "redis")
    try:
        record = registry.get(again.client(), run_id) or {}
        assert record.get("outcome") == "cancelled", record
        assert "formulabeat up stopping" in record.get("reason", "")
        assert again.client().get(agent_lock_key("proj", "planner")) is None
    finally:
        embedded.stop_redis(again)


def test_up_checks_flowers_settings_before_it_starts_anything(tmp_path: Path) -> None:
    config = tmp_path / "formulabeat.toml"
    config.write_text('state_dir = "state"\n[flower]\naddress = "0.0.0.0"\n')
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    proc = _cli({**env, "FORMULABEAT_CONFIG": str(config)}, "up")
    assert proc.returncode == 4, proc.stderr
    assert "flower.address 0.0.0.0 listens beyond loopback" in proc.stderr
    assert "FLOWER_BASIC_AUTH=user:password" in proc.stderr
    assert not (tmp_path / "state").exists(), "up started something before refusing"
