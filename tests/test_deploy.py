"""deploy/: the systemd units verify cleanly, the compose file parses, the example config loads."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).parent.parent / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def test_there_is_a_unit_per_part() -> None:
    assert [u.name for u in UNITS] == [
        "formulabeat-beat.service",
        "formulabeat-flower.service",
        "formulabeat-worker.service",
    ]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_have_restart_user_and_hardening(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit)
    service = parser["Service"]
    assert service["Restart"] == "on-failure"
    assert service["User"] == "formulabeat"
    assert service["ExecStart"].endswith(unit.stem.removeprefix("formulabeat-"))
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    # tmux's socket dir and git's repos stay writable under ProtectSystem=strict.
    assert (
        "/tmp" in service["ReadWritePaths"] and "/var/lib/formulabeat" in service["ReadWritePaths"]
    )
    assert parser["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_verify_without_warnings(unit: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this installation's script.
    script = Path(sys.executable).with_name("formulabeat")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/formulabeat/.venv/bin/formulabeat", str(script)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    problems = [line for line in proc.stderr.splitlines() if str(copy) in line]
    assert problems == []


def test_compose_file_has_redis_beat_flower_and_two_workers() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "beat", "flower", "worker-1", "worker-2"}
    # One image for all, Redis included: no registry needed.
    assert {s["image"] for s in services.values()} == {"${FORMULABEAT_IMAGE:-formulabeat:latest}"}
    for name in ("beat", "flower", "worker-1", "worker-2"):
        part = name.split("-")[0]
        assert services[name]["command"] == ["formulabeat", part]
        env = services[name]["environment"]
        assert env["FORMULABEAT_CONFIG"].endswith("formulabeat.toml")
        assert env["FORMULABEAT_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    hosts = [services[w]["environment"]["FORMULABEAT_HOST"] for w in ("worker-1", "worker-2")]
    assert hosts == ["worker-1", "worker-2"]
    state_dirs = {services[w]["environment"]["FORMULABEAT_STATE_DIR"] for w in hosts}
    assert len(state_dirs) == 2
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert services["flower"]["ports"] == ["${FLOWER_PUBLISH:-127.0.0.1:5555}:5555"]
    # AOF on; the password on stdin, not in the command line.
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "requirepass $$REDIS_PASSWORD" in redis_command
    assert "--requirepass" not in redis_command


def test_compose_ha_profile_has_two_replicas_three_sentinels_and_points_every_part_at_them() -> (
    None
):
    ha = yaml.safe_load((DEPLOY / "compose.ha.yaml").read_text())
    services = ha["services"]
    sentinels = [f"sentinel-{n}" for n in (1, 2, 3)]
    assert {"redis-replica-1", "redis-replica-2", *sentinels} <= set(services)
    for name in ("redis-replica-1", "redis-replica-2"):
        command = " ".join(services[name]["command"])
        assert "replicaof redis 6379" in command and "masterauth $$REDIS_PASSWORD" in command
    # The first master can be made a replica: it needs the password too.
    assert "masterauth $$REDIS_PASSWORD" in " ".join(services["redis"]["command"])
    for name in sentinels:
        script = " ".join(services[name]["command"])
        assert "sentinel monitor formulabeat redis 6379 2" in script
        assert "--sentinel" in script and "auth-pass formulabeat $$REDIS_PASSWORD" in script
    for name in ("beat", "flower", "worker-1", "worker-2"):
        env = services[name]["environment"]
        assert env["FORMULABEAT_MASTER_NAME"] == "formulabeat"
        parts = env["FORMULABEAT_BROKER_URL"].split(";")
        assert [p.rsplit("@", 1)[-1].removeprefix("sentinel://") for p in parts] == [
            f"{s}:26379" for s in sentinels
        ]
        assert set(services[name]["depends_on"]) == set(sentinels)


def test_dockerfile_pins_the_makefiles_claude_code_version() -> None:
    makefile = (DEPLOY.parent / "Makefile").read_text()
    pinned = re.search(r"^CLAUDE_CODE_VERSION := (\S+)$", makefile, re.M)
    assert pinned
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG CLAUDE_CODE_VERSION={pinned.group(1)}\n" in dockerfile


def test_every_package_is_installed() -> None:
    # The image installs the checkout without -e: a package missing from
    # pyproject's list is missing there (the editable install hides it).
    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(DEPLOY.parent).parts)
        for top in ("tasks", "workers")
        for init in (DEPLOY.parent / top).rglob("__init__.py")
    }
    assert found == listed
