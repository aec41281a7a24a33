"""Flower shows a run's current phase while it runs, and its outcome when it ended."""

from __future__ import annotations

import dataclasses

import requests

from beat_schedule import REAP_TASK
from tasks.app import client_app
from tasks.stack import Stack
from tests.conftest import Fleet, wait_result, wait_until
from workers.config import Config, load_config
from workers.embedded import free_port
from workers.run import RunEnded


def test_flower_api_shows_the_runs_current_phase(fleet: Fleet) -> None:
    fleet.add_agent("predictor", "phase=awaiting_ci sleep=4 phase=done")
    _, api = _with_flower(fleet)
    sent = fleet.send("predictor")

    def flower_state() -> str | None:
        task = _get(f"{api}/task/info/{sent.id}")
        state = task.get("state") if isinstance(task, dict) else None
        return state if state == "AWAITING_CI" else None

    assert wait_until(flower_state, 60, "Flower to show AWAITING_CI") == "AWAITING_CI"
    listed = _get(f"{api}/tasks?state=AWAITING_CI")
    assert isinstance(listed, dict) and sent.id in listed
    assert wait_result(sent)["outcome"] == "done"


def _with_flower(fleet: Fleet) -> tuple[Config, str]:
    """A worker and Flower for the fleet's agents; its config and Flower's API URL."""
    fleet.write_config(f"\n[flower]\nport = {free_port()}\n")
    cfg = dataclasses.replace(load_config(fleet.config_path), host="host-a")
    stack = Stack(cfg, flower=True, beat=False, log_dir=fleet.root / "logs")
    stack.start()
    fleet.stacks.append(stack)
    api = f"http://127.0.0.1:{cfg.flower_port}/api"
    wait_until(lambda: _get(f"{api}/workers") is not None, 60, "Flower's API")
    return cfg, api


def _get(url: str) -> object | None:
    try:
        response = requests.get(url, timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def test_flower_shows_each_runs_outcome_and_not_the_upkeep(fleet: Fleet) -> None:
    # A crashed and a skipped run must not look like successes; the reaper,
    # sent every 15 s, must not fill Flower's task list.
    fleet.add_agent("fragile", "crash", idle_timeout=120)
    fleet.add_agent("off", enabled=False)
    fleet.add_agent("fine", "phase=done")
    cfg, api = _with_flower(fleet)
    app = client_app(cfg)
    for _ in range(3):
        app.send_task(REAP_TASK, queue="formulabeat").get(timeout=30)
    runs = {name: fleet.send(name) for name in ("fragile", "off", "fine")}
    outcomes = {name: wait_result(sent)["outcome"] for name, sent in runs.items()}
    assert outcomes == {"fragile": "crashed", "off": "skipped", "fine": "done"}
    assert {name: sent.state for name, sent in runs.items()} == {
        "fragile": "FAILURE",
        "off": "REVOKED",
        "fine": "SUCCESS",
    }
    assert isinstance(runs["fragile"].result, RunEnded)  # .get() raises it, with the dict

    def flower_states() -> dict[str, str] | None:
        tasks = _get(f"{api}/tasks")
        if not isinstance(tasks, dict):
            return None
        states = {name: tasks.get(sent.id, {}).get("state") for name, sent in runs.items()}
        return states if all(states.values()) else None

    # Celery's event state never lets REVOKED replace a custom state, so
    # Flower keeps the outcome's own (task-skipped): still not a success.
    assert wait_until(flower_states, 30, "Flower's states") == {
        "fragile": "FAILURE",
        "off": "SKIPPED",
        "fine": "SUCCESS",
    }
    listed = _get(f"{api}/tasks")
    assert isinstance(listed, dict)
    assert [t for t in listed.values() if t.get("name") == REAP_TASK] == []


def test_flower_shows_a_run_waiting_for_the_api_as_retry_with_its_error(fleet: Fleet) -> None:
    fleet.add_agent(
        "planner",
        "phase=awaiting_ci apifail=rate_limit:Request_rejected_(429) phase=done",
        api_retry_delay=10,
    )
    _, api = _with_flower(fleet)
    sent = fleet.send("planner")

    def waiting() -> dict[str, object] | None:
        task = _get(f"{api}/task/info/{sent.id}")
        return task if isinstance(task, dict) and task.get("state") == "RETRY" else None

    task = wait_until(waiting, 60, "Flower to show RETRY")
    assert "rate_limit: Request rejected (429) (try 1 of 3, goes on at " in str(task["exception"])
    assert wait_result(sent)["outcome"] == "done"
    # Going on replaces RETRY, as a Celery task retried does.
    assert wait_until(
        lambda: (_get(f"{api}/task/info/{sent.id}") or {}).get("state") == "SUCCESS", 30
    )
