"""The real Claude Code CLI, end to end, where it differs from the other CLIs.

Every run here is the pinned CLI (tests/real_cli.py) in tmux, talking to the
Messages API stand-in (tests/messages_api.py). What every CLI does the same
way (a run to done, the nudges, a crash resumed, the guard, a fresh HOME,
one-shot runs, a repository's own hooks) runs over all three CLIs in
tests/test_agent_clis.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Fleet
from tests.messages_api import MessagesAPI
from tests.real_cli import real_agent


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI refuses bypass mode as root only")
def test_root_without_a_sandbox_setting_quotes_the_clis_refusal(
    fleet: Fleet, claude: Path, claude_home: Path, messages_api: MessagesAPI
) -> None:
    real_agent(
        fleet, "rooted", "phase=done", claude, claude_home, messages_api, drop_env=["IS_SANDBOX"]
    )
    fleet.write_config()
    fleet.start_worker()
    result = fleet.run("rooted", timeout=60)
    assert result["outcome"] == "failed"
    assert (
        "--dangerously-skip-permissions cannot be used with root/sudo privileges for security "
        "reasons" in result["reason"]
    )
