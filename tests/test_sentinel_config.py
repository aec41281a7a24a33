"""The ``sentinel://`` broker URL form and its ``[broker]`` keys (issue 21)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers import sentinel
from workers.config import BROKER_URL_ENV, MASTER_NAME_ENV, parse_config
from workers.errors import ConfigError

URL = "sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"


def _text(broker: str) -> str:
    return f'state_dir = "state"\n[broker]\n{broker}\n'


def test_the_url_names_every_sentinel_and_the_password() -> None:
    parsed = sentinel.parse(URL)
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (parsed.password, parsed.ssl) == ("s3cret", False)
    assert sentinel.parse("sentinels://h:1").ssl


def test_a_sentinel_url_needs_a_master_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"broker\.master_name.*required") as caught:
        parse_config(_text(f'url = "{URL}"'), tmp_path / "f.toml")
    assert "f.toml" in str(caught.value) and "s3cret" not in str(caught.value)
    cfg = parse_config(
        _text(f'url = "{URL}"\nmaster_name = "fb"\nsentinel_password = "x"'), tmp_path / "f.toml"
    )
    assert (cfg.master_name, cfg.sentinel_password) == ("fb", "x")


def test_the_env_url_takes_the_sentinel_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BROKER_URL_ENV, URL)
    cfg = parse_config(_text('master_name = "fb"'), tmp_path / "f.toml")
    assert cfg.broker_url == URL
    # A compose file gives both by the environment; the file names neither.
    monkeypatch.setenv(MASTER_NAME_ENV, "from-env")
    assert parse_config(_text(""), tmp_path / "f.toml").master_name == "from-env"
    monkeypatch.setenv(BROKER_URL_ENV, "redis://h:6379/0")
    with pytest.raises(ConfigError, match=r"\$FORMULABEAT_MASTER_NAME.*only with a sentinel"):
        parse_config(_text(""), tmp_path / "f.toml")


def test_a_master_name_beside_a_plain_url_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    text = _text('url = "redis://h:6379/0"\nmaster_name = "fb"')
    with pytest.raises(ConfigError, match=r"broker\.master_name.*only with a sentinel"):
        parse_config(text, tmp_path / "f.toml")
