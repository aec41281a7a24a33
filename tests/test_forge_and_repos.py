"""Forge identity, the .profile formula and the ops repo, against a real forge on loopback."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import git
import pytest
import redis

from tests.conftest import Fleet
from tests.forge_server import ForgeServer
from workers.embedded import free_port
from workers.errors import FormulaError, RepoError
from workers.forge import git_auth_env, resolve_identity
from workers.repos import ensure_ops_repo, load_profile_formula, ops_commit_and_push

TOKEN = "tok-SECRET-1234"
FORMULA = 'name = "profiled"\n[[steps]]\nid = "a"\ntitle = "t"\ndescription = "d"\n'


@pytest.fixture
def forge(tmp_path: Path) -> Iterator[ForgeServer]:
    with ForgeServer(tmp_path / "forge", "planner-bot", TOKEN) as server:
        yield server


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)


def assert_no_token(tmp_path: Path, caplog: pytest.LogCaptureFixture, forge: ForgeServer) -> None:
    for config in tmp_path.rglob(".git/config"):
        assert TOKEN not in config.read_text(), config
    assert TOKEN not in caplog.text
    for request in forge.requests:
        assert TOKEN not in request["path"]


def test_identity_needs_the_right_token(forge: ForgeServer) -> None:
    assert resolve_identity(forge.url, TOKEN) == "planner-bot"
    assert resolve_identity(forge.url, "wrong") is None
    assert resolve_identity(f"http://127.0.0.1:{free_port()}", TOKEN) is None
    sent = [r for r in forge.requests if r["path"] == "/api/v1/user"]
    assert sent[0]["headers"]["authorization"] == f"token {TOKEN}"


def test_profile_formula_is_cloned_then_pulled(
    forge: ForgeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forge.add_repo("planner-bot/.profile", {"formula.toml": FORMULA})
    fallback = tmp_path / "formulas" / "planner.toml"
    cache = tmp_path / "state" / "profiles"
    path, source = load_profile_formula(forge.url, TOKEN, cache, fallback)
    assert source == ".profile (planner-bot)"
    assert path.read_text() == FORMULA
    forge.commit("planner-bot/.profile", {"formula.toml": FORMULA.replace("profiled", "v2")}, "v2")
    path, _ = load_profile_formula(forge.url, TOKEN, cache, fallback)
    assert 'name = "v2"' in path.read_text()
    remote = git.Repo(cache / "planner-bot").git.remote("-v")
    assert TOKEN not in remote and forge.url in remote
    assert_no_token(tmp_path, caplog, forge)
    git_requests = [r for r in forge.requests if "/info/refs" in r["path"]]
    assert git_requests and all("authorization" in r["headers"] for r in git_requests)


def test_fallback_to_formulas_when_no_profile(
    forge: ForgeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fallback = tmp_path / "formulas" / "planner.toml"
    fallback.parent.mkdir()
    fallback.write_text(FORMULA)
    cache = tmp_path / "profiles"
    assert load_profile_formula(forge.url, TOKEN, cache, fallback) == (fallback, "formulas/")
    assert load_profile_formula(forge.url, None, cache, fallback) == (fallback, "formulas/")
    assert load_profile_formula(forge.url, "wrong", cache, fallback) == (fallback, "formulas/")
    fallback.unlink()
    with pytest.raises(FormulaError, match=r"neither a \.profile formula\.toml nor"):
        load_profile_formula(forge.url, TOKEN, cache, fallback)
    assert_no_token(tmp_path, caplog, forge)


def test_ops_repo_is_cloned_pulled_and_pushed(
    forge: ForgeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bare = forge.add_repo("acme/ops", {"journal.md": "# journal\n"})
    env = git_auth_env("planner-bot", TOKEN)
    ops = tmp_path / "ops"
    ensure_ops_repo(ops, forge.url, "acme/ops", "main", env)
    assert (ops / "journal.md").read_text() == "# journal\n"
    forge.commit("acme/ops", {"journal.md": "# journal\nfrom elsewhere\n"}, "elsewhere")
    ensure_ops_repo(ops, forge.url, "acme/ops", "main", env)
    assert "from elsewhere" in (ops / "journal.md").read_text()
    assert ops_commit_and_push(ops, "nothing", ["journal.md"], "main", env) is False
    (ops / "journal.md").write_text("# journal\nplanner was here\n")
    assert ops_commit_and_push(ops, "planner: run 1", ["journal.md"], "main", env) is True
    log = subprocess.run(
        ["git", "-C", str(bare), "log", "-1", "--format=%s"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert log.stdout.strip() == "planner: run 1"
    with pytest.raises(RepoError, match="must be a path inside the ops repository"):
        ops_commit_and_push(ops, "x", ["../escape"], "main", env)
    assert_no_token(tmp_path, caplog, forge)


def test_a_wrong_token_fails_fast_without_prompting(forge: ForgeServer, tmp_path: Path) -> None:
    forge.add_repo("acme/ops", {"journal.md": "x\n"})
    env = git_auth_env("planner-bot", "wrong-token-999")
    with pytest.raises(RepoError) as caught:
        ensure_ops_repo(tmp_path / "ops", forge.url, "acme/ops", "main", env)
    assert "wrong-token-999" not in str(caught.value)
    assert "cloning" in str(caught.value)


def test_a_run_uses_the_profile_formula_and_pushes_ops_without_leaking_the_token(
    fleet: Fleet, forge: ForgeServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = "SCENARIO: ls phase=done"
    forge.add_repo(
        "planner-bot/.profile",
        {
            "formula.toml": FORMULA.replace(
                'description = "d"', f'description = """\n{scenario}\n"""'
            )
        },
    )
    bare_ops = forge.add_repo("acme/ops", {"journal.md": "# journal\n"})
    fleet.add_agent("planner", "crash", ops_commit=["journal.md"])  # formulas/ would crash
    text = fleet.write_config().path.read_text()
    text = text.replace(
        'forge_url = "http://127.0.0.1:9"', f'forge_url = "{forge.url}"\nops_repo = "acme/ops"'
    )
    text = text.replace('ops_repo_root = "ops"', 'ops_repo_root = "ops-clone"')
    fleet.config_path.write_text(text)
    monkeypatch.setenv("FORGE_TOKEN", TOKEN)
    fleet.start_worker()
    result = fleet.run("planner")
    assert result["outcome"] == "done"
    assert result["formula_source"] == ".profile (planner-bot)"
    assert (fleet.root / "ops-clone" / "journal.md").exists()
    # Nothing changed in the ops repo: nothing pushed.
    head = git.Repo(bare_ops).head.commit.message.strip()
    assert head == "initial"
    # The token is nowhere it must not be.
    assert TOKEN not in json.dumps(result)
    for key in redis_client.scan_iter("*"):
        assert TOKEN.encode() not in key
        kind = redis_client.type(key)
        if kind == b"string":
            assert TOKEN.encode() not in (redis_client.get(key) or b""), key
        elif kind == b"list":
            assert all(TOKEN.encode() not in v for v in redis_client.lrange(key, 0, -1)), key
    assert TOKEN not in (fleet.root / "logs-host-a" / "worker.log").read_text()
    for config in fleet.root.rglob(".git/config"):
        assert TOKEN not in config.read_text()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert TOKEN.encode() not in cmdline, proc
