"""Prometheus metrics from a worker: runs by outcome, phases, skips, live sessions, latency."""

from __future__ import annotations

import redis
import requests

from tests.conftest import Fleet, wait_until
from workers.embedded import free_port
from workers.locks import Lease, agent_lock_key


def test_a_worker_serves_run_phase_skip_and_latency_metrics(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    port = free_port()
    fleet.add_agent("planner", "phase=awaiting_ci phase=done")
    fleet.add_agent("held")
    fleet.write_config(metrics_port=port)
    fleet.start_worker()
    url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: _get(url), 30, "the metrics endpoint")
    assert fleet.run("planner")["outcome"] == "done"
    Lease.acquire(redis_client, agent_lock_key("proj", "held"), "someone", "host-z", 60)
    assert fleet.run("held")["outcome"] == "skipped"
    text = _get(url)
    assert 'formulabeat_runs_total{agent="planner",outcome="done",project="proj"} 1.0' in text
    assert 'formulabeat_runs_total{agent="held",outcome="skipped",project="proj"} 1.0' in text
    assert (
        'formulabeat_phase_transitions_total{agent="planner",phase="PHASE:done",project="proj"} 1.0'
        in text
    )
    assert 'formulabeat_skips_total{agent="held",kind="already_running",project="proj"} 1.0' in text
    assert "formulabeat_live_sessions 0.0" in text
    assert "formulabeat_phase_detection_seconds_count" in text


def _get(url: str) -> str:
    try:
        response = requests.get(url, timeout=5)
    except requests.RequestException:
        return ""
    return response.text if response.status_code == 200 else ""
