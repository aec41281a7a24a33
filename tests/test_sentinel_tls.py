"""Redis behind Sentinel over TLS (``sentinels://``): a run, doctor, redbeat, kombu's reconnect.

One lab for the file: every server TLS only, asking each client for a
certificate, so a connection that leaves out any of the URL's TLS
parameters (the CA on its first part, the client's certificate on its last)
is refused.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.connection import Connection
from redbeat.schedulers import get_redis

from tasks.app import client_app
from tasks.transport import SentinelTransport
from tests.conftest import Fleet, held_claims
from tests.sentinels import MASTER_NAME, SentinelLab, doctor
from tests.test_tls_broker import _supports_tls
from workers.config import Config, parse_config
from workers.embedded import redis_server_binary

URL = (
    "sentinels://:pw@127.0.0.1:9?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem;"
    "sentinels://127.0.0.1:10?ssl_certfile=/etc/client.pem&ssl_keyfile=/etc/client.key"
)


def _config(tmp_path: Path, url: str) -> Config:
    text = f'state_dir = "state"\n[broker]\nurl = "{url}"\nmaster_name = "fb"\n'
    return parse_config(text, tmp_path / "formulabeat.toml")


def test_each_part_of_celery_takes_the_tls_settings_its_own_way(tmp_path: Path) -> None:
    conf = client_app(_config(tmp_path, URL)).conf
    tls = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_certfile": "/etc/client.pem",
        "ssl_keyfile": "/etc/client.key",
    }
    # The masters' connections: each in its documented setting.
    assert conf.broker_use_ssl == conf.redis_backend_use_ssl == conf.redbeat_redis_use_ssl == tls
    # The Sentinels' connections.
    for options in (conf.broker_transport_options, conf.result_backend_transport_options):
        assert options["sentinel_kwargs"] == {"ssl": True, **tls}
    assert conf.redbeat_redis_options["sentinel_kwargs"] == {"ssl": True, **tls}
    # kombu would read the first part's query alone, in place of broker_use_ssl.
    plain = "sentinels://:pw@127.0.0.1:9;sentinels://127.0.0.1:10"
    assert conf.broker_url == plain
    assert conf.result_backend == "tasks.backend:SentinelBackend+" + plain


def test_a_broker_connection_stays_on_its_sentinel_transport_after_an_error(
    tmp_path: Path,
) -> None:
    # What kombu does after a connection error: switch to the URL's next part.
    url = "sentinels://:pw@127.0.0.1:9;sentinels://127.0.0.1:10"
    stock = Connection(url, transport=SentinelTransport, ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED})
    stock.maybe_switch_next()
    # kombu 5.7.0 takes the part's scheme for the transport, and its password (none).
    # Once this fails, tasks.transport.BrokerConnection can go.
    with pytest.raises(KeyError, match="No such transport: sentinels"):
        _ = stock.transport
    assert stock.password is None
    with client_app(_config(tmp_path, URL)).connection_for_write() as conn:
        conn.maybe_switch_next()
        assert isinstance(conn.transport, SentinelTransport)
        assert (conn.password, conn.ssl["ssl_certfile"]) == ("pw", "/etc/client.pem")


@pytest.fixture(scope="module")
def sentinel_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelLab]:
    """A master, two replicas and three Sentinels, all over TLS."""
    binary = redis_server_binary()
    if not _supports_tls(binary):
        pytest.skip(f"{binary} is not built with TLS support")
    group = SentinelLab(tmp_path_factory.mktemp("tls-sentinels"), tls=True)
    try:
        group.start()
        yield group
    finally:
        group.stop()


def test_a_run_through_tls_sentinels_ends_done(ha_fleet: Fleet, sentinel_lab: SentinelLab) -> None:
    ha_fleet.add_agent("planner", "phase=awaiting_ci phase=done")
    cfg = ha_fleet.write_config()
    ha_fleet.start_worker()
    result = ha_fleet.run("planner", timeout=120)
    assert result["outcome"] == "done", result
    assert [p["phase"] for p in result["phases"]] == ["PHASE:awaiting_ci", "PHASE:done"]
    assert held_claims(sentinel_lab.master()) == []
    # redbeat (beat's schedule and lock), and the broker connection as
    # kombu has it after a connection error (Flower's too: the app's).
    app = client_app(cfg)
    assert get_redis(app).ping()
    with app.connection_for_write() as conn:
        conn.maybe_switch_next()
        channel = conn.default_channel
        assert channel.client.ping()
        # Every Sentinel of the URL, which kombu's own channel passes over
        # for sentinels:// parts (it asks only the first part's host).
        group = channel._sentinel_manager or channel._async_sentinel_manager
        assert len(group.sentinels) == len(sentinel_lab.sentinel_ports)
    logs = [path for path in (ha_fleet.root / "logs-host-a").iterdir() if path.is_file()]
    assert logs and all(sentinel_lab.password not in path.read_text() for path in logs)


def test_doctor_names_the_master_over_tls_and_a_missing_ca(
    tmp_path: Path, sentinel_lab: SentinelLab
) -> None:
    found = doctor(tmp_path, sentinel_lab.url, MASTER_NAME)
    port = sentinel_lab.master_port()
    line = f"master '{MASTER_NAME}' at 127.0.0.1:{port}: 3 of 3 Sentinels answered"
    assert line in found.stdout and "3 agree; 2 replicas" in found.stdout, found.stdout
    assert "Redis 7." in found.stdout, found.stdout
    assert sentinel_lab.password not in found.stdout + found.stderr
    # As for a rediss:// URL, a CA file that is not there is found when connecting.
    missing = doctor(tmp_path, sentinel_lab.url.replace("ca.pem", "gone.pem"), MASTER_NAME)
    assert missing.returncode == 4, missing.stdout + missing.stderr
    assert "No such file or directory" in missing.stdout, missing.stdout
    assert sentinel_lab.password not in missing.stdout + missing.stderr
