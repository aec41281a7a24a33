"""The configuration file, ``formulabeat.toml``: typed, validated, immutable.

A bad file fails fast with the file, the key and what is wrong; unknown keys
are collected as warnings (a typo must not silently change behaviour, but it
must not stop a fleet either).
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from workers import sentinel
from workers.errors import ConfigError

CONFIG_ENV = "FORMULABEAT_CONFIG"
HOST_ENV = "FORMULABEAT_HOST"
# Per-process overrides of two keys, for deployments that share one file
# (containers): the broker URL carries the Redis password, which belongs in
# the environment rather than in a file every part mounts; the state dir is
# per host, and hosts that share a filesystem each need their own.
BROKER_URL_ENV = "FORMULABEAT_BROKER_URL"
# Beside a sentinel:// $FORMULABEAT_BROKER_URL (a compose file sets both).
MASTER_NAME_ENV = "FORMULABEAT_MASTER_NAME"
STATE_DIR_ENV = "FORMULABEAT_STATE_DIR"
CONFIG_NAME = "formulabeat.toml"
DEFAULT_COMMAND = "claude --dangerously-skip-permissions"
MODES = ("session", "oneshot")
# What a new run does while its credential is known to be limited by the API:
# skipped with the reset time, or also sent again for just after the reset.
ON_LIMIT = ("skip", "defer")

# Names end up in tmux session names, Redis keys and queue names: tmux forbids
# '.' and ':' in session names and a space would need quoting everywhere, so
# refuse anything beyond this set instead of mapping it ambiguously.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CRON_FIELDS = ("minute", "hour", "day of month", "month", "day of week")

T = TypeVar("T")


@dataclass(frozen=True)
class ProjectConfig:
    """One project: the repository agents work in and where it is hosted."""

    name: str
    repo_root: Path
    ops_repo_root: Path | None
    forge_url: str
    forge_repo: str
    primary_branch: str
    graph_command: str | None = None
    graph_timeout: float = 120.0
    ops_repo: str | None = None


@dataclass(frozen=True)
class AgentConfig:
    """One formula agent of a project and how it is scheduled and run."""

    name: str
    project: str
    formula: Path
    schedule: str
    context: tuple[str, ...] = ()
    min_memory_mb: int = 2000
    idle_timeout: float = 7200.0
    max_runtime: float = 4 * 3600.0
    command: str = DEFAULT_COMMAND
    model: str | None = None
    enabled: bool = True
    ready_prompt: str = "❯"
    run_on_start: bool = False
    mode: str = "session"
    scratch: bool = True
    forge_token_env: str = "FORGE_TOKEN"
    ops_commit: tuple[str, ...] = ()
    credential: str = "default"
    # The agent CLI's driver by name (workers.agents), or None: the one whose
    # program the command runs (else "plain"). The drivers know their names
    # and programs; this file only carries the choice (workers.agents.checked).
    driver: str | None = None
    # The agent's environment beyond the basics: literal values, and names
    # copied from the worker's environment (both through the 0600 launch file).
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] = ()
    # Claude Code's startup questions, answered only when these say so.
    approve_api_key: bool = False
    accept_bypass_mode: bool = False
    # Per run: a run that passes one is stopped and ends over_budget.
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    # The agent's CPU priority below the worker's (nice increment, 0-19):
    # measured, 20 Claude Code CLIs at work saturate 2 cores, and the phase
    # reports' p99 went from 190 to 79 ms with the agents at +10.
    nice: int = 10
    # A turn that ends on a transient API error (overloaded, rate or usage
    # limit, a server error, no connection) is waited out and the agent told
    # to go on, this many times per run; the first wait lasts api_retry_delay
    # seconds and each next one twice the last (at most 30 minutes), unless
    # the CLI states when its limit resets.
    api_retries: int = 3
    api_retry_delay: float = 60.0
    on_limit: str = "skip"

    @property
    def key(self) -> str:
        """``project/agent``: how users name an agent on the command line."""
        return f"{self.project}/{self.name}"

    def argv(self) -> list[str]:
        """The agent command as an argument vector (``--model`` appended)."""
        argv = shlex.split(self.command)
        if self.model:
            argv += ["--model", self.model]
        return argv


@dataclass(frozen=True)
class CredentialConfig:
    """How many agent sessions may use one credential at once, across all hosts."""

    name: str
    # One, as the original's machine-wide flock: two CLIs refreshing one
    # OAuth login at once invalidate each other.
    max_sessions: int = 1
    wait: float = 300.0


@dataclass(frozen=True)
class Budget:
    """A daily (UTC) limit of one project's or one credential's runs, on every host."""

    kind: str  # "project" or "credential"
    name: str
    max_tokens: int | None = None
    max_cost_usd: float | None = None


@dataclass(frozen=True)
class MonitorConfig:
    """Timings of session start and phase monitoring (seconds, may be fractional)."""

    poll_interval: float = 0.25
    liveness_interval: float = 1.0
    ready_timeout: float = 120.0
    # Measured: Claude Code 2.1.197 took every paste 50 ms after its input box
    # was drawn (40 of 40), and lost one in ten pasted at once.
    ready_quiet: float = 0.05
    # After the paste, how long the agent has to confirm the prompt (its
    # UserPromptSubmit hook) before it is pasted once more, then given up.
    confirm_timeout: float = 15.0
    # A screen the driver does not know fails the start once unchanged this long.
    settle_seconds: float = 5.0
    # After a terminal phase, how long a CLI with a transcript may take to end
    # its turn (its Stop hook), so its last response is counted.
    finish_grace: float = 10.0
    # How often each session's transcript is read for its tokens (the
    # per-run budgets act on what was read).
    usage_interval: float = 5.0
    lease_seconds: float = 300.0
    # A wait for the API at least this long ends the CLI's process (one that
    # can resume its conversation): an idle Claude Code holds ~266 MiB.
    park_after: float = 300.0
    host_timeout: float = 30.0
    stale_worktree_hours: float = 24.0
    preserved_worktree_hours: float = 168.0


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    path: Path
    state_dir: Path
    broker_url: str | None
    result_backend: str | None
    host: str
    concurrency: int
    tmux_socket: str | None
    flower_address: str
    flower_port: int
    metrics_address: str
    metrics_port: int
    beat_lock_timeout: float
    monitor: MonitorConfig
    projects: tuple[ProjectConfig, ...]
    agents: tuple[AgentConfig, ...]
    credentials: tuple[CredentialConfig, ...] = ()
    # USD per million tokens, by model and kind (input, output, cache_read, cache_creation).
    prices: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    budgets: tuple[Budget, ...] = ()
    history_keep_days: int = 30
    # Only with a sentinel:// broker_url: the master the Sentinels name, their own password.
    master_name: str | None = None
    sentinel_password: str | None = None
    warnings: tuple[str, ...] = field(default=())

    def project(self, name: str) -> ProjectConfig:
        """The project named ``name``, or a ConfigError naming the known ones."""
        for project in self.projects:
            if project.name == name:
                return project
        known = ", ".join(p.name for p in self.projects) or "none"
        raise ConfigError(self.path, "projects", f"no project named {name!r} (known: {known})")

    def agent(self, project: str, name: str) -> AgentConfig:
        """The agent ``name`` of ``project``, or a ConfigError naming the known ones."""
        self.project(project)
        for agent in self.agents:
            if agent.project == project and agent.name == name:
                return agent
        known = ", ".join(a.name for a in self.agents if a.project == project) or "none"
        raise ConfigError(
            self.path, "agents", f"project {project!r} has no agent {name!r} (known: {known})"
        )

    def budgets_of(self, agent: AgentConfig) -> list[Budget]:
        """The daily budgets a run of ``agent`` counts against."""
        wanted = {("project", agent.project), ("credential", agent.credential)}
        return [b for b in self.budgets if (b.kind, b.name) in wanted]

    def credential(self, name: str) -> CredentialConfig:
        """The limits of credential ``name`` (the defaults when it has no table)."""
        for credential in self.credentials:
            if credential.name == name:
                return credential
        return CredentialConfig(name=name)


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the config lives: ``--config``, then $FORMULABEAT_CONFIG, then ./formulabeat.toml."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env).expanduser().resolve()
    return (Path.cwd() / CONFIG_NAME).resolve()


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the configuration file (see :func:`find_config_path`)."""
    path = find_config_path(explicit)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            path,
            None,
            f"no configuration file (give --config, set ${CONFIG_ENV}, "
            f"or create {CONFIG_NAME} in the current directory)",
        ) from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text (byte {exc.start})") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    """Validate the TOML text of a config file found at ``path``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}") from None
    return _Parser(path, data).config()


class _Parser:
    """Walks the TOML document once, checking each key against its type."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.base = path.parent
        self.data = data
        self.warnings: list[str] = []

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    def table(self, key: str) -> dict[str, Any]:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), not {_kind(value)}")
        return value

    def tables(self, key: str) -> list[dict[str, Any]]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, f"must be an array of tables ([[{key}]])")
        return value

    def unknown(self, where: str, table: Mapping[str, Any], known: set[str]) -> None:
        extra = sorted(set(table) - known)
        if extra:
            named = []
            for key in extra:
                close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
                named.append(f"{key} (did you mean {close[0]}?)" if close else key)
            self.warnings.append(
                f"{self.path}: {where}: unknown key(s) ignored: {', '.join(named)}"
            )

    def missing(self, table: Mapping[str, Any], where: str, key: str) -> ConfigError:
        """``where.key`` is required, naming a key of the table it looks misspelt as."""
        present = [name for name in table if isinstance(name, str)]
        close = difflib.get_close_matches(key, present, n=1, cutoff=0.7)
        hint = f" (the table has {close[0]!r}: misspelt?)" if close else ""
        return self.fail(f"{where}.{key}" if where else key, f"is required{hint}")

    def get(
        self,
        table: Mapping[str, Any],
        where: str,
        key: str,
        kind: type[T],
        default: T | None = None,
        required: bool = False,
    ) -> T:
        full = f"{where}.{key}" if where else key
        if key not in table:
            if required:
                raise self.missing(table, where, key)
            return default  # type: ignore[return-value]
        value = table[key]
        # bool is an int subclass: `idle_timeout = true` must not pass as 1.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(full, f"must be {_kind_name(kind)}, not {_kind(value)}")
        return value

    def check(self, full: str, ok: bool, problem: str) -> None:
        if not ok:
            raise self.fail(full, problem)

    def path_value(self, table: Mapping[str, Any], where: str, key: str) -> Path | None:
        value = self.get(table, where, key, str)
        if value is None:
            return None
        self.check(f"{where}.{key}", value.strip() != "", "must not be empty")
        return (self.base / Path(value).expanduser()).resolve()

    def name(self, table: Mapping[str, Any], where: str) -> str:
        value = self.get(table, where, "name", str, required=True)
        self.check(
            f"{where}.name",
            bool(_NAME_RE.match(value)),
            f"{value!r} is not a valid name: use letters, digits, '-' and '_' "
            "(at most 48, starting with a letter or digit)",
        )
        return value

    def config(self) -> Config:
        top_known = {
            "state_dir",
            "broker",
            "worker",
            "tmux",
            "monitor",
            "flower",
            "metrics",
            "beat",
            "credentials",
            "prices",
            "budgets",
            "history",
        }
        top_known |= {"projects", "agents"}
        self.unknown("top level", self.data, top_known)
        state_dir = self.path_value(self.data, "", "state_dir") or _default_state_dir()
        if os.environ.get(STATE_DIR_ENV):
            state_dir = Path(os.environ[STATE_DIR_ENV]).expanduser().resolve()

        broker = self.table("broker")
        self.unknown(
            "[broker]", broker, {"url", "result_backend", "master_name", "sentinel_password"}
        )
        broker_url = self.get(broker, "broker", "url", str)
        url_where = "broker.url"
        if os.environ.get(BROKER_URL_ENV):
            broker_url, url_where = os.environ[BROKER_URL_ENV], f"${BROKER_URL_ENV}"
        result_backend = self.get(broker, "broker", "result_backend", str)
        for where, url in ((url_where, broker_url), ("broker.result_backend", result_backend)):
            if url is None:
                continue
            if sentinel.is_sentinel_url(url):
                try:
                    sentinel.parse(url)
                except ValueError as exc:
                    raise self.fail(where, f"not a Sentinel URL: {exc}") from None
                continue
            self.check(
                where,
                url.startswith(("redis://", "rediss://", "unix://")),
                f"{redact_url(url)!r} is not a Redis URL "
                "(redis://, rediss://, unix:// or sentinel://)",
            )
        master_name = self.get(broker, "broker", "master_name", str)
        name_where = "broker.master_name"
        if os.environ.get(MASTER_NAME_ENV):
            master_name, name_where = os.environ[MASTER_NAME_ENV], f"${MASTER_NAME_ENV}"
        sentinel_password = self.get(broker, "broker", "sentinel_password", str)
        if broker_url is not None and sentinel.is_sentinel_url(broker_url):
            if not master_name:
                raise self.fail("broker.master_name", "required with a sentinel:// url")
        else:
            # A master name beside a plain URL would be silently unused: say so.
            self.check(name_where, master_name is None, "only with a sentinel:// url")
            self.check(
                "broker.sentinel_password", sentinel_password is None, "only with a sentinel:// url"
            )

        worker = self.table("worker")
        self.unknown("[worker]", worker, {"host", "concurrency"})
        host = os.environ.get(HOST_ENV) or self.get(worker, "worker", "host", str)
        host = host or socket.gethostname()
        self.check("worker.host", bool(_NAME_RE.match(host.replace(".", "-"))), "invalid")
        concurrency = self.get(worker, "worker", "concurrency", int, 64)
        self.check("worker.concurrency", concurrency >= 1, "must be at least 1")

        tmux = self.table("tmux")
        self.unknown("[tmux]", tmux, {"socket"})
        tmux_socket = self.get(tmux, "tmux", "socket", str)

        flower = self.table("flower")
        self.unknown("[flower]", flower, {"address", "port"})
        flower_address = self.get(flower, "flower", "address", str, "127.0.0.1")
        flower_port = self.get(flower, "flower", "port", int, 5555)
        self.check("flower.port", 0 < flower_port < 65536, "must be a TCP port (1-65535)")

        metrics = self.table("metrics")
        self.unknown("[metrics]", metrics, {"address", "port"})
        metrics_address = self.get(metrics, "metrics", "address", str, "127.0.0.1")
        metrics_port = self.get(metrics, "metrics", "port", int, 9808)
        self.check("metrics.port", 0 <= metrics_port < 65536, "must be a TCP port, or 0 for none")

        beat = self.table("beat")
        self.unknown("[beat]", beat, {"lock_timeout"})
        beat_lock_timeout = self.get(beat, "beat", "lock_timeout", float, 30.0)
        self.check("beat.lock_timeout", beat_lock_timeout >= 2, "must be at least 2 seconds")

        monitor = self._monitor()
        credentials = self._credentials()
        projects = tuple(self._project(i, t) for i, t in enumerate(self.tables("projects")))
        names = [p.name for p in projects]
        for name in names:
            self.check("projects", names.count(name) == 1, f"project {name!r} is defined twice")
        agents = tuple(self._agent(i, t, set(names)) for i, t in enumerate(self.tables("agents")))
        keys = [a.key for a in agents]
        for key in keys:
            self.check("agents", keys.count(key) == 1, f"agent {key!r} is defined twice")
        return Config(
            path=self.path,
            state_dir=state_dir,
            broker_url=broker_url,
            result_backend=result_backend,
            master_name=master_name,
            sentinel_password=sentinel_password,
            host=host,
            concurrency=concurrency,
            tmux_socket=tmux_socket,
            flower_address=flower_address,
            flower_port=flower_port,
            metrics_address=metrics_address,
            metrics_port=metrics_port,
            beat_lock_timeout=beat_lock_timeout,
            monitor=monitor,
            projects=projects,
            agents=agents,
            credentials=credentials,
            prices=self._prices(),
            budgets=self._budgets(set(names)),
            history_keep_days=self._history(),
            warnings=tuple(self.warnings),
        )

    def _strings(self, table: Mapping[str, Any], where: str, key: str) -> list[str]:
        values = self.get(table, where, key, list, [])
        for i, item in enumerate(values):
            self.check(f"{where}.{key}[{i}]", isinstance(item, str), "must be a string")
        return values

    def _env(self, table: Mapping[str, Any], where: str) -> dict[str, str]:
        values = self.get(table, where, "env", dict, {})
        for name, value in values.items():
            self.check(
                f"{where}.env.{name}",
                bool(_ENV_NAME_RE.match(name)),
                "is not an environment variable name (letters, digits, _; not first a digit)",
            )
            self.check(
                f"{where}.env.{name}",
                isinstance(value, str),
                f'must be a string, not {_kind(value)} (quote it: {name} = "{value}")',
            )
        return dict(values)

    def _env_names(self, table: Mapping[str, Any], where: str, key: str) -> list[str]:
        names = self._strings(table, where, key)
        for index, name in enumerate(names):
            self.check(
                f"{where}.{key}[{index}]",
                bool(_ENV_NAME_RE.match(name)),
                f"{name!r} is not an environment variable name",
            )
        return names

    def _monitor(self) -> MonitorConfig:
        table = self.table("monitor")
        defaults = MonitorConfig()
        known = set(MonitorConfig.__dataclass_fields__)
        self.unknown("[monitor]", table, known)
        values = {
            key: self.get(table, "monitor", key, float, getattr(defaults, key)) for key in known
        }
        for key, value in values.items():
            self.check(f"monitor.{key}", value > 0, "must be greater than 0")
        return MonitorConfig(**values)

    def _prices(self) -> dict[str, dict[str, float]]:
        from workers.usage import KINDS

        prices: dict[str, dict[str, float]] = {}
        for model, table in self.table("prices").items():
            where = f'prices."{model}"'
            self.check(where, isinstance(table, dict), f"must be a table ([{where}])")
            self.unknown(f"[{where}]", table, set(KINDS))
            price = {}
            for kind in KINDS:
                value = self.get(table, where, kind, float, 0.0)
                self.check(
                    f"{where}.{kind}",
                    value >= 0,
                    f"must be 0 or more (USD per million), not {value}",
                )
                price[kind] = value
            prices[model] = price
        return prices

    def _limit_values(
        self, table: Mapping[str, Any], where: str
    ) -> tuple[int | None, float | None]:
        max_tokens = self.get(table, where, "max_tokens", int)
        max_cost = self.get(table, where, "max_cost_usd", float)
        if max_tokens is not None:
            self.check(f"{where}.max_tokens", max_tokens >= 1, "must be at least 1")
        if max_cost is not None:
            self.check(f"{where}.max_cost_usd", max_cost > 0, "must be greater than 0")
        return max_tokens, max_cost

    def _budgets(self, projects: set[str]) -> tuple[Budget, ...]:
        budgets = []
        table = self.table("budgets")
        self.unknown("[budgets]", table, {"projects", "credentials"})
        for group, kind in (("projects", "project"), ("credentials", "credential")):
            entries = table.get(group, {})
            self.check(f"budgets.{group}", isinstance(entries, dict), "must be a table")
            for name, limits in entries.items():
                where = f"budgets.{group}.{name}"
                self.check(where, isinstance(limits, dict), f"must be a table ([{where}])")
                if kind == "project":
                    self.check(where, name in projects, f"names no project ({name!r})")
                self.unknown(f"[{where}]", limits, {"max_tokens", "max_cost_usd"})
                max_tokens, max_cost = self._limit_values(limits, where)
                budgets.append(Budget(kind, name, max_tokens, max_cost))
        return tuple(budgets)

    def _history(self) -> int:
        table = self.table("history")
        self.unknown("[history]", table, {"keep_days"})
        keep = self.get(table, "history", "keep_days", int, 30)
        self.check("history.keep_days", keep >= 1, "must be at least 1")
        return keep

    def _credentials(self) -> tuple[CredentialConfig, ...]:
        credentials = []
        for name, table in self.table("credentials").items():
            where = f"credentials.{name}"
            self.check(where, isinstance(table, dict), f"must be a table ([{where}])")
            self.check(where, bool(_NAME_RE.match(name)), f"{name!r} is not a valid name")
            self.unknown(f"[{where}]", table, {"max_sessions", "wait"})
            credential = CredentialConfig(
                name=name,
                max_sessions=self.get(table, where, "max_sessions", int, 1),
                wait=self.get(table, where, "wait", float, 300.0),
            )
            self.check(f"{where}.max_sessions", credential.max_sessions >= 1, "must be at least 1")
            self.check(f"{where}.wait", credential.wait >= 0, "must be 0 or more")
            credentials.append(credential)
        return tuple(credentials)

    def _project(self, index: int, table: dict[str, Any]) -> ProjectConfig:
        where = f"projects[{index}]"
        name = self.name(table, where)
        where = f"projects[{index}] ({name})"
        self.unknown(where, table, set(ProjectConfig.__dataclass_fields__))
        repo_root = self.path_value(table, where, "repo_root")
        if repo_root is None:
            raise self.missing(table, where, "repo_root")
        forge_url = self.get(table, where, "forge_url", str, "http://localhost:3000")
        self.check(
            f"{where}.forge_url",
            forge_url.startswith(("http://", "https://")),
            f"{forge_url!r} is not an http(s) URL",
        )
        return ProjectConfig(
            name=name,
            repo_root=repo_root,
            ops_repo_root=self.path_value(table, where, "ops_repo_root"),
            forge_url=forge_url.rstrip("/"),
            forge_repo=self.get(table, where, "forge_repo", str, name),
            primary_branch=self.get(table, where, "primary_branch", str, "main"),
            graph_command=self.get(table, where, "graph_command", str),
            graph_timeout=self.get(table, where, "graph_timeout", float, 120.0),
            ops_repo=self.get(table, where, "ops_repo", str),
        )

    def _agent(self, index: int, table: dict[str, Any], projects: set[str]) -> AgentConfig:
        where = f"agents[{index}]"
        name = self.name(table, where)
        project = self.get(table, where, "project", str, required=True)
        where = f"agents[{index}] ({project}/{name})"
        self.unknown(where, table, set(AgentConfig.__dataclass_fields__))
        self.check(
            f"{where}.project",
            project in projects,
            f"names no project defined in [[projects]] ({project!r})",
        )
        formula = self.path_value(table, where, "formula")
        if formula is None:
            raise self.missing(table, where, "formula")
        schedule = self.get(table, where, "schedule", str, required=True)
        _check_schedule(schedule, lambda problem: self.fail(f"{where}.schedule", problem))
        context = self._strings(table, where, "context")
        command = self.get(table, where, "command", str, DEFAULT_COMMAND)
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise self.fail(f"{where}.command", f"cannot be split into words: {exc}") from None
        self.check(f"{where}.command", bool(argv), "must not be empty")
        max_tokens, max_cost = self._limit_values(table, where)
        defaults = AgentConfig(name="", project="", formula=Path(), schedule="")
        agent = AgentConfig(
            name=name,
            project=project,
            formula=formula,
            schedule=schedule,
            context=tuple(context),
            min_memory_mb=self.get(table, where, "min_memory_mb", int, defaults.min_memory_mb),
            idle_timeout=self.get(table, where, "idle_timeout", float, defaults.idle_timeout),
            max_runtime=self.get(table, where, "max_runtime", float, defaults.max_runtime),
            command=command,
            model=self.get(table, where, "model", str),
            enabled=self.get(table, where, "enabled", bool, True),
            ready_prompt=self.get(table, where, "ready_prompt", str, defaults.ready_prompt),
            run_on_start=self.get(table, where, "run_on_start", bool, False),
            mode=self.get(table, where, "mode", str, "session"),
            scratch=self.get(table, where, "scratch", bool, True),
            forge_token_env=self.get(table, where, "forge_token_env", str, "FORGE_TOKEN"),
            ops_commit=tuple(self._strings(table, where, "ops_commit")),
            credential=self.get(table, where, "credential", str, defaults.credential),
            driver=self.get(table, where, "driver", str),
            env=self._env(table, where),
            pass_env=tuple(self._env_names(table, where, "pass_env")),
            approve_api_key=self.get(table, where, "approve_api_key", bool, False),
            accept_bypass_mode=self.get(table, where, "accept_bypass_mode", bool, False),
            max_tokens=max_tokens,
            max_cost_usd=max_cost,
            nice=self.get(table, where, "nice", int, defaults.nice),
            api_retries=self.get(table, where, "api_retries", int, defaults.api_retries),
            api_retry_delay=self.get(
                table, where, "api_retry_delay", float, defaults.api_retry_delay
            ),
            on_limit=self.get(table, where, "on_limit", str, defaults.on_limit),
        )
        self.check(f"{where}.api_retries", agent.api_retries >= 0, "must be 0 or more")
        self.check(
            f"{where}.api_retry_delay", agent.api_retry_delay > 0, "must be greater than 0 seconds"
        )
        self.check(
            f"{where}.on_limit",
            agent.on_limit in ON_LIMIT,
            f'{agent.on_limit!r} is not a choice: use "skip" or "defer"',
        )
        self.check(f"{where}.nice", 0 <= agent.nice <= 19, "must be from 0 to 19")
        self.check(
            f"{where}.credential",
            bool(_NAME_RE.match(agent.credential)),
            f"{agent.credential!r} is not a valid credential name",
        )
        self.check(
            f"{where}.mode",
            agent.mode in MODES,
            f'{agent.mode!r} is not a mode: use "session" (tmux) or "oneshot"',
        )
        self.check(f"{where}.min_memory_mb", agent.min_memory_mb >= 0, "must be 0 or more")
        self.check(f"{where}.idle_timeout", agent.idle_timeout > 0, "must be greater than 0")
        self.check(f"{where}.max_runtime", agent.max_runtime > 0, "must be greater than 0")
        self.check(f"{where}.ready_prompt", agent.ready_prompt.strip() != "", "must not be empty")
        return agent


def _check_schedule(schedule: str, fail: Callable[[str], ConfigError]) -> None:
    """Accept exactly the 5-field crontab syntax Celery's crontab understands."""
    from celery.schedules import ParseException, crontab_parser

    fields = schedule.split()
    if len(fields) != 5:
        raise fail(
            f"{schedule!r} has {len(fields)} field(s); crontab syntax has 5: "
            "minute hour day-of-month month day-of-week"
        )
    parsers = (
        crontab_parser(60),
        crontab_parser(24),
        crontab_parser(31, 1),
        crontab_parser(12, 1),
        crontab_parser(7),
    )
    for name, text, parser in zip(_CRON_FIELDS, fields, parsers, strict=True):
        try:
            parser.parse(text)
        except (ParseException, ValueError) as exc:
            raise fail(f"{schedule!r}: bad {name} field {text!r}: {exc}") from None


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "formulabeat"


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _kind_name(kind: type) -> str:
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(kind, kind.__name__)


def redact_url(url: str) -> str:
    """A URL with any user:password part replaced, fit for logs and errors."""
    return re.sub(r"://[^@/]*@", "://***@", url)
