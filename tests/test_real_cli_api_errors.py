"""The API's bad days with the real Claude Code CLI: overloads waited out, limits shared,
permanent errors failing at once.

The Messages API stand-in fails the requests a scenario says (tests/messages_api.py:
``outage=``, ``usagelimit=``, ``badcredit``); the CLI retries as it does (twice: the
driver's CLAUDE_CODE_MAX_RETRIES), ends its turn on the error and runs its StopFailure
hook; formulabeat waits and tells it to go on.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import Fleet, held_claims, tmux_sessions, wait_result, wait_until
from tests.messages_api import Exchange, MessagesAPI, charged
from tests.real_cli import real_agent
from tests.test_usage import MODEL
from workers import registry, spending
from workers.run import RunWaiting

# A subscription login (no API key): the CLI then states its usage limit's reset.
SUBSCRIPTION = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-standin-subscription"}


def _served(api: MessagesAPI, run_id: str) -> tuple[list[Exchange], list[Exchange]]:
    exchanges = api.for_run(run_id)
    return [e for e in exchanges if e.status == 200], [e for e in exchanges if e.status != 200]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ("529", "server_error: API Error: 529 Overloaded"),
        # No answer at all: the API out of reach.
        ("0", "server_error: API Error: Unable to connect to API (ECONNRESET)"),
    ],
)
def test_an_overload_past_the_clis_own_retries_is_waited_out_in_its_session(
    fleet: Fleet,
    claude: Path,
    claude_home: Path,
    messages_api: MessagesAPI,
    redis_client: redis.Redis,
    status: str,
    error: str,
) -> None:
    # Three failures: the request and the CLI's two retries; then it is served.
    scenario = f"phase=awaiting_ci outage={status}:3 phase=done"
    real_agent(fleet, "planner", scenario, claude, claude_home, messages_api, api_retry_delay=5)
    fleet.write_config()
    fleet.start_worker()
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RETRY", 120, "the run to wait for the API")
    assert isinstance(sent.info, RunWaiting)
    waiting = sent.info.result["waiting"]
    assert waiting["error"].startswith(error), waiting
    result = wait_result(sent, 120)
    assert result["outcome"] == "done", result
    assert result["api_retries"] == 1
    assert result["api_waits"][0]["went_on"] == "in its session"
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    served, failed = _served(messages_api, result["run_id"])
    # No step done twice: each scenario step was answered once.
    assert [e.action for e in served] == ["phase=awaiting_ci", "phase=done", "end"]
    assert len(failed) == 3
    # The tokens are the stand-in's bill, once: in the result and in the day's counters.
    assert result["usage"] == {MODEL: charged(served)}
    day = [
        row
        for row in spending.rows(redis_client, 1)
        if row.agent == "planner" and row.kind != spending.COST
    ]
    assert sum(row.value for row in day) == sum(charged(served).values())
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_a_session_that_ended_while_waiting_resumes_its_conversation(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI, redis_client
) -> None:
    scenario = "phase=awaiting_ci outage=529:3 phase=done"
    real_agent(fleet, "planner", scenario, claude, claude_home, messages_api, api_retry_delay=15)
    fleet.write_config()
    fleet.start_worker()
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RETRY", 120, "the run to wait for the API")
    # The CLI's session ends during the wait (a reboot of tmux, an operator).
    session = sent.info.result["session"]
    tmux = ["tmux", "-L", fleet.tmux_socket]
    subprocess.run([*tmux, "kill-session", "-t", f"={session}"], timeout=10, check=True)
    result = wait_result(sent, 120)
    assert result["outcome"] == "done", result
    assert result["api_waits"][0]["went_on"] == "resumed"
    assert result["recoveries"] == 0  # not a crash: the run was waiting
    served, _ = _served(messages_api, result["run_id"])
    assert [e.action for e in served] == ["phase=awaiting_ci", "phase=done", "end"]
    assert result["usage"] == {MODEL: charged(served)}
    assert held_claims(redis_client) == []


def test_a_long_wait_ends_the_clis_process_and_resumes_its_conversation_after(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI, redis_client
) -> None:
    scenario = "phase=awaiting_ci outage=529:3 phase=done"
    real_agent(fleet, "planner", scenario, claude, claude_home, messages_api, api_retry_delay=10)
    fleet.write_config(monitor={"park_after": 2})
    fleet.start_worker()
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RETRY", 120, "the run to wait for the API")
    # A wait of park_after or more holds no CLI: its session ends at once.
    wait_until(lambda: tmux_sessions(fleet.tmux_socket) == [], 30, "the CLI to be ended")
    result = wait_result(sent, 120)
    assert result["outcome"] == "done", result
    assert result["api_waits"][0]["went_on"] == "resumed"
    served, _ = _served(messages_api, result["run_id"])
    assert [e.action for e in served] == ["phase=awaiting_ci", "phase=done", "end"]
    assert held_claims(redis_client) == []


def test_a_usage_limit_waits_for_the_reset_the_cli_states_and_skips_the_credentials_runs(
    fleet: Fleet,
    claude: Path,
    claude_home: Path,
    messages_api: MessagesAPI,
    redis_client: redis.Redis,
) -> None:
    options = {"env": SUBSCRIPTION, "drop_env": ["ANTHROPIC_API_KEY"]}
    api = messages_api
    real_agent(fleet, "planner", "usagelimit=3600 phase=done", claude, claude_home, api, **options)
    real_agent(fleet, "gardener", "phase=done", claude, claude_home, api, **options)
    fleet.write_config()
    fleet.start_worker("host-a")
    fleet.start_worker("host-b")
    asked = time.time()
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RETRY", 120, "the run to wait for the usage limit")
    waiting = sent.info.result["waiting"]
    assert waiting["reset_stated"], waiting
    assert "You've hit your session limit · resets " in waiting["error"]
    # The CLI states the reset to the minute; the run goes on 5 s after it, an hour on.
    assert abs(waiting["until"] - 5 - (asked + 3600)) <= 61
    skipped = fleet.run("gardener", timeout=60)
    assert skipped["outcome"] == "skipped"
    assert skipped["reason"].startswith("credential 'default' is limited by the API until ")
    registry.request_cancel(redis_client, sent.id, "a test")
    assert wait_result(sent, 60)["outcome"] == "cancelled"
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_an_exhausted_balance_and_a_refused_key_fail_at_once_naming_the_fix(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI, redis_client
) -> None:
    real_agent(fleet, "broke", "badcredit phase=done", claude, claude_home, messages_api)
    real_agent(fleet, "refused", "outage=401:99 phase=done", claude, claude_home, messages_api)
    fleet.write_config()
    fleet.start_worker()
    started = dt.datetime.now(dt.UTC)
    broke = fleet.run("broke", timeout=60)
    assert broke["outcome"] == "failed", broke
    assert broke["reason"].startswith("api_error: billing_error: Credit balance is too low (")
    assert "add credits" in broke["reason"]
    refused = fleet.run("refused", timeout=60)
    assert refused["outcome"] == "failed", refused
    assert refused["reason"].startswith("api_error: authentication_failed: Invalid API key")
    assert "check the API key the agent is given" in refused["reason"]
    for result in (broke, refused):
        assert result["api_retries"] == 0
        assert dt.datetime.fromisoformat(result["finished_at"]) > started
    assert held_claims(redis_client) == []
