"""`formulabeat up` stops what it started, live runs included, and checks its settings first.

However a stop comes (a Ctrl-C once up runs, one while it still starts, a
second one while it stops, a worker that died), the host's live runs end
`cancelled`: their sessions killed, their leases and slots freed, their
results stored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import Fleet, held_claims, tmux_sessions, wait_until
from workers import embedded, registry
from workers.embedded import free_port

FORMULABEAT = [sys.executable, "-m", "tasks.cli"]
# Flower executes ./flowerconfig.py as it starts: this one keeps it from ever
# listening, so `up` is still starting, waiting for Flower, whatever its worker did.
FLOWER_NEVER_LISTENS = "import time\ntime.sleep(3600)\n"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FORMULABEAT, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


class Up:
    """`formulabeat up` in its own process, on the fleet's config, until it exits.

    Used as a context: leaving it waits for up's exit (its status in
    ``code``), after a Ctrl-C when the test itself failed first.
    """

    def __init__(self, fleet: Fleet, *args: str) -> None:
        self.fleet = fleet
        self.env = {**os.environ, "FORMULABEAT_CONFIG": str(fleet.config_path)}
        self.state = fleet.root / "state"
        self.code: int | None = None
        # Flower executes ./flowerconfig.py as it starts: up runs in the fleet's root.
        with (fleet.root / "up.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [*FORMULABEAT, "up", *args],
                env=self.env,
                cwd=fleet.root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def __enter__(self) -> Up:
        return self

    def __exit__(self, failed: type[BaseException] | None, *_: object) -> None:
        if failed is not None and self.proc.poll() is None:
            self.interrupt()
        self.code = self.proc.wait(timeout=240)

    @property
    def log(self) -> str:
        return (self.fleet.root / "up.log").read_text()

    def live_run(self) -> str:
        """Send a run of the planner; its id once its agent is at work."""
        url = wait_until(lambda: embedded.published_url(self.state), 60, "embedded Redis")
        sent = _cli(self.env, "run", "proj", "planner")
        assert sent.returncode == 0, sent.stderr
        run_id = sent.stdout.strip()
        client = embedded.EmbeddedRedis(url, 0, 0, self.state).client()
        wait_until(
            lambda: (registry.get(client, run_id) or {}).get("state") == "AWAITING_CI",
            120,
            "the run to be live",
        )
        assert len(tmux_sessions(self.fleet.tmux_socket)) == 1
        return run_id

    def started(self) -> None:
        """Wait until up has started all its parts."""
        wait_until(lambda: "(Ctrl-C stops)" in self.log, 60, "up to have started")

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)


def _fleet_of_one(fleet: Fleet, extra: str = "", **monitor: float) -> None:
    fleet.redis_url = None  # the embedded default
    fleet.add_agent("planner", "phase=awaiting_ci sleep=300")
    fleet.write_config(extra, monitor=monitor)


def assert_ended_as_cancelled(up: Up, run_id: str) -> None:
    """The run ended cancelled by up, nothing of it is left, and its result is stored."""
    assert tmux_sessions(up.fleet.tmux_socket) == []
    assert f"cancelled {run_id}" in up.log, up.log
    # The run's end is in the embedded Redis's data: cancelled, its lease and slot free.
    again = embedded.start_redis(up.state / "redis")
    try:
        client = again.client()
        record = registry.get(client, run_id) or {}
        assert record.get("outcome") == "cancelled", record
        assert "formulabeat up stopping" in record.get("reason", "")
        assert held_claims(client) == []
        assert registry.hosts_with_live_runs(client) == []
        stored = json.loads(client.get(f"celery-task-meta-{run_id}") or "{}")
        assert stored.get("status") == "REVOKED", stored
    finally:
        embedded.stop_redis(again)


def test_ctrl_c_on_up_ends_the_live_runs_and_their_sessions(fleet: Fleet) -> None:
    _fleet_of_one(fleet)
    with Up(fleet, "--no-flower") as up:
        run_id = up.live_run()
        up.started()
        up.interrupt()
    assert up.code == 0, up.log
    assert_ended_as_cancelled(up, run_id)


def test_ctrl_c_while_up_still_starts_ends_the_run_its_worker_took(fleet: Fleet) -> None:
    _fleet_of_one(fleet, f"\n[flower]\nport = {free_port()}\n")
    (fleet.root / "flowerconfig.py").write_text(FLOWER_NEVER_LISTENS)
    with Up(fleet) as up:
        run_id = up.live_run()
        assert "(Ctrl-C stops)" not in up.log  # still starting: Flower never listens
        up.interrupt()
    assert up.code == 0, up.log
    assert_ended_as_cancelled(up, run_id)


def test_a_second_ctrl_c_while_up_stops_still_ends_the_live_runs(fleet: Fleet) -> None:
    # The watcher looks for cancel requests only every liveness_interval: at
    # this one, never while the test runs, so up must end the run itself.
    _fleet_of_one(fleet, liveness_interval=3600)
    with Up(fleet, "--no-flower") as up:
        run_id = up.live_run()
        up.started()
        up.interrupt()
        wait_until(lambda: "stopping" in up.log, 60, "up to begin stopping")
        up.interrupt()
    assert up.code == 0, up.log
    assert_ended_as_cancelled(up, run_id)


def test_up_whose_worker_died_ends_the_runs_it_left(fleet: Fleet) -> None:
    _fleet_of_one(fleet)
    with Up(fleet, "--no-flower") as up:
        run_id = up.live_run()
        up.started()
        parts = psutil.Process(up.proc.pid).children()
        next(part for part in parts if "worker" in part.cmdline()).kill()
    assert up.code == 1, up.log  # one of its processes exited
    assert "worker exited; stopping" in up.log
    assert_ended_as_cancelled(up, run_id)


def test_up_checks_flowers_settings_before_it_starts_anything(tmp_path: Path) -> None:
    config = tmp_path / "formulabeat.toml"
    config.write_text('state_dir = "state"\n[flower]\naddress = "0.0.0.0"\n')
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    proc = _cli({**env, "FORMULABEAT_CONFIG": str(config)}, "up")
    assert proc.returncode == 4, proc.stderr
    assert "flower.address 0.0.0.0 listens beyond loopback" in proc.stderr
    assert "FLOWER_BASIC_AUTH=user:password" in proc.stderr
    assert not (tmp_path / "state").exists(), "up started something before refusing"
