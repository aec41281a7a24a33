"""Flower shows a run's current phase while it runs (the phase is in the event name)."""

from __future__ import annotations

import dataclasses

import requests

from tasks.stack import Stack
from tests.conftest import Fleet, wait_result, wait_until
from workers.config import load_config
from workers.embedded import free_port


def test_flower_api_shows_the_runs_current_phase(fleet: Fleet) -> None:
    fleet.add_agent("predictor", "phase=awaiting_ci sleep=4 phase=done")
    fleet.write_config(f"\n[flower]\nport = {free_port()}\n")
    cfg = dataclasses.replace(load_config(fleet.config_path), host="host-a")
    stack = Stack(cfg, flower=True, beat=False, log_dir=fleet.root / "logs")
    stack.start()
    fleet.stacks.append(stack)
    api = f"http://127.0.0.1:{cfg.flower_port}/api"
    wait_until(lambda: _get(f"{api}/workers") is not None, 60, "Flower's API")
    sent = fleet.send("predictor")

    def flower_state() -> str | None:
        task = _get(f"{api}/task/info/{sent.id}")
        state = task.get("state") if isinstance(task, dict) else None
        return state if state == "AWAITING_CI" else None

    assert wait_until(flower_state, 60, "Flower to show AWAITING_CI") == "AWAITING_CI"
    listed = _get(f"{api}/tasks?state=AWAITING_CI")
    assert isinstance(listed, dict) and sent.id in listed
    assert wait_result(sent)["outcome"] == "done"


def _get(url: str) -> object | None:
    try:
        response = requests.get(url, timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None
