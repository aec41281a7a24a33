"""The command line's finish: run id prefixes, `run --json`, closed pipes,
`logs --follow`, exit statuses and missing values.

One worker serves the whole module; each test uses agents of its own, so
their leases never meet. The CLI runs as a subprocess, as a user runs it,
on another host name than the worker's.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.app import client_app
from tasks.cli import new_lines
from tests.conftest import Fleet, commit_files, wait_result, wait_until
from workers import registry
from workers.config import load_config
from workers.embedded import EmbeddedRedis
from workers.tmux import TmuxServer

FORMULABEAT = [sys.executable, "-m", "tasks.cli"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Fleet]:
    """One worker (host-a) for the module, with an agent per scenario."""
    root = tmp_path_factory.mktemp("cli-polish")
    # The prefixes below must fit only this module's runs.
    redis.Redis.from_url(redis_server.url).flushall()
    commit_files(root / "project", {"README.md": "# proj\n"})
    commit_files(root / "ops", {"journal.md": "# journal\n"})
    fleet = Fleet(
        root=root, redis_url=redis_server.url, tmux_socket=f"fbtest-{secrets.token_hex(6)}"
    )
    fleet.add_agent("done", "phase=done")
    fleet.add_agent("fails", "phase=failed:it_broke")
    fleet.add_agent("escalates", "phase=escalate")
    fleet.add_agent("disabled", "phase=done")
    fleet.add_agent("slow", "phase=awaiting_ci sleep=120")
    fleet.add_agent("chatty", "phase=awaiting_ci sleep=3 ls sleep=2 phase=done")
    fleet.write_config()
    fleet.start_worker("host-a")
    yield fleet
    for stack in fleet.stacks:
        stack.stop()
    TmuxServer(fleet.tmux_socket).shut_down()


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Iterator[redis.Redis]:
    """A client of the module's Redis (never flushed between tests: the worker lives on)."""
    assert fleet.redis_url is not None
    connection = redis.Redis.from_url(fleet.redis_url, socket_timeout=10)
    yield connection
    connection.close()


def cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``formulabeat ARGS`` for the fleet's config from host-b."""
    return subprocess.run(
        [*FORMULABEAT, "--config", str(fleet.config_path), *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def cli_env() -> dict[str, str]:
    return {**os.environ, "FORMULABEAT_HOST": "host-b"}


def popen(fleet: Fleet, *args: str) -> subprocess.Popen[str]:
    """Start ``formulabeat ARGS`` in the background, its output piped."""
    return subprocess.Popen(
        [*FORMULABEAT, "--config", str(fleet.config_path), *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def send(fleet: Fleet, agent: str, run_id: str) -> Any:
    """Send a run of ``agent`` under a run id of our choosing; return its AsyncResult."""
    app = client_app(load_config(fleet.config_path))
    return app.send_task(
        "formulabeat.run", args=["proj", agent], queue="formulabeat", task_id=run_id
    )


def state(client: redis.Redis, run_id: str) -> str | None:
    return (registry.get(client, run_id) or {}).get("state")


def test_a_unique_prefix_names_a_run_an_ambiguous_or_unknown_one_is_an_error(
    fleet: Fleet,
) -> None:
    tail = str(uuid.uuid4())[5:]
    first, second = f"feed1{tail}", f"feed2{tail}"
    for run_id in (first, second):
        wait_result(send(fleet, "done", run_id))
    found = cli(fleet, "status", "feed1", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["run_id"] == first
    ambiguous = cli(fleet, "status", "feed")
    assert ambiguous.returncode == 4
    assert ambiguous.stderr == (
        f"formulabeat: run id 'feed' is ambiguous: it fits {first}, {second}; "
        "give more characters\n"
    )
    for command in ("status", "cancel", "logs", "attach"):
        unknown = cli(fleet, command, "beefcafe")
        assert (command, unknown.returncode) == (command, 4)
        assert unknown.stderr == "formulabeat: no run beefcafe is known (runs are kept 7 days)\n"
    short = cli(fleet, "status", "fee")
    assert short.returncode == 4
    assert "too short: give at least 4 characters" in short.stderr
    # Ended runs: each command takes the prefix and names the whole id.
    assert cli(fleet, "cancel", second[:8]).stdout == f"run {second} already ended: done\n"
    assert cli(fleet, "logs", second[:8]).stdout.startswith(f"run {second} ended: done")
    attach = cli(fleet, "attach", second[:8])
    assert attach.stderr == f"formulabeat: run {second} has no live session (done)\n"


def test_a_run_sent_and_not_yet_taken_is_found_by_its_prefix(fleet: Fleet) -> None:
    # No worker serves this queue: the run stays in the ledger of sent runs.
    app = client_app(load_config(fleet.config_path))
    run_id = f"5e17{uuid.uuid4().hex[4:]}"
    app.send_task("formulabeat.run", args=["proj", "done"], queue="nobody", task_id=run_id)
    found = cli(fleet, "status", run_id[:6], "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == {
        "run_id": run_id,
        "project": "proj",
        "agent": "done",
        "state": "SENT",
    }


def test_run_json_without_wait_prints_the_run_as_json(fleet: Fleet) -> None:
    proc = cli(fleet, "run", "proj", "done", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    sent = json.loads(lines[0])
    assert sent == {"run_id": sent["run_id"], "project": "proj", "agent": "done", "state": "SENT"}
    assert proc.stderr == ""
    app = client_app(load_config(fleet.config_path))
    assert wait_result(app.AsyncResult(sent["run_id"]))["outcome"] == "done"


def test_a_reader_that_goes_away_ends_every_command_quietly(fleet: Fleet) -> None:
    ended = fleet.run("done")["run_id"]
    for args in (
        ["status"],
        ["status", "--json"],
        ["status", ended],
        ["logs", ended],
        ["usage"],
    ):
        # A pipe nobody reads any more, as `| head -4` leaves it once head has exited.
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = _closed(fleet, args, write_end)
        finally:
            os.close(write_end)
        assert (args, proc.returncode, proc.stderr) == (args, 141, "")


def _closed(fleet: Fleet, args: list[str], stdout: int) -> subprocess.CompletedProcess[str]:
    """Run ``formulabeat ARGS`` with its stdout on the file descriptor ``stdout``."""
    return subprocess.run(
        [*FORMULABEAT, "--config", str(fleet.config_path), *args],
        env=cli_env(),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


def test_logs_follow_prints_each_line_once_and_the_final_screen(fleet: Fleet) -> None:
    sent = fleet.send_live("chatty")
    proc = cli(fleet, "logs", sent.id, "--follow")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    counts = Counter(line for line in lines if line.strip())
    assert [line for line, n in counts.items() if n > 1] == []
    assert counts["scripted agent (formulabeat) — ready"] == 1
    assert counts["wrote PHASE:awaiting_ci"] == 1
    assert [line for line in lines if "README.md" in line and "formulas" in line] != []
    # Written a moment before the run ended: only the final screen shows it.
    assert counts["wrote PHASE:done"] == 1
    assert lines.index("wrote PHASE:awaiting_ci") < lines.index("wrote PHASE:done")
    assert lines[-1] == f"run {sent.id} ended: done (-)"


def test_new_lines_of_a_screen_that_scrolls_and_redraws() -> None:
    assert new_lines(None, "a\nb\n\n\n") == ["a", "b"]
    assert new_lines("a\nb", "a\nb") == []
    assert new_lines("a\nb\nc", "b\nc\nd\ne") == ["d", "e"]  # scrolled by one
    # A box redrawn at the bottom of a TUI stays put; the text above it grows.
    assert new_lines("a\nb\n--\n> \n--", "b\nc\n--\n> \n--") == ["c"]
    assert new_lines("x\n> ", "x\n> typed") == ["> typed"]


def test_exit_statuses_by_outcome_and_error(fleet: Fleet) -> None:
    def ended(agent: str) -> tuple[int, str]:
        proc = cli(fleet, "run", "proj", agent, "--wait")
        _run_id, outcome = proc.stdout.splitlines()  # the run id, then how it ended
        return proc.returncode, outcome

    assert ended("done") == (0, "done")
    assert ended("fails") == (1, "failed (it broke)")
    assert ended("escalates") == (2, "escalate")
    assert cli(fleet, "disable", "proj", "disabled").returncode == 0
    status, outcome = ended("disabled")
    assert status == 3
    assert outcome.startswith("skipped (agent proj/disabled is disabled")
    # A usage error is not escalate's 2.
    usage = cli(fleet, "run", "proj")
    assert usage.returncode == 4
    assert "error: the following arguments are required: agent" in usage.stderr
    assert cli(fleet, "status", "--limit", "many").returncode == 4
    unknown = cli(fleet, "status", "0000dead")
    assert unknown.returncode == 4
    bad_config = subprocess.run(
        [*FORMULABEAT, "--config", str(fleet.root / "missing.toml"), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad_config.returncode == 4
    assert bad_config.stderr.startswith("formulabeat: ")


def test_a_live_run_by_prefix_interrupted_cancelled_and_timed_out(
    fleet: Fleet, client: redis.Redis
) -> None:
    waiter = popen(fleet, "run", "proj", "slow", "--wait")
    assert waiter.stdout is not None
    run_id = waiter.stdout.readline().strip()
    wait_until(lambda: state(client, run_id) == "AWAITING_CI", 60, "the run to be live")
    attach = cli(fleet, "attach", run_id[:8])
    assert attach.returncode == 0, attach.stderr
    assert attach.stdout.startswith(f"run {run_id} lives on host host-a; there, run: tmux -L ")
    follower = popen(fleet, "logs", run_id[:8], "--follow")
    assert follower.stdout is not None
    while "wrote PHASE:awaiting_ci" not in follower.stdout.readline():
        pass
    follower.send_signal(signal.SIGINT)
    follower.communicate(timeout=60)  # its pipes read, so a full one cannot hold it up
    assert follower.returncode == 130
    cancel = cli(fleet, "cancel", run_id[:6])
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.startswith("cancelled (cancelled by formulabeat cancel on host host-b")
    # A cancelled run is not a success.
    rest, progress = waiter.communicate(timeout=60)
    assert (waiter.returncode, rest) == (
        1,
        "cancelled (cancelled by formulabeat cancel on host host-b)\n",
    ), progress

    timed = cli(fleet, "run", "proj", "slow", "--wait", "--timeout", "2")
    assert timed.returncode == 4
    timed_id = timed.stdout.strip()
    assert f"formulabeat: run {timed_id} did not end within 2 s" in timed.stderr
    assert cli(fleet, "cancel", timed_id).returncode == 0


def test_status_shows_a_dash_where_a_run_has_no_value(fleet: Fleet, client: redis.Redis) -> None:
    run_id = fleet.send("done").id
    app = client_app(load_config(fleet.config_path))
    assert wait_result(app.AsyncResult(run_id))["reason"] is None
    detail = cli(fleet, "status", run_id)
    assert detail.returncode == 0, detail.stderr
    assert "None" not in detail.stdout
    assert "            reason: -\n" in detail.stdout
    table = cli(fleet, "status")
    assert "None" not in table.stdout
    row = next(line for line in table.stdout.splitlines() if line.startswith(run_id[:8]))
    assert row.split()[-2:] == ["done", "-"]


def test_readme_documents_every_exit_status() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("### Exit statuses", 1)[1].split("\n\n")[1]
    codes = {line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]}
    assert codes == {"0", "1", "2", "3", "4", "130", "141"}
