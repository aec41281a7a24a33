"""Redis restarted in the middle of a run: the run goes on and its result arrives."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Fleet, commit_files, held_claims, wait_result, wait_until
from workers import registry
from workers.embedded import start_redis, stop_redis


def test_a_redis_restart_mid_run_loses_nothing(tmp_path: Path, tmux_socket: str) -> None:
    server = start_redis(tmp_path / "redis-data")
    password = server.url.split(":")[2].split("@")[0]
    commit_files(tmp_path / "project", {"README.md": "# proj\n"})
    commit_files(tmp_path / "ops", {"journal.md": "# journal\n"})
    fleet = Fleet(root=tmp_path, redis_url=server.url, tmux_socket=tmux_socket)
    try:
        fleet.add_agent("planner", "phase=awaiting_ci sleep=4 phase=done")
        fleet.write_config()
        fleet.start_worker()
        sent = fleet.send_live("planner")
        stop_redis(server)
        server = start_redis(tmp_path / "redis-data", port=server.port, password=password)
        result = wait_result(sent, 120)
        assert result["outcome"] == "done"
        assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
        assert held_claims(server.client()) == []
        # The same worker process still serves after the restart.
        assert fleet.run("planner")["outcome"] == "done"
        assert fleet.stacks[0].alive() == []
    finally:
        for stack in fleet.stacks:
            stack.stop()
        stop_redis(server)


def test_a_run_being_prepared_when_redis_goes_away_is_prepared_again(
    tmp_path: Path, tmux_socket: str
) -> None:
    # The second run waits for the credential's one slot, asking Redis every
    # 0.25 s, when Redis goes away: it is prepared again once Redis is back.
    server = start_redis(tmp_path / "redis-data")
    password = server.url.split(":")[2].split("@")[0]
    commit_files(tmp_path / "project", {"README.md": "# proj\n"})
    commit_files(tmp_path / "ops", {"journal.md": "# journal\n"})
    fleet = Fleet(root=tmp_path, redis_url=server.url, tmux_socket=tmux_socket)
    try:
        fleet.add_agent("first", "phase=awaiting_ci sleep=6 phase=done", credential="one")
        fleet.add_agent("second", "phase=done", credential="one")
        fleet.write_config("\n[credentials.one]\nmax_sessions = 1\nwait = 120\n")
        fleet.start_worker()
        first = fleet.send_live("first")
        second = fleet.send("second")
        client = server.client()
        wait_until(
            lambda: (registry.get(client, second.id) or {}).get("state") == "WAITING_FOR_SLOT",
            30,
            "the second run to wait for the slot",
        )
        stop_redis(server)
        server = start_redis(tmp_path / "redis-data", port=server.port, password=password)
        assert wait_result(first, 120)["outcome"] == "done"
        result = wait_result(second, 120)
        assert result["outcome"] == "done", result
        assert held_claims(server.client()) == []
        log = (fleet.root / "logs-host-a" / "worker.log").read_text()
        assert f"run {second.id}: Redis went away while preparing" in log
    finally:
        for stack in fleet.stacks:
            stack.stop()
        stop_redis(server)
