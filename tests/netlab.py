"""Several hosts on one machine: Linux network namespaces on a bridge, one Redis.

Each host is a network namespace joined to a private bridge by a veth pair,
with its own address, worker, tmux socket and state dir; Redis listens on
the bridge. Cutting a host's link is ``ip link set <veth> down``: its worker
and its agents go on, but nothing it sends reaches Redis, as when a machine
drops off the network. Needs root and ``ip``; :func:`unavailable` says why
not, so that tests can skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

from tasks.stack import Stack
from tests.sentinels import SentinelLab
from workers.config import Config, load_config
from workers.embedded import EmbeddedRedis, start_redis, stop_redis
from workers.tmux import TmuxServer

AGENT = f"{sys.executable} -m workers.scripted_agent --dangerously-skip-permissions"


def host_config(
    redis_url: str,
    agents: list[str],
    lease_seconds: float,
    host_timeout: float,
    agent_settings: str | None = None,
    monitor: str = "",
    broker: str = "",
) -> str:
    """A lab host's config: project ``proj`` in ./project, ``agents`` with formulas there.

    ``agent_settings``: TOML lines for every agent (default: the scripted
    agent); ``monitor``: more ``[monitor]`` lines; ``broker``: more ``[broker]``
    lines (a Sentinel URL's ``master_name``). ``{state}``, ``{tmux}`` and
    ``{host}`` are left for :meth:`NetLab.add_host`.
    """
    # The text is a format string for add_host: the settings' own braces are text.
    settings = (
        (agent_settings or f'command = "{AGENT}"\ndriver = "scripted"\n')
        .replace("{", "{{")
        .replace("}", "}}")
    )
    monitor = monitor.replace("{", "{{").replace("}", "}}")
    blocks = "".join(
        f'[[agents]]\nname = "{name}"\nproject = "proj"\n'
        f'formula = "project/formulas/{name}.toml"\nschedule = "0 0 1 1 *"\n'
        f"{settings}min_memory_mb = 0\n\n"
        for name in agents
    )
    return (
        'state_dir = "{state}"\n'
        f'[broker]\nurl = "{redis_url}"\n{broker}'
        '[worker]\nhost = "{host}"\nconcurrency = 8\n'
        '[tmux]\nsocket = "{tmux}"\n'
        "[monitor]\npoll_interval = 0.1\nready_quiet = 0.2\n"
        f"lease_seconds = {lease_seconds}\nhost_timeout = {host_timeout}\n{monitor}"
        "[metrics]\nport = 0\n"
        f"[credentials.default]\nmax_sessions = {max(8, len(agents))}\n"
        '[[projects]]\nname = "proj"\nrepo_root = "project"\nops_repo_root = "ops"\n'
        'forge_url = "http://127.0.0.1:9"\n\n' + blocks
    )


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"fbprobe-{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class LabHost:
    """One simulated host: a namespace, its link, its config and its worker."""

    name: str
    netns: str
    veth: str  # the root side of the host's link
    address: str
    config_path: Path
    stack: Stack | None = None

    @property
    def tmux_socket(self) -> str:
        return f"fblab-{self.netns}"

    isolated: bool = True

    def wrap(self) -> list[str]:
        """The prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.netns] if self.isolated else []

    def config(self) -> Config:
        return load_config(self.config_path)


@dataclass
class NetLab:
    """A bridge, a Redis on it, and hosts joined to it.

    With ``isolated`` off (no namespaces here), hosts are plain processes on
    this machine: each still has its own worker, tmux socket and state dir,
    but there is no link to cut.
    """

    root: Path
    isolated: bool = True
    token: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, LabHost] = field(default_factory=dict)
    redis: EmbeddedRedis | None = None
    # A Sentinel group (a master, two replicas, three Sentinels) instead of one Redis.
    sentinel: bool = False
    group: SentinelLab | None = None

    def __post_init__(self) -> None:
        # 10.<a>.<b>.0/24 from the token: two labs at once do not collide.
        a, b = int(self.token[:2], 16), int(self.token[2:], 16)
        self.prefix = f"10.{200 + a % 50}.{b}"
        self.bridge = f"fbbr{self.token}"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    def start(self) -> None:
        """Make the bridge and start Redis (or the Sentinel group) on it."""
        if self.isolated:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        address = self.gateway if self.isolated else "127.0.0.1"
        if self.sentinel:
            self.group = SentinelLab(self.root / "sentinels", address=address)
            self.group.start()
        elif self.isolated:
            self.redis = start_redis(self.root / "redis", bind=(address, "127.0.0.1"))
        else:
            self.redis = start_redis(self.root / "redis")

    def client(self) -> Redis:
        """A client of the Redis (the group's master now), from this machine."""
        if self.group is not None:
            return self.group.master()
        assert self.redis is not None
        return self.redis.client()

    def add_host(self, name: str, config_text: str) -> LabHost:
        """Make a namespace for host ``name`` and write its config (``{state}``, ``{tmux}``)."""
        index = len(self.hosts) + 2
        host = LabHost(
            name=name,
            netns=f"fb{self.token}{name}",
            veth=f"fbv{self.token}{index}",
            address=f"{self.prefix}.{index}",
            config_path=self.root / f"{name}.toml",
            isolated=self.isolated,
        )
        if self.isolated:
            self._join(host)
        host.config_path.write_text(
            config_text.format(state=f"state-{name}", tmux=host.tmux_socket, host=name)
        )
        self.hosts[name] = host
        return host

    def _join(self, host: LabHost) -> None:
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        for args in (
            ("addr", "add", f"{host.address}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("-n", host.netns, *args)

    @property
    def host_url(self) -> str:
        """The Redis URL as the hosts see it (over the bridge)."""
        if self.group is not None:
            return self.group.url
        assert self.redis is not None
        return self.redis.url

    def start_worker(self, host: LabHost) -> Stack:
        """Start ``host``'s worker inside its namespace."""
        stack = Stack(
            host.config(),
            flower=False,
            beat=False,
            log_dir=self.root / f"logs-{host.name}",
            wrap=host.wrap(),
        )
        stack.start()
        host.stack = stack
        return stack

    def kill_worker(self, host: LabHost) -> None:
        """kill -9 the host's worker (its tmux server and agents live on)."""
        assert host.stack is not None
        for _, proc in host.stack.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        host.stack.procs.clear()
        host.stack.stop()
        host.stack = None

    def kill_host(self, host: LabHost) -> None:
        """The whole host goes: worker and tmux server (with its agents) killed."""
        self.kill_worker(host)
        TmuxServer(host.tmux_socket).shut_down()

    def restart_redis(self, down_seconds: float) -> None:
        """Stop Redis, wait, and start it again on the same port with the same data."""
        assert self.redis is not None
        old = self.redis
        password = old.url.split(":")[2].split("@")[0]
        stop_redis(old)
        time.sleep(down_seconds)
        bind = (self.gateway, "127.0.0.1") if self.isolated else ("127.0.0.1",)
        self.redis = start_redis(old.data_dir, port=old.port, password=password, bind=bind)

    def cut(self, host: LabHost) -> None:
        """Take the host's link down: nothing it sends reaches Redis."""
        _ip("link", "set", host.veth, "down")

    def restore(self, host: LabHost) -> None:
        """Bring the host's link back up."""
        _ip("link", "set", host.veth, "up")
        _ip("link", "set", host.veth, "master", self.bridge)

    def close(self) -> None:
        """Stop every worker and tmux server, Redis, and remove the namespaces and bridge."""
        for host in self.hosts.values():
            if host.stack is not None:
                host.stack.stop(grace=5)
            TmuxServer(host.tmux_socket).shut_down()
            if self.isolated:
                _ip("netns", "del", host.netns, check=False)
        if self.redis is not None:
            stop_redis(self.redis)
        if self.group is not None:
            self.group.stop()
        if self.isolated:
            _ip("link", "del", self.bridge, check=False)
