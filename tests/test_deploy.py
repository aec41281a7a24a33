"""deploy/: the systemd units verify cleanly, the compose file parses, the example config loads."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
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


def test_compose_file_has_redis_worker_beat_and_flower() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "worker", "beat", "flower"}
    for part in ("worker", "beat", "flower"):
        assert services[part]["command"] == ["formulabeat", part]
        assert services[part]["environment"]["FORMULABEAT_CONFIG"].endswith("formulabeat.toml")
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert "--requirepass" in services["redis"]["command"]
