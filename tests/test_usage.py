"""Tokens and cost per run: the transcript reader, prices, budgets, the history.

The real-CLI tests count a run's tokens from the transcript Claude Code
writes and compare them with what the Messages API stand-in charged: each
response there reports its own figures, so the sums tell which were counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis

from tasks.reporting import result_of
from tests.conftest import Fleet, wait_until
from tests.messages_api import MessagesAPI, charged
from tests.real_cli import real_agent
from workers import spending
from workers.config import AgentConfig, Budget, load_config
from workers.embedded import free_port, start_redis, stop_redis
from workers.errors import ConfigError
from workers.usage import TranscriptReader, cost_usd, total_tokens

MODEL = "claude-opus-4-8"  # what the CLI asks the stand-in for, and the transcript says
PRICES = (
    f'\n[prices."{MODEL}"]\ninput = 15\noutput = 75\ncache_read = 1.5\ncache_creation = 18.75\n'
)
PRICE = {"input": 15.0, "output": 75.0, "cache_read": 1.5, "cache_creation": 18.75}


def line(message_id: str, counts: tuple[int, int, int, int], model: str = MODEL) -> str:
    """An assistant line of a transcript, as Claude Code writes it."""
    usage = dict(
        zip(
            (
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            ),
            counts,
            strict=True,
        )
    )
    message = {"id": message_id, "model": model, "role": "assistant", "usage": usage}
    return json.dumps({"type": "assistant", "message": message}) + "\n"


def kinds(usage: dict[str, dict[str, int]]) -> dict[str, int]:
    return usage.get(MODEL, {})


# -- the transcript reader --------------------------------------------------------


def test_the_reader_counts_each_message_once_whatever_the_file_does(tmp_path: Path) -> None:
    transcript = tmp_path / "t.jsonl"
    reader = TranscriptReader()
    reader.follow(str(transcript))
    assert reader.read() == {}  # not there yet
    user = json.dumps({"type": "user", "message": {"content": "x" * 5000}}) + "\n"
    # Two lines of one response (two content blocks), a user line, a broken line.
    transcript.write_text(line("m1", (10, 1, 0, 0)) * 2 + user + "{ not json\n")
    assert kinds(reader.read()) == {"input": 10, "output": 1, "cache_read": 0, "cache_creation": 0}
    # A line cut short is read once it is whole.
    whole = line("m2", (20, 2, 3, 4))
    with transcript.open("a") as handle:
        handle.write(whole[:30])
    assert reader.read() == {}
    with transcript.open("a") as handle:
        handle.write(whole[30:])
    assert kinds(reader.read())["input"] == 20
    # Rewritten shorter (a compaction): read again, the ids counted once.
    transcript.write_text(line("m2", (20, 2, 3, 4)) + line("m3", (5, 5, 5, 5)))
    assert kinds(reader.read()) == {"input": 5, "output": 5, "cache_read": 5, "cache_creation": 5}
    # Replaced by another file of the same size: its new ids only.
    other = tmp_path / "other.jsonl"
    other.write_text(line("m3", (5, 5, 5, 5)) + line("m4", (5, 5, 5, 5)))
    os.replace(other, transcript)
    assert kinds(reader.read())["input"] == 5
    assert kinds(reader.usage) == {
        "input": 40,
        "output": 13,
        "cache_read": 13,
        "cache_creation": 14,
    }
    # Its state survives a worker restart (the adopter's reader goes on).
    reader.save(tmp_path / "usage.json")
    again = TranscriptReader.load(tmp_path / "usage.json")
    with transcript.open("a") as handle:
        handle.write(line("m4", (5, 5, 5, 5)) + line("m5", (1, 0, 0, 0)))
    assert kinds(again.read())["input"] == 1
    assert TranscriptReader.load(tmp_path / "missing.json").usage == {}


def test_cost_is_from_the_price_table_and_none_without_a_price() -> None:
    usage = {MODEL: {"input": 1_000_000, "output": 2_000, "cache_read": 0, "cache_creation": 0}}
    assert cost_usd(usage, {MODEL: PRICE}) == 15.15
    assert cost_usd(usage, {}) is None
    assert cost_usd({}, {}) == 0.0


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ('[prices."m"]\ninput = -1\n', 'prices."m".input', "must be 0 or more"),
        ('[prices."m"]\noutput = "cheap"\n', 'prices."m".output', "must be a number, not a string"),
        ("[budgets.projects.nope]\nmax_tokens = 5\n", "budgets.projects.nope", "names no project"),
        ("[budgets.projects.p]\nmax_cost_usd = 0\n", "max_cost_usd", "must be greater than 0"),
        ("[history]\nkeep_days = 0\n", "history.keep_days", "must be at least 1"),
    ],
)
def test_bad_price_and_budget_tables_name_file_key_and_problem(
    tmp_path: Path, table: str, key: str, problem: str
) -> None:
    config = tmp_path / "formulabeat.toml"
    config.write_text('[[projects]]\nname = "p"\nrepo_root = "r"\n' + table)
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert str(config) in str(raised.value)
    assert key in str(raised.value) and problem in str(raised.value)


# -- the history and the daily budgets, in Redis ------------------------------------------


def agent(name: str = "planner", project: str = "proj", credential: str = "default") -> AgentConfig:
    return AgentConfig(
        name=name, project=project, formula=Path("f"), schedule="* * * * *", credential=credential
    )


def test_budgets_count_the_day_of_a_project_or_a_credential(redis_client: redis.Redis) -> None:
    usage = {MODEL: {"input": 600, "output": 100, "cache_read": 0, "cache_creation": 0}}
    day, first, second = "2026-12-01", uuid.uuid4().hex, uuid.uuid4().hex
    prices = {MODEL: PRICE}
    spending.record(redis_client, agent(), usage, prices, 30, run_id=first, batch=1, day=day)
    gardener = agent("gardener", credential="ci")
    assert spending.record(redis_client, gardener, usage, {}, 30, run_id=second, batch=1, day=day)
    # A batch tried again (its first write was kept after all) is added once.
    again = spending.record(redis_client, gardener, usage, {}, 30, run_id=second, batch=1, day=day)
    assert not again
    project = Budget("project", "proj", max_tokens=1000)
    credential = Budget("credential", "ci", max_tokens=1000)
    assert spending.spent_today(redis_client, project, "2026-12-01") == (
        1400,
        pytest.approx(0.0165),
    )
    assert spending.spent_today(redis_client, credential, "2026-12-01")[0] == 700
    assert spending.spent_today(redis_client, project, "2026-12-02") == (0, 0.0)
    ttl = redis_client.ttl(spending.day_key("2026-12-01"))
    assert 30 * 86400 < ttl <= 31 * 86400  # kept keep_days after its day, then gone


def test_the_history_survives_a_redis_restart_with_aof(tmp_path: Path) -> None:
    port, password = free_port(), "history-test-password"
    server = start_redis(tmp_path / "redis", port=port, password=password)
    usage = {MODEL: {"input": 5, "output": 6, "cache_read": 7, "cache_creation": 8}}
    try:
        spending.record(server.client(), agent(), usage, {MODEL: PRICE}, 30, run_id="r", batch=1)
    finally:
        stop_redis(server)
    server = start_redis(tmp_path / "redis", port=port, password=password)
    try:
        found = {row.kind: row.value for row in spending.rows(server.client(), 1)}
    finally:
        stop_redis(server)
    assert found["input"] == 5 and found["cache_creation"] == 8 and found["cost_usd"] > 0


# -- whole runs of the real CLI ------------------------------------------------------------


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_a_runs_tokens_are_the_stand_ins_figures_everywhere_they_show(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(
        fleet, "counted", "phase=awaiting_ci sleep=3 phase=done", claude, claude_home, messages_api
    )
    port = free_port()
    fleet.write_config(PRICES, metrics_port=port)
    fleet.start_worker()
    sent = fleet.send_live("counted", timeout=120)
    live = wait_until(
        lambda: sent.info.get("usage") if isinstance(sent.info, dict) else None, 30, "live usage"
    )
    assert total_tokens(live) > 0
    result = wait_until(lambda: result_of(sent), 120, "the end")
    assert result["outcome"] == "done", result
    exchanges = messages_api.for_run(result["run_id"])
    assert len(exchanges) == 4  # awaiting_ci, sleep, done, and the closing words
    assert result["usage"] == {MODEL: charged(exchanges)}
    expected_cost = sum(charged(exchanges)[k] * PRICE[k] for k in PRICE) / 1e6
    assert result["cost_usd"] == pytest.approx(expected_cost)
    assert result["session_uuid"] and result["transcript"].endswith(
        f"{result['session_uuid']}.jsonl"
    )
    text = metrics_text(port)
    for kind, count in charged(exchanges).items():
        labels = f'agent="counted",kind="{kind}",model="{MODEL}",project="proj"'
        assert f"formulabeat_tokens_total{{{labels}}} {float(count)}" in text, kind
    table = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--config", str(fleet.config_path), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "tokens" in table.splitlines()[0]
    total = sum(charged(exchanges).values())
    assert f"{total / 1000:.1f}k" in table
    by_model = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks.cli",
            "--config",
            str(fleet.config_path),
            "usage",
            "--by",
            "model",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(by_model)[MODEL]["tokens"] == total


# make long: in make test, test_agent_clis resumes a crash and
# test_real_cli_api_errors counts a resumed conversation's tokens once.
@pytest.mark.long
def test_a_crash_is_resumed_with_its_conversation_and_counted_once(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(
        fleet,
        "resumed",
        # The sleep lets the turns before the crash reach Claude Code's
        # transcript, which it writes a moment after each turn.
        "phase=awaiting_ci sleep=2 crash_once phase=done",
        claude,
        claude_home,
        messages_api,
    )
    fleet.write_config(PRICES)
    fleet.start_worker()
    result = fleet.run("resumed", timeout=180)
    assert result["outcome"] == "done", result
    assert result["recovered_by"] == ["resumed"]
    # After the resume the first user message is no longer the prompt: the
    # run's exchanges are the ones that name its phase file.
    exchanges = messages_api.main_exchanges(str(Path(result["worktree"]).parent / "phase"))
    # The model saw the conversation again: the first prompt was not given a
    # second time, and the scenario went on from where it stood.
    assert sum(1 for e in exchanges if e.cursor == 0) == 1
    assert "phase=done" in [e.action for e in exchanges[3:]]
    # The response whose tool call killed the CLI may or may not have reached
    # the transcript before the kill (no reader of it can count it then);
    # every other is there, and each is counted once.
    lines = Path(result["transcript"]).read_text().splitlines()
    recorded = {
        entry["message"]["id"]
        for entry in map(json.loads, lines)
        if entry.get("type") == "assistant"
    }
    killer = exchanges[2]
    assert killer.action == "crash_once"
    assert {e.message_id for e in exchanges} - recorded <= {killer.message_id}
    counted = [e for e in exchanges if e.message_id in recorded]
    assert result["usage"] == {MODEL: charged(counted)}


def test_a_spent_daily_budget_skips_the_next_run_on_another_host(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(fleet, "planner", "phase=done", claude, claude_home, messages_api)
    fleet.write_config("\n[budgets.projects.proj]\nmax_tokens = 1000\n")
    first_host = fleet.start_worker("host-a")
    first = fleet.run("planner", timeout=120)
    assert first["outcome"] == "done" and total_tokens(first["usage"]) > 1000
    first_host.stop()
    fleet.start_worker("host-b")
    second = fleet.run("planner", timeout=60)
    assert second["outcome"] == "skipped"
    assert second["host"] == "host-b"
    assert second["reason"].startswith("budget: project proj has used")
    assert "its daily max_tokens is 1000" in second["reason"]


def test_a_oneshot_run_takes_its_usage_and_cost_from_the_clis_result(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(fleet, "batch", "phase=done", claude, claude_home, messages_api, mode="oneshot")
    fleet.write_config(PRICES)
    fleet.start_worker()
    result = fleet.run("batch", timeout=120)
    assert result["outcome"] == "done", result
    exchanges = messages_api.for_run(result["run_id"])
    assert result["usage"] == {MODEL: charged(exchanges)}
    assert result["cli_cost_usd"] is not None and result["cli_cost_usd"] > 0
    assert result["cost_usd"] == pytest.approx(
        sum(charged(exchanges)[k] * PRICE[k] for k in PRICE) / 1e6
    )
    assert result["output_tail"] == "Done."
