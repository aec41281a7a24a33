"""A config changed while workers and beat run: taken up, or the error says which config runs."""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import redis

from beat_schedule import RUN_TASK
from tasks.app import client_app
from tasks.stack import Stack
from tests.conftest import Fleet, wait_result, wait_until
from workers.config import load_config

STATICS = "formulabeat:redbeat:statics"  # redbeat's set of the config's entries


def test_a_worker_runs_an_agent_added_while_it_runs(fleet: Fleet) -> None:
    fleet.add_agent("planner")
    fleet.write_config()
    fleet.start_worker()
    assert fleet.run("planner")["outcome"] == "done"
    fleet.add_agent("newbie", "phase=awaiting_ci phase=done")
    fleet.write_config()
    result = fleet.run("newbie")
    assert result["outcome"] == "done", result


def test_a_change_that_does_not_load_keeps_the_config_in_use_and_says_so(fleet: Fleet) -> None:
    fleet.add_agent("planner")
    fleet.write_config()
    fleet.start_worker()
    assert fleet.run("planner")["outcome"] == "done"
    fleet.add_agent("newbie")
    app = client_app(fleet.write_config())
    text = fleet.config_path.read_text()
    fleet.config_path.write_text(text + "\n[[agents]]\nname = 7\n")

    def run(agent: str) -> dict[str, Any]:
        return wait_result(app.send_task(RUN_TASK, args=["proj", agent], queue="formulabeat"))

    refused = run("newbie")
    assert refused["outcome"] == "failed"
    reason = refused["reason"]
    assert "has no agent 'newbie'" in reason, reason
    assert f"this process runs {fleet.config_path} as read at" in reason
    assert "the file changed since and does not load" in reason and "agents[" in reason
    # The config in use still works.
    assert run("planner")["outcome"] == "done"


def test_beat_schedules_the_agents_of_the_changed_file_and_survives_sighup(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("planner")
    fleet.write_config()
    cfg = dataclasses.replace(load_config(fleet.config_path), host="host-a")
    stack = Stack(cfg, flower=False, beat=True, log_dir=fleet.root / "logs")
    stack.start()
    fleet.stacks.append(stack)

    def scheduled() -> set[str]:
        names = {name.decode() for name in redis_client.smembers(STATICS)}
        return names & {"proj/planner", "proj/newbie"}

    wait_until(lambda: scheduled() == {"proj/planner"}, 30, "beat's first schedule")
    fleet.agents.pop("planner")
    fleet.add_agent("newbie")
    fleet.write_config()
    wait_until(lambda: scheduled() == {"proj/newbie"}, 30, "the new agent's entry, not the old")
    beat = next(proc for name, proc in stack.procs if name == "beat")
    log = fleet.root / "logs" / "beat.log"

    def reschedules() -> int:
        return log.read_text().count("beat: schedule of")

    before = reschedules()
    beat.send_signal(signal.SIGHUP)
    # It reads the file again at its next tick, and lives on.
    wait_until(lambda: reschedules() > before, 30, "beat to reschedule on SIGHUP")
    assert beat.poll() is None, "SIGHUP stopped beat"
    assert stack.alive() == []
