"""Flower shows a run's current phase while it runs, and its outcome when it ended."""

from __future__ import annotations

from beat_schedule import REAP_TASK
from tasks.app import client_app
from tests.conftest import Fleet, get_json, wait_result, wait_until
from workers.run import RunEnded


def test_flower_api_shows_the_runs_current_phase(fleet: Fleet) -> None:
    fleet.add_agent("predictor", "phase=awaiting_ci sleep=4 phase=done")
    _, api = fleet.start_flower()
    sent = fleet.send("predictor")

    def flower_state() -> str | None:
        task = get_json(f"{api}/task/info/{sent.id}")
        state = task.get("state") if isinstance(task, dict) else None
        return state if state == "AWAITING_CI" else None

    assert wait_until(flower_state, 60, "Flower to show AWAITING_CI") == "AWAITING_CI"
    listed = get_json(f"{api}/tasks?state=AWAITING_CI")
    assert isinstance(listed, dict) and sent.id in listed
    assert wait_result(sent)["outcome"] == "done"


def test_flower_shows_each_runs_outcome_and_not_the_upkeep(fleet: Fleet) -> None:
    # A crashed and a skipped run must not look like successes; the reaper,
    # sent every 15 s, must not fill Flower's task list.
    fleet.add_agent("fragile", "crash", idle_timeout=120)
    fleet.add_agent("off", enabled=False)
    fleet.add_agent("fine", "phase=done")
    cfg, api = fleet.start_flower()
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
        tasks = get_json(f"{api}/tasks")
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
    listed = get_json(f"{api}/tasks")
    assert isinstance(listed, dict)
    assert [t for t in listed.values() if t.get("name") == REAP_TASK] == []


def test_flower_shows_a_run_waiting_for_the_api_as_retry_with_its_error(fleet: Fleet) -> None:
    fleet.add_agent(
        "planner",
        "phase=awaiting_ci apifail=rate_limit:Request_rejected_(429) phase=done",
        api_retry_delay=10,
    )
    _, api = fleet.start_flower()
    sent = fleet.send("planner")

    def waiting() -> dict[str, object] | None:
        task = get_json(f"{api}/task/info/{sent.id}")
        return task if isinstance(task, dict) and task.get("state") == "RETRY" else None

    task = wait_until(waiting, 60, "Flower to show RETRY")
    assert "rate_limit: Request rejected (429) (try 1 of 3, goes on at " in str(task["exception"])
    assert wait_result(sent)["outcome"] == "done"
    # Going on replaces RETRY, as a Celery task retried does.
    assert wait_until(
        lambda: (get_json(f"{api}/task/info/{sent.id}") or {}).get("state") == "SUCCESS", 30
    )
