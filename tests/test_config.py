"""formulabeat.toml: defaults, discovery, and a clear error for each bad file."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

import pytest

from beat_schedule import build_schedule
from workers.config import (
    BROKER_URL_ENV,
    CONFIG_ENV,
    DEFAULT_COMMAND,
    STATE_DIR_ENV,
    load_config,
    parse_config,
)
from workers.errors import ConfigError
from workers.formula import load_formula

GOOD = """
state_dir = "state"

[[projects]]
name = "proj"
repo_root = "repo"
ops_repo_root = "ops"
forge_url = "http://forge.example:3000/"
primary_branch = "trunk"

[[agents]]
name = "planner"
project = "proj"
formula = "formulas/planner.toml"
schedule = "0 6 * * *"
context = ["README.md", "ops:journal.md"]
"""


def test_defaults_of_a_minimal_file(tmp_path: Path) -> None:
    cfg = parse_config(GOOD, tmp_path / "formulabeat.toml")
    agent = cfg.agent("proj", "planner")
    assert cfg.broker_url is None
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.tmux_socket is None
    assert agent.min_memory_mb == 2000
    assert agent.idle_timeout == 7200
    assert agent.command == DEFAULT_COMMAND
    assert agent.argv() == ["claude", "--dangerously-skip-permissions"]
    assert agent.enabled is True
    assert agent.formula == tmp_path / "formulas" / "planner.toml"
    assert agent.context == ("README.md", "ops:journal.md")
    project = cfg.project("proj")
    assert project.forge_url == "http://forge.example:3000"
    assert project.primary_branch == "trunk"
    assert project.repo_root == tmp_path / "repo"
    assert cfg.warnings == ()


def test_model_adds_the_model_flag(tmp_path: Path) -> None:
    cfg = parse_config(GOOD + 'model = "opus"\n', tmp_path / "f.toml")
    assert cfg.agent("proj", "planner").argv()[-2:] == ["--model", "opus"]


def test_unknown_keys_are_warnings_naming_them(tmp_path: Path) -> None:
    cfg = parse_config(GOOD + "colour = 'blue'\n", tmp_path / "f.toml")
    assert len(cfg.warnings) == 1
    assert "agents[0] (proj/planner): unknown key(s) ignored: colour" in cfg.warnings[0]


def test_a_misspelt_key_is_named_where_it_is_required_and_where_it_is_ignored(
    tmp_path: Path,
) -> None:
    bad = GOOD.replace("schedule =", "shedule =")
    with pytest.raises(ConfigError) as raised:
        parse_config(bad, tmp_path / "f.toml")
    assert str(raised.value).endswith(
        "agents[0] (proj/planner).schedule: is required (the table has 'shedule': misspelt?)"
    )
    cfg = parse_config(GOOD + "max_token = 5\n", tmp_path / "f.toml")
    assert cfg.warnings == (
        f"{tmp_path / 'f.toml'}: agents[0] (proj/planner): unknown key(s) ignored: "
        "max_token (did you mean max_tokens?)",
    )


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_unknown_key_warning_is_printed_once_above_celerys_banner(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text(GOOD + "colour = 'blue'\n" + '[broker]\nurl = "redis://127.0.0.1:9/0"\n')
    proc = _cli(config, "worker", "--", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("unknown key(s) ignored: colour") == 1, proc.stderr
    assert proc.stderr.startswith("warning: ") and "(proj/planner)" in proc.stderr


def test_worker_without_a_broker_says_so_before_celery_starts(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text(GOOD)
    proc = _cli(config, "worker")
    assert proc.returncode == 4
    assert "[broker] url is not set" in proc.stderr and "Traceback" not in proc.stderr


def test_config_is_found_by_flag_then_env_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("flag", "env", "cwd"):
        (tmp_path / name).mkdir()
        text = GOOD.replace('"proj"', f'"{name}"')
        (tmp_path / name / "formulabeat.toml").write_text(text)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert load_config().projects[0].name == "cwd"
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env" / "formulabeat.toml"))
    assert load_config().projects[0].name == "env"
    assert load_config(tmp_path / "flag" / "formulabeat.toml").projects[0].name == "flag"


def test_broker_url_and_state_dir_from_the_environment_win_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the compose stack does: one file for every container, the Redis
    # password only in the environment, a state dir per worker.
    text = GOOD.replace(
        'state_dir = "state"', 'state_dir = "state"\n[broker]\nurl = "redis://file:6379/0"'
    )
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    cfg = parse_config(text, tmp_path / "f.toml")
    assert (cfg.broker_url, cfg.state_dir) == ("redis://file:6379/0", tmp_path / "state")
    monkeypatch.setenv(BROKER_URL_ENV, "redis://:s3cret@redis:6379/0")
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "host-1"))
    cfg = parse_config(text, tmp_path / "f.toml")
    assert (cfg.broker_url, cfg.state_dir) == ("redis://:s3cret@redis:6379/0", tmp_path / "host-1")
    # The result backend follows the broker unless the file names its own.
    assert cfg.result_backend is None
    monkeypatch.setenv(BROKER_URL_ENV, "http://:s3cret@redis/")
    with pytest.raises(ConfigError, match=r"\$FORMULABEAT_BROKER_URL.*not a Redis URL") as caught:
        parse_config(text, tmp_path / "f.toml")
    assert "s3cret" not in str(caught.value)


def test_missing_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config(tmp_path / "nope.toml")


BAD = [
    ("state_dir = \n", None, "not valid TOML: Invalid value (at line 1, column 13)"),
    ("[broker]\nurl = 5\n", "broker.url", "must be a string, not an integer"),
    ('[broker]\nurl = "amqp://x"\n', "broker.url", "is not a Redis URL"),
    ("[worker]\nconcurrency = 0\n", "worker.concurrency", "must be at least 1"),
    ("[flower]\nport = 70000\n", "flower.port", "must be a TCP port"),
    ("[monitor]\npoll_interval = -1\n", "monitor.poll_interval", "must be greater than 0"),
    ("[monitor]\npoll_interval = true\n", "monitor.poll_interval", "must be a number"),
    ("projects = 3\n", "projects", "must be an array of tables"),
    ('[[projects]]\nrepo_root = "r"\n', "projects[0].name", "is required"),
    ('[[projects]]\nname = "a b"\nrepo_root = "r"\n', "projects[0].name", "not a valid name"),
    ('[[projects]]\nname = "p"\n', "projects[0] (p).repo_root", "is required"),
    (
        '[[projects]]\nname = "p"\nrepo_root = "r"\nforge_url = "ftp://x"\n',
        "projects[0] (p).forge_url",
        "is not an http(s) URL",
    ),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD)
def test_bad_top_level_and_projects(
    tmp_path: Path, text: str, key: str | None, message: str
) -> None:
    path = tmp_path / "formulabeat.toml"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    assert caught.value.key == key
    assert message in caught.value.problem
    assert str(caught.value).startswith(f"{path}: ")


AGENT_BAD = [
    ('schedule = "0 6 * *"', "schedule", "has 4 field(s); crontab syntax has 5"),
    ('schedule = "61 * * * *"', "schedule", "bad minute field '61'"),
    ('schedule = "0 25 * * *"', "schedule", "bad hour field '25'"),
    ('schedule = "0 0 * 13 *"', "schedule", "bad month field '13'"),
    ('schedule = "0 0 * * funday"', "schedule", "bad day of week field 'funday'"),
    ('project = "elsewhere"', "project", "names no project defined"),
    ("min_memory_mb = -5", "min_memory_mb", "must be 0 or more"),
    ('min_memory_mb = "lots"', "min_memory_mb", "must be an integer, not a string"),
    ("idle_timeout = 0", "idle_timeout", "must be greater than 0"),
    ("enabled = 1", "enabled", "must be true or false, not an integer"),
    ('command = ""', "command", "must not be empty"),
    ('command = "claude \'unclosed"', "command", "cannot be split into words"),
    ("context = [1]", "context[0]", "must be a string"),
    ('formula = ""', "formula", "must not be empty"),
]


@pytest.mark.parametrize(("line", "key", "message"), AGENT_BAD)
def test_bad_agent_keys_name_the_agent_and_key(
    tmp_path: Path, line: str, key: str, message: str
) -> None:
    name = line.split(" =")[0]
    lines = [ln for ln in GOOD.splitlines() if not ln.startswith(f"{name} =")]
    text = "\n".join(lines) + "\n" + line + "\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "formulabeat.toml")
    owner = "elsewhere" if name == "project" else "proj"
    assert caught.value.key == f"agents[0] ({owner}/planner).{key}"
    assert message in caught.value.problem


def test_duplicate_agent_is_refused(tmp_path: Path) -> None:
    agent = GOOD[GOOD.index("[[agents]]") :]
    with pytest.raises(ConfigError, match="agent 'proj/planner' is defined twice"):
        parse_config(GOOD + agent, tmp_path / "f.toml")


def test_unknown_agent_lists_the_known_ones(tmp_path: Path) -> None:
    cfg = parse_config(GOOD, tmp_path / "f.toml")
    with pytest.raises(ConfigError, match=r"has no agent 'gardener' \(known: planner\)"):
        cfg.agent("proj", "gardener")


def test_beat_schedule_has_one_crontab_entry_per_agent(tmp_path: Path) -> None:
    text = GOOD + "run_on_start = true\n"
    cfg = parse_config(text, tmp_path / "f.toml")
    schedule = build_schedule(cfg)
    entry = schedule["proj/planner"]
    assert entry["task"] == "formulabeat.run"
    assert entry["args"] == ("proj", "planner")
    assert entry["schedule"].hour == {6} and entry["schedule"].minute == {0}
    # run_on_start: a beat with no record of the agent finds it due at once.
    assert entry["last_run_at"] < dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
    plain = build_schedule(parse_config(GOOD, tmp_path / "f.toml"))["proj/planner"]
    assert "last_run_at" not in plain


def test_the_deploy_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "deploy" / "formulabeat.example.toml"
    cfg = load_config(example)
    assert [a.name for a in cfg.agents] == ["planner", "predictor", "gardener", "supervisor"]
    assert cfg.warnings == ()


def test_every_config_key_is_documented_in_the_readme() -> None:
    from workers.config import AgentConfig, MonitorConfig, ProjectConfig

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    keys = [
        "state_dir",
        "[broker] url",
        "[broker] result_backend",
        "[worker] host",
        "[worker] concurrency",
        "[tmux] socket",
        "[flower] address",
        "[metrics] address",
        *(f"[monitor] {name}" for name in MonitorConfig.__dataclass_fields__),
        "`[[projects]] name`",
        "`[[agents]] name`, `project`",
        *(f"`{name}`" for name in ProjectConfig.__dataclass_fields__ if name != "name"),
        *(f"`{name}`" for name in AgentConfig.__dataclass_fields__ if name != "name"),
    ]
    missing = [key for key in keys if key not in section]
    assert missing == []


def test_the_readmes_own_project_example_is_a_valid_config_and_formula(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Your own project", 1)[1].split("\n## ", 1)[0]
    formula_text, config_text = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    formula = tmp_path / "planner.toml"
    formula.write_text(formula_text)
    assert [step.id for step in load_formula(formula).steps] == ["read", "plan"]
    config_text = config_text.replace("/srv/repos/myproj/formulas/planner.toml", str(formula))
    cfg = parse_config(config_text, tmp_path / "formulabeat.toml")
    assert cfg.warnings == ()
    assert cfg.agent("myproj", "planner").formula == formula


# -- the agent's driver: named, or inferred from the command ----------------------


@pytest.mark.parametrize(
    ("command", "driver"),
    [
        ("claude --dangerously-skip-permissions", "claude-code"),
        ("/opt/bin/codex --dangerously-bypass-approvals-and-sandbox", "codex"),
        ("gemini --approval-mode yolo", "gemini"),
        ("aider --yes", "plain"),
    ],
)
def test_a_driver_is_inferred_from_the_commands_program(
    tmp_path: Path, command: str, driver: str
) -> None:
    from workers.agents import checked, driver_name

    cfg = checked(parse_config(GOOD + f'command = "{command}"\n', tmp_path / "f.toml"))
    assert driver_name(cfg.agent("proj", "planner")) == driver


def test_an_unknown_driver_names_the_agent_the_key_and_the_drivers(tmp_path: Path) -> None:
    from workers.agents import checked

    cfg = parse_config(GOOD + 'driver = "codx"\n', tmp_path / "f.toml")
    with pytest.raises(ConfigError) as raised:
        checked(cfg)
    text = str(raised.value)
    assert "agents[0] (proj/planner).driver" in text and "'codx' is not a driver" in text
    assert "claude-code, codex, gemini, plain, scripted" in text
    # And the CLI says so, as for any bad key.
    config = tmp_path / "f.toml"
    config.write_text(GOOD + 'driver = "codx"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--config", str(config), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 4 and "'codx' is not a driver" in proc.stderr


def test_the_config_does_not_import_the_drivers() -> None:
    # Drivers depend on the config, not the other way round.
    code = (
        "import sys, workers.config; "
        "print(any(m.startswith('workers.agents') for m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "False"
