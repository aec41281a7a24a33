"""Runs that outlast the API's bad days: waits in RETRY, going on, limits shared by every host.

The scripted agent ends a turn on an API error as Claude Code does (its
StopFailure hook, then its prompt again) and takes up its scenario where it
stopped when told to go on; tests/test_real_cli_api_errors.py does the same
with the real CLI against the Messages API stand-in.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from beat_schedule import DEFAULT_QUEUE, REAP_TASK
from tasks.app import client_app
from tests.conftest import Fleet, held_claims, tmux_sessions, wait_result, wait_until
from workers import quota, registry
from workers.apierrors import classify, format_time, retry_delay, stated_reset
from workers.config import load_config
from workers.errors import ConfigError
from workers.run import RunWaiting

CLI = [sys.executable, "-m", "tasks.cli"]
OVERLOADED = "apifail=server_error:API_Error:_529_Overloaded"


def _at(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def _events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# -- reading what the CLI says ------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "now", "expected"),
    [
        # Claude Code 2.1.197, logged in with a subscription (measured).
        (
            "You've hit your session limit · resets 4:58pm (UTC)",
            "2026-12-02T15:57:55+00:00",
            "2026-12-02T16:58:00+00:00",
        ),
        # A time just gone is now, not tomorrow; one long gone is tomorrow.
        ("limit · resets 4:58pm (UTC)", "2026-12-02T16:58:40+00:00", "2026-12-02T16:58:00+00:00"),
        ("limit · resets 4pm (UTC)", "2026-12-02T17:30:00+00:00", "2026-12-03T16:00:00+00:00"),
        # The zone it names, a date, 24-hour clocks, ISO times, relative times.
        (
            "resets 9:15am (Europe/Paris)",
            "2026-12-02T06:00:00+00:00",
            "2026-12-02T08:15:00+00:00",
        ),
        (
            "You've hit your weekly limit · resets Dec 9, 4pm (UTC)",
            "2026-12-02T10:00:00+00:00",
            "2026-12-09T16:00:00+00:00",
        ),
        ("resets Jan 2 at 10:00 (UTC)", "2026-12-30T10:00:00+00:00", "2027-01-02T10:00:00+00:00"),
        (
            "quota resets at 2026-12-02T18:00:00Z",
            "2026-12-02T10:00:00+00:00",
            "2026-12-02T18:00:00+00:00",
        ),
        (
            "Please try again in 90 seconds.",
            "2026-12-02T10:00:00+00:00",
            "2026-12-02T10:01:30+00:00",
        ),
        ("retry-after: 30", "2026-12-02T10:00:00+00:00", "2026-12-02T10:00:30+00:00"),
        (
            "Claude AI usage limit reached|1796230670",
            "2026-12-02T10:00:00+00:00",
            "2026-12-02T16:57:50+00:00",
        ),
    ],
)
def test_a_reset_time_the_cli_states_is_read(message: str, now: str, expected: str) -> None:
    assert stated_reset(message, _at(now)) == _at(expected)


@pytest.mark.parametrize(
    "message",
    [
        "API Error: 529 Overloaded. This is a server-side issue, usually temporary",
        "API Error: Request rejected (429) · rate limited",
        "API Error: Unable to connect to API (ConnectionRefused)",
        "resets soon",
        "resets 25:00 (UTC)",
    ],
)
def test_a_message_that_states_no_reset_leaves_the_delay(message: str) -> None:
    assert stated_reset(message, time.time()) is None


def test_transient_kinds_wait_and_the_others_fail_with_a_fix() -> None:
    now = time.time()
    for kind in ("rate_limit", "server_error", "unknown"):
        assert classify(kind, "x", now).transient, kind
    refused = classify("authentication_failed", "Invalid API key", now, {"x": "y"})
    assert not refused.transient and refused.fix and "authentication_failed" in refused.fix
    # The delay doubles from the agent's setting, and stops at 30 minutes.
    assert [retry_delay(60, n) for n in (1, 2, 3, 7)] == [60, 120, 240, 1800]


def test_bad_retry_settings_name_the_key(fleet: Fleet) -> None:
    for options, key, problem in (
        ({"api_retries": -1}, "api_retries", "must be 0 or more"),
        ({"api_retry_delay": 0}, "api_retry_delay", "must be greater than 0"),
        ({"on_limit": "later"}, "on_limit", "'later' is not a choice"),
    ):
        fleet.agents.clear()
        fleet.add_agent("planner", **options)
        with pytest.raises(ConfigError) as caught:
            fleet.write_config()
        assert f"(proj/planner).{key}: {problem}" in str(caught.value)


# -- waiting and going on -----------------------------------------------------------


def test_a_turn_ended_by_an_overload_waits_in_retry_with_its_error_keeping_its_lease(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("planner", f"phase=awaiting_ci {OVERLOADED} phase=done", api_retry_delay=600)
    fleet.write_config()
    fleet.start_worker()
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RETRY", 60, "the run to wait for the API")
    # Celery's own RETRY state: the snapshot (error, try, when it goes on) in an exception.
    info = sent.info
    assert isinstance(info, RunWaiting), info
    waiting = info.result["waiting"]
    assert waiting["error"] == "server_error: API Error: 529 Overloaded"
    assert (waiting["try"], waiting["of"]) == (1, 3)
    assert waiting["until"] - waiting["since"] == pytest.approx(600, abs=0.01)
    assert info.result["final_phase"] == "PHASE:awaiting_ci"
    env = {**os.environ, "FORMULABEAT_CONFIG": str(fleet.config_path)}
    shown = subprocess.run(
        [*CLI, "status"], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "waiting for the API: server_error: API Error: 529 Overloaded (try 1 of 3)" in shown
    assert redis_client.get("formulabeat:lock:proj:planner") is not None  # the lease is kept
    assert len(tmux_sessions(fleet.tmux_socket)) == 1  # a short wait keeps the session
    registry.request_cancel(redis_client, sent.id, "a test")
    assert wait_result(sent, 60)["outcome"] == "cancelled"
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_when_its_wait_is_over_the_agent_goes_on_in_its_session_where_it_stopped(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    log = fleet.root / "agent.jsonl"
    fleet.add_agent(
        "planner", f"log={log} phase=awaiting_ci {OVERLOADED} phase=done", api_retry_delay=2
    )
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("planner")
    assert result["outcome"] == "done", result
    assert result["api_retries"] == 1
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    (wait,) = result["api_waits"]
    assert wait["went_on"] == "in its session" and not wait["reset_stated"]
    assert wait["until"] - wait["since"] == pytest.approx(2, abs=0.01)
    # One agent process: the prompt, then the short go-on message; no step done twice.
    events = _events(log)
    prompts = [e for e in events if e["event"] == "prompt"]
    assert len({e["pid"] for e in events}) == 1
    assert len(prompts) == 2 and prompts[1]["bytes"] < prompts[0]["bytes"] / 3  # type: ignore[operator]
    assert [e["phase"] for e in events if e["event"] == "phase"] == [
        "PHASE:awaiting_ci",
        "PHASE:done",
    ]
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_when_the_tries_are_spent_the_run_fails_naming_the_error_and_the_tries(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent(
        "planner",
        "apifail=rate_limit apifail=rate_limit apifail=rate_limit:Request_rejected_(429)",
        api_retries=2,
        api_retry_delay=0.5,
    )
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("planner")
    assert result["outcome"] == "failed", result
    assert result["reason"] == (
        "api_error: rate_limit: Request rejected (429); gave up after 2 wait(s) for the API "
        "(api_retries = 2)"
    )
    assert result["api_retries"] == 2
    assert [w["try"] for w in result["api_waits"]] == [1, 2]
    # 0.5 s, then twice that.
    assert [round(w["until"] - w["since"], 2) for w in result["api_waits"]] == [0.5, 1.0]
    assert held_claims(redis_client) == []


def test_a_permanent_error_fails_at_once_naming_it(fleet: Fleet) -> None:
    fleet.add_agent("planner", "apifail=billing_error:Credit_balance_is_too_low phase=done")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("planner")
    assert result["outcome"] == "failed", result
    assert result["reason"].startswith("api_error: billing_error: Credit balance is too low (")
    assert result["api_retries"] == 0 and result["api_waits"] == []


def _clock(moment: float) -> str:
    """A time as Claude Code states a reset: ``4:58pm``."""
    local = dt.datetime.fromtimestamp(moment, dt.UTC)
    return local.strftime("%I:%M%p").lstrip("0").lower()


def test_a_stated_reset_wins_over_the_delay_and_every_host_skips_the_credential_until_then(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    reset = (int(time.time()) // 60 + 120) * 60  # two hours on, on a minute
    message = f"You've_hit_your_session_limit_·_resets_{_clock(reset)}_(UTC)"
    fleet.add_agent("planner", f"apifail=rate_limit:{message} phase=done")
    fleet.add_agent("gardener", "phase=done")
    fleet.add_agent("predictor", "phase=done", on_limit="defer")
    fleet.add_agent("own", "phase=done", credential="other")
    fleet.write_config()
    fleet.start_worker("host-a")
    fleet.start_worker("host-b")
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RETRY", 60, "the run to wait for the API")
    waiting = sent.info.result["waiting"]
    assert waiting["reset_stated"] and waiting["until"] == reset + 5
    # Every host knows: runs that use the credential are not started to fail.
    wait_until(lambda: quota.limited(redis_client, "default"), 30, "the limit to be shared")
    skipped = fleet.run("gardener")
    assert skipped["outcome"] == "skipped"
    assert skipped["reason"].startswith(
        f"credential 'default' is limited by the API until {format_time(reset)} (rate_limit: "
        f"You've hit your session limit · resets {_clock(reset)} (UTC); seen by run {sent.id} "
        "on host "
    )
    deferred = fleet.run("predictor")
    assert deferred["outcome"] == "skipped"
    again = re.search(r"sent again for (.+) as run (\S+)$", deferred["reason"])
    assert again and again.group(1) == format_time(reset + 5)
    assert again.group(2) in quota.due(redis_client, now=reset + 6)
    assert again.group(2) not in quota.due(redis_client, now=reset + 4)
    assert fleet.run("own")["outcome"] == "done"  # another credential runs on
    # A waiting run can be cancelled: its session ends, its lease is freed.
    registry.request_cancel(redis_client, sent.id, "a test")
    result = wait_result(sent, 60)
    assert result["outcome"] == "cancelled"
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_a_deferred_run_is_sent_by_the_reaper_once_due(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    fleet.add_agent("predictor", "phase=done", on_limit="defer")
    fleet.write_config()
    fleet.start_worker()
    run_id = "0defe44e-0000-4000-8000-000000000001"
    quota.defer(redis_client, run_id, "proj", "predictor", time.time() - 1)
    app = client_app(load_config(fleet.config_path))
    app.send_task(REAP_TASK, queue=DEFAULT_QUEUE)
    result = wait_result(app.AsyncResult(run_id), 60)
    assert result["outcome"] == "done"
    assert quota.due(redis_client) == {}


def test_a_worker_killed_while_its_run_waits_is_replaced_and_the_run_goes_on(
    fleet: Fleet, redis_client: redis.Redis
) -> None:
    from tests.test_hosts import _kill_worker

    fleet.add_agent("planner", f"phase=awaiting_ci {OVERLOADED} phase=done", api_retry_delay=10)
    fleet.write_config()
    fleet.start_worker("host-a")
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RETRY", 60, "the run to wait for the API")
    _kill_worker(fleet, "host-a")
    fleet.start_worker("host-a")
    result = wait_result(sent, 90)
    assert result["outcome"] == "done", result
    assert result["api_retries"] == 1
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    assert held_claims(redis_client) == []


def test_a_oneshot_run_waits_and_runs_its_cli_again(fleet: Fleet) -> None:
    fleet.add_agent(
        "planner", "apifail_once=server_error phase=done", mode="oneshot", api_retry_delay=1
    )
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("planner")
    assert result["outcome"] == "done", result
    assert result["api_retries"] == 1
    # The scripted agent keeps no conversation: it is given the prompt again.
    assert result["api_waits"][0]["went_on"] == "reinjected"
    assert [p["phase"] for p in result["phases"]] == ["PHASE:done"]
