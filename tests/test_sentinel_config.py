"""The ``sentinel://`` broker URL form and its ``[broker]`` keys (issue 21)."""

from __future__ import annotations

import ssl
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
    assert (parsed.password, parsed.tls) == ("s3cret", None)
    assert sentinel.parse("sentinels://h:1").tls is not None


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


TLS = (
    "sentinels://:s3cret@10.0.0.1:26379?ssl_cert_reqs=CERT_OPTIONAL&ssl_ca_certs=/etc/ca%20x.pem;"
    "sentinels://10.0.0.2?ssl_certfile=/etc/c.pem&ssl_keyfile=/etc/c.key;sentinels://10.0.0.3"
)


def test_a_sentinels_url_takes_the_tls_parameters_on_any_part() -> None:
    parsed = sentinel.parse(TLS)
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26379))
    assert parsed.tls == {
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_ca_certs": "/etc/ca x.pem",
        "ssl_certfile": "/etc/c.pem",
        "ssl_keyfile": "/etc/c.key",
    }
    assert parsed.connection_kwargs() == {"ssl": True, **parsed.tls}
    # Certificates are checked unless the URL says otherwise, as redis-py does.
    assert sentinel.parse("sentinels://h:1").tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert sentinel.parse(URL).connection_kwargs() == {}
    assert sentinel.without_tls(TLS) == (
        "sentinels://:s3cret@10.0.0.1:26379;sentinels://10.0.0.2;sentinels://10.0.0.3"
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "sentinels://:s3cret@h:1?ssl_ca_cert=/ca.pem",
            r"1\. part has an unknown parameter 'ssl_ca_cert' \(it takes ssl_cert_reqs, ",
        ),
        (
            "sentinels://:s3cret@h:1;sentinel://h:2",
            r"2\. part mixes sentinel:// and sentinels:// \(TLS\)",
        ),
        (
            "sentinel://:s3cret@h:1?ssl_ca_certs=/ca.pem",
            r"1\. part has ssl_ca_certs, which needs TLS: use sentinels://",
        ),
        (
            "sentinels://:s3cret@h:1?ssl_ca_certs=/a.pem;sentinels://h:2?ssl_ca_certs=/b.pem",
            r"2\. part gives ssl_ca_certs another value",
        ),
        (
            "sentinels://:s3cret@h:1?ssl_cert_reqs=always",
            r"ssl_cert_reqs='always': use required, optional or none",
        ),
        ("sentinels://:s3cret@h:1?ssl_keyfile=", r"1\. part has an empty ssl_keyfile"),
        (
            "sentinels://:s3cret@h:1?ssl_keyfile=/a&ssl_keyfile=/b",
            r"1\. part gives ssl_keyfile twice",
        ),
    ],
)
def test_a_bad_tls_parameter_is_named_with_its_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, problem: str
) -> None:
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    for where, text in (
        ("broker.url", _text(f'url = "{url}"\nmaster_name = "fb"')),
        ("broker.result_backend", _text(f'result_backend = "{url}"')),
    ):
        with pytest.raises(ConfigError, match=problem) as caught:
            parse_config(text, tmp_path / "f.toml")
        assert where in str(caught.value) and "f.toml" in str(caught.value)
        assert "s3cret" not in str(caught.value)
    monkeypatch.setenv(BROKER_URL_ENV, url)
    with pytest.raises(ConfigError, match=r"\$FORMULABEAT_BROKER_URL.*not a Sentinel URL"):
        parse_config(_text('master_name = "fb"'), tmp_path / "f.toml")


def test_a_missing_ca_file_is_found_when_connecting_as_for_rediss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither config checks the CA file: connecting fails, and doctor says
    # why (for sentinels://, tests/test_sentinel_tls.py).
    monkeypatch.delenv(BROKER_URL_ENV, raising=False)
    for url in (
        f"rediss://h:6379/0?ssl_cert_reqs=required&ssl_ca_certs={tmp_path}/gone.pem",
        f"sentinels://h:1?ssl_ca_certs={tmp_path}/gone.pem",
    ):
        master = 'master_name = "fb"' if url.startswith("sentinels") else ""
        assert (
            parse_config(_text(f'url = "{url}"\n{master}'), tmp_path / "f.toml").broker_url == url
        )
