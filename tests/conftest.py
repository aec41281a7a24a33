"""Fixtures that give real parts: Redis, tmux, git repositories, Celery workers.

Nothing here is a mock. Redis is a private server on a free port with its
data in a temp dir; tmux runs on a private socket per test; repositories are
real git repositories; workers are real ``celery worker`` processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import git
import pytest
import redis
import requests
from celery import Celery

from tasks.app import client_app
from tasks.demo import commit_all
from tasks.reporting import result_of
from tasks.stack import Stack, beat_argv, child_env
from tests import messages_api as anthropic
from tests import scenario
from tests.gemini_api import GeminiAPI
from tests.messages_api import MessagesAPI
from tests.real_cli import (
    BYPASS,
    CODEX_BYPASS,
    CODEX_MODEL,
    GEMINI_MODEL,
    GEMINI_YOLO,
    AgentCLI,
    agent_binary,
    claude_binary,
    cli_env,
    codex_env,
    codex_setup,
    gemini_env,
    gemini_setup,
    run_by_hand_once,
)
from tests.responses_api import ResponsesAPI
from tests.sentinels import MASTER_NAME, SentinelLab
from workers import launcher as launcher_module
from workers.config import Config, load_config
from workers.embedded import EmbeddedRedis, free_port, start_redis, stop_redis
from workers.run import FINAL_STATES, final_state
from workers.tmux import AgentSession, TmuxServer, socket_dir

AGENT = f"{sys.executable} -m workers.scripted_agent --dangerously-skip-permissions"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A private Redis server for the whole test session."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture(scope="session")
def messages_api() -> Iterator[MessagesAPI]:
    """The Messages API stand-in the real CLI talks to, for the whole test session."""
    with MessagesAPI() as api:
        yield api


@pytest.fixture(scope="session")
def claude() -> Path:
    """The real Claude Code CLI (skips, or fails under CI, when it is not installed)."""
    return claude_binary()


@pytest.fixture(scope="session")
def claude_home(
    claude: Path, messages_api: MessagesAPI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A HOME where ``claude`` was run once by hand: its dialogs answered as a person does."""
    home = tmp_path_factory.mktemp("claude-home")
    by_hand = f"fbtest-byhand-{secrets.token_hex(4)}"
    try:
        run_by_hand_once(claude, home, messages_api.url, by_hand)
        yield home
    finally:
        TmuxServer(by_hand).shut_down()


@pytest.fixture(scope="session")
def responses_api() -> Iterator[ResponsesAPI]:
    """The Responses API stand-in Codex talks to, for the whole test session."""
    with ResponsesAPI() as api:
        yield api


@pytest.fixture(scope="session")
def gemini_api() -> Iterator[GeminiAPI]:
    """The Gemini API stand-in Gemini CLI talks to, for the whole test session."""
    with GeminiAPI() as api:
        yield api


@pytest.fixture(scope="session")
def codex(responses_api: ResponsesAPI, tmp_path_factory: pytest.TempPathFactory) -> AgentCLI:
    """The real Codex CLI, in a HOME whose config names the stand-in as its provider."""
    home = codex_setup(tmp_path_factory.mktemp("codex-home"), responses_api.base_url)
    return AgentCLI(
        driver="codex",
        binary=agent_binary("codex"),
        home=home,
        api=responses_api,
        model=CODEX_MODEL,
        flags=CODEX_BYPASS,
        env=codex_env,
        billed=scenario.charged,
        fresh_reason=("Codex is not logged in", "codex login"),
    )


@pytest.fixture(scope="session")
def gemini(gemini_api: GeminiAPI, tmp_path_factory: pytest.TempPathFactory) -> AgentCLI:
    """The real Gemini CLI, in a HOME whose settings choose API-key auth."""
    home = gemini_setup(tmp_path_factory.mktemp("gemini-home"))
    return AgentCLI(
        driver="gemini",
        binary=agent_binary("gemini"),
        home=home,
        api=gemini_api,
        model=GEMINI_MODEL,
        flags=GEMINI_YOLO,
        env=lambda home: gemini_env(home, gemini_api.url),
        billed=scenario.charged,
        fresh_reason=("asks how to authenticate", "formulabeat doctor --fix"),
    )


@pytest.fixture(scope="session")
def claude_cli(claude: Path, claude_home: Path, messages_api: MessagesAPI) -> AgentCLI:
    """The real Claude Code CLI, as an AgentCLI like the others."""
    return AgentCLI(
        driver="claude-code",
        binary=claude,
        home=claude_home,
        api=messages_api,
        model="claude-opus-4-8",
        flags=BYPASS,
        env=lambda home: cli_env(home, messages_api.url),
        billed=anthropic.charged,
        fresh_reason=("first-run setup",),
    )


@pytest.fixture(params=["claude-code", "codex", "gemini"])
def agent_cli(request: pytest.FixtureRequest) -> AgentCLI:
    """Each real agent CLI in turn: a test using it runs once per CLI."""
    fixture = {"claude-code": "claude_cli", "codex": "codex", "gemini": "gemini"}[request.param]
    cli: AgentCLI = request.getfixturevalue(fixture)
    return cli


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client of the private server, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def tmux_socket() -> Iterator[str]:
    """A private tmux socket name; its server is killed and its socket removed after the test."""
    name = f"fbtest-{secrets.token_hex(6)}"
    yield name
    TmuxServer(name).shut_down()


# Each tmux socket seen in the session's socket directory, and the first test
# after which it was there: who to blame for one left at the end.
_SOCKETS_SEEN: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def tmux_socket_dir() -> Iterator[Path]:
    """The tmux socket directory of this test session: private, and empty at its end.

    Every tmux the tests start (theirs, the workers', the namespaces') finds
    its socket through ``$TMUX_TMPDIR``, so other suites on this machine do
    not mix theirs in, and a socket left behind (tmux leaves a dead server's
    file) fails the run, naming the test it appeared in.
    """
    # Short and random: a socket's path has at most 107 bytes.
    tmpdir = Path(tempfile.mkdtemp(prefix="fbtmux-"))
    previous = os.environ.get("TMUX_TMPDIR")
    os.environ["TMUX_TMPDIR"] = str(tmpdir)
    try:
        yield socket_dir()
        left = sorted(_socket_files())
        for path in left:
            TmuxServer(str(path)).shut_down()
        blame = [f"{p.name} (there after {_SOCKETS_SEEN.get(p.name, '?')})" for p in left]
        assert not left, f"the test session left tmux sockets behind: {', '.join(blame)}"
    finally:
        if previous is None:
            del os.environ["TMUX_TMPDIR"]
        else:
            os.environ["TMUX_TMPDIR"] = previous
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _tmux_sockets_seen(request: pytest.FixtureRequest, tmux_socket_dir: Path) -> Iterator[None]:
    yield
    for path in _socket_files():
        _SOCKETS_SEEN.setdefault(path.name, request.node.nodeid)


def _socket_files() -> list[Path]:
    directory = socket_dir()
    return list(directory.iterdir()) if directory.is_dir() else []


def tmux_sessions(socket: str) -> list[str]:
    """Names of the sessions on a private tmux server (empty when it is not running)."""
    proc = subprocess.run(
        ["tmux", "-L", socket, "list-sessions", "-F", "#{session_name}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return proc.stdout.split() if proc.returncode == 0 else []


def start_session(
    tmux_socket: str,
    name: str,
    cwd: Path,
    argv: list[str],
    env: dict[str, str] | None = None,
    exit_file: Path | None = None,
) -> AgentSession:
    """A tmux session running ``argv`` through the launcher, as a run starts its agent."""
    spec = cwd / f"{name}.launch.json"
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), **(env or {})}
    spec.write_text(
        json.dumps(
            {
                "argv": argv,
                "env": env,
                "cwd": str(cwd),
                "exit_file": str(exit_file) if exit_file else None,
            }
        )
    )
    launcher = [sys.executable, "-I", "-S", str(Path(launcher_module.__file__).resolve())]
    return AgentSession.start(TmuxServer(tmux_socket), name, cwd, [*launcher, str(spec)], exit_file)


def held_claims(client: redis.Redis) -> list[str]:
    """Leases and session slots still held: after every run has ended, none may be."""

    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value

    held = [text(k) for k in client.keys("formulabeat:lock:*")]
    for key in client.keys("formulabeat:slots:*"):
        held += [f"{text(key)}/{text(m)}" for m in client.zrange(key, 0, -1)]
    return held


def commit_files(repo_dir: Path, files: dict[str, str], message: str = "add") -> git.Repo:
    """Create (or extend) a git repository with ``files`` committed."""
    return commit_all(repo_dir, files, message)


def formula_text(name: str, scenario: str) -> str:
    """A valid formula whose step carries a scripted-agent scenario line."""
    return textwrap.dedent(
        f'''\
        name = "{name}"

        [context]
        files = ["README.md"]

        [[steps]]
        id = "work"
        title = "Do the work"
        description = """
        SCENARIO: {scenario}
        """
        '''
    )


@dataclass
class Fleet:
    """A project, its config file and the parts a test starts for it."""

    root: Path
    redis_url: str | None
    tmux_socket: str
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    # More [broker] settings (a Sentinel URL's master_name).
    broker_settings: str = ""
    stacks: list[Stack] = field(default_factory=list)
    clients: list[Celery] = field(default_factory=list)

    @property
    def repo(self) -> Path:
        return self.root / "project"

    @property
    def config_path(self) -> Path:
        return self.root / "formulabeat.toml"

    def add_agent(self, name: str, scenario: str = "phase=done", **options: Any) -> None:
        """Add an agent with a formula carrying ``scenario`` (committed to the repo)."""
        commit_files(self.repo, {f"formulas/{name}.toml": formula_text(name, scenario)})
        self.agents[name] = options

    def write_config(
        self, extra: str = "", metrics_port: int = 0, monitor: dict[str, float] | None = None
    ) -> Config:
        """Write formulabeat.toml for the agents added so far and load it.

        ``monitor``: [monitor] settings beside the tests' own.
        """
        broker = f'[broker]\nurl = "{self.redis_url}"\n' if self.redis_url else ""
        broker += self.broker_settings
        agents = []
        for name, options in self.agents.items():
            settings = {
                "name": name,
                "project": "proj",
                "formula": f"project/formulas/{name}.toml",
                "schedule": "0 0 1 1 *",
                "command": AGENT,
                "driver": "scripted",
                "min_memory_mb": 0,
                **options,
            }
            if "command" in options and "driver" not in options:
                del settings["driver"]  # another program: the config infers its driver
            body = "\n".join(f"{key} = {_toml(value)}" for key, value in settings.items())
            agents.append(f"[[agents]]\n{body}\n")
        text = (
            f'state_dir = "state"\n{broker}\n[worker]\nconcurrency = 8\n\n'
            f'[tmux]\nsocket = "{self.tmux_socket}"\n\n'
            "[monitor]\npoll_interval = 0.1\nready_quiet = 0.2\n"
            + "".join(f"{key} = {value!r}\n" for key, value in (monitor or {}).items())
            + "\n"
            f"[metrics]\nport = {metrics_port}\n\n"
            '[[projects]]\nname = "proj"\nrepo_root = "project"\nops_repo_root = "ops"\n'
            'forge_url = "http://127.0.0.1:9"\nprimary_branch = "main"\n\n'
            + "\n".join(agents)
            # Tests run agents side by side unless they test the slots themselves.
            + ("" if "[credentials." in extra else "\n[credentials.default]\nmax_sessions = 64\n")
            + extra
        )
        self.config_path.write_text(text)
        return load_config(self.config_path)

    def start_worker(self, host: str = "host-a") -> Stack:
        """Start a real Celery worker for this fleet's config (no beat, no Flower)."""
        cfg = dataclasses.replace(load_config(self.config_path), host=host)
        stack = Stack(cfg, flower=False, beat=False, log_dir=self.root / f"logs-{host}")
        stack.start()
        self.stacks.append(stack)
        return stack

    def run(self, agent: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send a run of ``agent`` and wait for its result dict."""
        return wait_result(self.send(agent), timeout)

    def send(self, agent: str) -> Any:
        """Send a run of ``agent``; return its AsyncResult."""
        app = client_app(load_config(self.config_path))
        self.clients.append(app)
        return app.send_task("formulabeat.run", args=["proj", agent], queue="formulabeat")

    def close_clients(self) -> None:
        """Let go of the result subscriptions of every run sent, while their Redis still answers.

        An AsyncResult left to the garbage collector unsubscribes from its
        run's result then: with a Sentinel group stopped after its test, that
        reconnect would hold up a later test.
        """
        for app in self.clients:
            consumer = app.backend.result_consumer
            consumer.stop()
            consumer.subscribed_to.clear()
        self.clients.clear()

    def start_beat(
        self, name: str = "beat", extra: list[str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``celery beat`` (redbeat) for this fleet's config in its own process
        group, with ``extra`` arguments; the process and its log. The caller stops it."""
        cfg = load_config(self.config_path)
        log = self.root / f"{name}.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen(
                beat_argv(cfg, extra),
                env=child_env(cfg),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log

    def start_flower(self) -> tuple[Config, str]:
        """A worker and Flower for the fleet's agents; its config and Flower's API URL."""
        self.write_config(f"\n[flower]\nport = {free_port()}\n")
        cfg = dataclasses.replace(load_config(self.config_path), host="host-a")
        stack = Stack(cfg, flower=True, beat=False, log_dir=self.root / "logs")
        stack.start()
        self.stacks.append(stack)
        api = f"http://127.0.0.1:{cfg.flower_port}/api"
        wait_until(lambda: get_json(f"{api}/workers") is not None, 60, "Flower's API")
        return cfg, api

    def send_live(self, agent: str, timeout: float = 60.0) -> Any:
        """Send a run of ``agent``; return its AsyncResult once the run is AWAITING_CI."""
        sent = self.send(agent)
        wait_until(lambda: sent.state == "AWAITING_CI", timeout, "the run to be live")
        return sent


def get_json(url: str) -> object | None:
    """What ``url`` answers in JSON; None when it does not answer 200."""
    try:
        response = requests.get(url, timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def wait_result(result: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll an AsyncResult until the run has ended; return its result dict.

    Its final state must be the one its outcome calls for (SUCCESS only for
    done and merged).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = result.state  # read once: the run may end between two reads
        value = result_of(result) if state in FINAL_STATES else None
        if value is not None:
            assert state == final_state(value["outcome"]), (state, value)
            return value
        # Ended, but not as a run does (a task's own exception).
        assert state not in ("FAILURE", "REVOKED"), result.traceback
        time.sleep(0.1)
    raise AssertionError(f"run {result.id} did not end within {timeout} s (state {result.state})")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


@pytest.fixture
def fleet(
    tmp_path: Path, redis_server: EmbeddedRedis, redis_client: redis.Redis, tmux_socket: str
) -> Iterator[Fleet]:
    """A fleet on the private Redis with a project and ops repo; its workers stop after."""
    commit_files(tmp_path / "project", {"README.md": "# proj\n"})
    commit_files(tmp_path / "ops", {"journal.md": "# journal\n"})
    fleet = Fleet(root=tmp_path, redis_url=redis_server.url, tmux_socket=tmux_socket)
    yield fleet
    for stack in fleet.stacks:
        stack.stop()


@pytest.fixture
def sentinel_lab(tmp_path: Path) -> Iterator[SentinelLab]:
    """A master, two replicas and three Sentinels, stopped after the test."""
    group = SentinelLab(tmp_path / "sentinels")
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def ha_fleet(tmp_path: Path, sentinel_lab: SentinelLab, tmux_socket: str) -> Iterator[Fleet]:
    """A fleet whose broker URL names the Sentinels, not a Redis."""
    commit_files(tmp_path / "project", {"README.md": "# proj\n"})
    commit_files(tmp_path / "ops", {"journal.md": "# journal\n"})
    fleet = Fleet(
        root=tmp_path,
        redis_url=sentinel_lab.url,
        tmux_socket=tmux_socket,
        broker_settings=f'master_name = "{MASTER_NAME}"\n',
    )
    yield fleet
    fleet.close_clients()
    for stack in fleet.stacks:
        stack.stop()
