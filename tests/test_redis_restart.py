"""Redis restarted in the middle of a run: the run goes on and its result arrives."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Fleet, commit_files, held_claims, wait_result
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
