"""The API's bad days with the real Codex and Gemini CLIs: outages waited out, permanent
errors failing at once.

The stand-ins fail the requests a scenario says (tests/scenario.py: ``outage=STATUS:N``);
each CLI retries as it does, then ends its turn on the error: Codex records it in its
rollout (its Stop hook does not run), Gemini CLI in its chat file (its AfterAgent hook
runs, with no text), a headless run of either in its output. formulabeat reads it there,
waits, and tells the agent to go on, or fails the run naming the fix.
"""

from __future__ import annotations

from tests.conftest import Fleet, held_claims, tmux_sessions, wait_result, wait_until
from tests.real_cli import AgentCLI
from workers.run import RunWaiting


def agent(fleet: Fleet, cli: AgentCLI, name: str, scenario: str, **options: object) -> None:
    fleet.add_agent(name, scenario, **{**cli.options(), **options})


def served(cli: AgentCLI, run_id: str) -> list[str]:
    return [e.action for e in cli.api.for_run(run_id) if e.status == 200]


def test_codex_an_overload_past_its_own_retries_is_waited_out_in_its_session(
    fleet: Fleet, codex: AgentCLI, redis_client
) -> None:
    # Codex asks five times (a request and four retries) before it gives up the turn.
    agent(fleet, codex, "planner", "phase=awaiting_ci outage=503:5 phase=done", api_retry_delay=2)
    fleet.write_config()
    fleet.start_worker()
    sent = fleet.send("planner")
    wait_until(lambda: sent.state == "RETRY", 120, "the run to wait for the API")
    assert isinstance(sent.info, RunWaiting)
    waiting = sent.info.result["waiting"]
    assert waiting["error"].startswith("overloaded: Selected model is at capacity")
    result = wait_result(sent, 120)
    assert result["outcome"] == "done", result
    assert result["api_retries"] == 1
    assert result["api_waits"][0]["went_on"] == "in its session"
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    # No step done twice: each scenario step was answered once.
    assert served(codex, result["run_id"]) == ["phase=awaiting_ci", "phase=done", "end"]
    assert held_claims(redis_client) == []
    assert tmux_sessions(fleet.tmux_socket) == []


def test_codex_a_refused_key_fails_the_run_at_once_naming_the_fix(
    fleet: Fleet, codex: AgentCLI, redis_client
) -> None:
    agent(fleet, codex, "refused", "outage=401:99 phase=done")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("refused", timeout=90)
    assert result["outcome"] == "failed", result
    assert result["reason"].startswith("api_error: authentication_failed: unexpected status 401")
    assert "check the key the agent is given" in result["reason"]
    assert result["api_retries"] == 0
    assert held_claims(redis_client) == []


def test_codex_oneshot_waits_out_an_outage_and_resumes_its_thread(
    fleet: Fleet, codex: AgentCLI
) -> None:
    agent(fleet, codex, "batch", "outage=503:5 phase=escalate", mode="oneshot", api_retry_delay=2)
    fleet.write_config(codex.price_table())
    fleet.start_worker()
    result = fleet.run("batch", timeout=120)
    assert result["outcome"] == "escalate", result
    assert result["api_waits"][0]["went_on"] == "resumed"
    assert served(codex, result["run_id"]) == ["phase=escalate", "end"]
    # Each response counted once, though `exec resume` says the thread's total.
    bill = codex.billed([e for e in codex.api.for_run(result["run_id"]) if e.status == 200])
    usage = result["usage"][codex.model]
    assert {kind: usage.get(kind, 0) for kind in bill} == bill


def test_gemini_a_refused_key_fails_the_run_at_once_naming_the_fix(
    fleet: Fleet, gemini: AgentCLI, redis_client
) -> None:
    agent(fleet, gemini, "refused", "outage=401:99 phase=done")
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("refused", timeout=90)
    assert result["outcome"] == "failed", result
    assert result["reason"].startswith("api_error: authentication_failed: [API Error: ")
    assert "check the key the agent is given (GEMINI_API_KEY" in result["reason"]
    # Not nudged: a nudge would fail the same way.
    assert result["nudges"] == 0
    assert held_claims(redis_client) == []


def test_gemini_oneshot_waits_out_an_outage_and_resumes_its_session(
    fleet: Fleet, gemini: AgentCLI
) -> None:
    # Headless, it gives up after the run's 3 attempts (formulabeat's default for
    # it). The outage comes after a first step: Gemini CLI keeps no session whose
    # only turn failed, and the prompt would be given again.
    scenario = "phase=awaiting_ci outage=503:3 phase=escalate"
    agent(fleet, gemini, "batch", scenario, mode="oneshot", api_retry_delay=2)
    fleet.write_config(gemini.price_table())
    fleet.start_worker()
    result = fleet.run("batch", timeout=180)
    assert result["outcome"] == "escalate", result
    assert result["api_waits"][0]["went_on"] == "resumed"
    assert result["api_waits"][0]["error"].startswith("overloaded: ")
    assert served(gemini, result["run_id"]) == ["phase=awaiting_ci", "phase=escalate", "end"]
