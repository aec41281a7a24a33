"""Redis behind Sentinel: runs go on through a failover and a killed master."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Fleet, commit_files, held_claims, tmux_sessions, wait_result
from tests.sentinels import MASTER_NAME, SentinelLab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SentinelLab]:
    """A master, two replicas and three Sentinels, stopped after the test."""
    group = SentinelLab(tmp_path / "sentinels")
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def ha_fleet(tmp_path: Path, lab: SentinelLab, tmux_socket: str) -> Iterator[Fleet]:
    """A fleet whose broker URL names the Sentinels, not a Redis."""
    commit_files(tmp_path / "project", {"README.md": "# proj\n"})
    commit_files(tmp_path / "ops", {"journal.md": "# journal\n"})
    fleet = Fleet(
        root=tmp_path,
        redis_url=lab.url,
        tmux_socket=tmux_socket,
        broker_settings=f'master_name = "{MASTER_NAME}"\n',
    )
    yield fleet
    for stack in fleet.stacks:
        stack.stop()


def test_a_run_through_sentinel_ends_done(ha_fleet: Fleet, lab: SentinelLab) -> None:
    ha_fleet.add_agent("planner", "phase=awaiting_ci phase=done")
    ha_fleet.write_config()
    ha_fleet.start_worker()
    result = ha_fleet.run("planner", timeout=120)
    assert result["outcome"] == "done", result
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    assert held_claims(lab.master()) == []


@pytest.mark.sentinel  # make sentinel
@pytest.mark.parametrize("fault", ["failover", "kill_master"])
def test_live_runs_come_through_a_new_master(ha_fleet: Fleet, lab: SentinelLab, fault: str) -> None:
    for name in ("first", "second"):
        ha_fleet.add_agent(name, "phase=awaiting_ci sleep=8 phase=done")
    ha_fleet.write_config()
    ha_fleet.start_worker()
    live = [ha_fleet.send_live(name, timeout=120) for name in ("first", "second")]
    old = lab.master_port()
    assert getattr(lab, fault)() != old
    for sent in live:
        result = wait_result(sent, 180)
        assert result["outcome"] == "done", result
        assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
        assert result["recoveries"] == 0 and result.get("restarts", 0) == 0
    assert held_claims(lab.master()) == []
    assert tmux_sessions(ha_fleet.tmux_socket) == []
    # The worker still serves on the new master.
    assert ha_fleet.run("first", timeout=120)["outcome"] == "done"


def test_doctor_names_the_master_the_sentinels_agree_on_and_fails_an_unknown_one(
    tmp_path: Path, lab: SentinelLab
) -> None:
    def doctor(master_name: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "formulabeat.toml"
        config.write_text(
            f'state_dir = "state"\n[broker]\nurl = "{lab.url}"\nmaster_name = "{master_name}"\n'
        )
        return subprocess.run(
            [sys.executable, "-m", "tasks.cli", "--config", str(config), "doctor"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    known = doctor(MASTER_NAME)
    line = f"master '{MASTER_NAME}' at 127.0.0.1:{lab.master_port()}: 3 of 3 Sentinels answered"
    assert line in known.stdout and "3 agree; 2 replicas" in known.stdout, known.stdout
    assert lab.password not in known.stdout + known.stderr
    unknown = doctor("nope")
    assert unknown.returncode == 4, unknown.stdout + unknown.stderr
    assert "knows no master 'nope'" in unknown.stdout
    assert "Traceback" not in unknown.stderr
