"""``make compose-check``: build the image, run deploy/compose.yaml for real, remove it.

Steps, each timed:

1. engine: a Docker engine that answers; on a root Debian machine without
   one, ``apt-get install docker.io``; a dockerd not running is started here
   and stopped at the end.
2. compose: ``docker compose`` (the plugin) or ``docker-compose``; Debian's
   ``docker-compose`` is installed when there is neither.
3. base image ``formulabeat-base:bookworm``: kept when it exists, else made
   with debootstrap (minbase) and ``docker import``: no registry is needed.
4. ``docker build`` of deploy/Dockerfile (BuildKit; this machine's CA bundle
   and pip index, if any, as build secrets: no layer keeps them).
5. a project in a private temp dir: a git repository with one formula for
   the scripted agent, the config, and the ``.env`` with a fresh Redis
   password and Flower login (mode 0600).
6. ``compose up -d``, until both workers answer a Celery ping and Flower its
   published port.
7. one run, sent from worker-1's container with ``formulabeat run --wait``,
   must end ``done``.
8. Flower through the published port: 401 without the login, 200 with it,
   and the run's task known to its API.
9. ``compose down -v``, then no container, network or volume of the stack
   is left. The images stay, as the cache of the next check.

It fails (exit 1) on the first step that does not do what it should, after
printing the stack's logs; the stack is removed whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
HA_FILE = ROOT / "deploy" / "compose.ha.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BASE_IMAGE = "formulabeat-base:bookworm"
IMAGE = "formulabeat:latest"
LABEL = "org.formulabeat.compose-check=1"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
WORKERS = ("worker-1", "worker-2")
# The scripted agent's part: two phases, so the run is seen moving.
SCENARIO = "sleep=0.5 phase=awaiting_ci sleep=0.5 phase=done"
# With HA=1 the run stays live long enough for the master to be failed over.
HA_SCENARIO = "sleep=0.5 phase=awaiting_ci sleep=25 phase=done"
CA_CANDIDATES = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
SYSTEM_CA = Path("/etc/ssl/certs/ca-certificates.crt")


class CheckFailed(Exception):
    """A step did not do what it should."""


def run(
    argv: Sequence[str],
    timeout: float,
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    quiet: bool = False,
    stdin: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with a timeout; raise CheckFailed on a non-zero status when ``check``."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{' '.join(argv[:4])} … did not end within {timeout:g} s") from None
    except FileNotFoundError:
        raise CheckFailed(f"{argv[0]}: not found") from None
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise CheckFailed(f"{' '.join(argv[:4])} … exited {proc.returncode}:\n{tail}")
    if not quiet and proc.returncode == 0 and os.environ.get("COMPOSE_CHECK_VERBOSE"):
        print(proc.stdout + proc.stderr, end="")
    return proc


class Timings:
    """Elapsed seconds per step, printed as each step ends and at the end."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float, str]] = []
        self.started = time.monotonic()

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        note: list[str] = []
        print(f"--- {name}", flush=True)
        began = time.monotonic()
        try:
            yield note
        finally:
            elapsed = time.monotonic() - began
            self.steps.append((name, elapsed, " ".join(note)))
            print(f"    {elapsed:6.1f} s  {' '.join(note)}", flush=True)

    def table(self) -> str:
        lines = [f"{'step':<14} {'seconds':>8}  note"]
        lines += [f"{name:<14} {secs:8.1f}  {note}" for name, secs, note in self.steps]
        lines.append(f"{'total':<14} {time.monotonic() - self.started:8.1f}")
        return "\n".join(lines)


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(*packages: str) -> None:
    """Install Debian packages (root only): the machine's own package manager."""
    if not (is_root() and shutil.which("apt-get")):
        raise CheckFailed(f"need {' '.join(packages)}: install them (apt-get install)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], 300, env=env)
    run(["apt-get", "install", "-y", "-qq", *packages], 900, env=env)


class Engine:
    """The Docker engine: found, or installed and started here (and then stopped here)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.docker = "docker"
        self.build_env: dict[str, str] = dict(os.environ)

    def answers(self) -> bool:
        if not shutil.which(self.docker):
            return False
        return run([self.docker, "info"], 30, check=False, quiet=True).returncode == 0

    def ensure(self, note: list[str]) -> None:
        if self.answers():
            note.append("engine already running;")
        else:
            if not (shutil.which("dockerd") and shutil.which("docker")):
                note.append("installed docker.io;")
                apt_install("docker.io")
            self._start(note)
        self._pick_builder(note)
        info = run([self.docker, "info", "--format", "{{.ServerVersion}} {{.Driver}}"], 30)
        note.append(f"server {info.stdout.strip()}")

    def _start(self, note: list[str]) -> None:
        dockerd = shutil.which("dockerd")
        if not dockerd or not is_root():
            raise CheckFailed("no Docker engine answers, and this user cannot start dockerd")
        log = (self.workdir / "dockerd.log").open("wb")
        self.dockerd = subprocess.Popen(
            [dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.dockerd.poll() is not None:
                raise CheckFailed(f"dockerd exited {self.dockerd.returncode}: {self.log_tail()}")
            if self.answers():
                note.append(f"started dockerd (pid {self.dockerd.pid});")
                return
            time.sleep(0.5)
        raise CheckFailed(f"dockerd did not answer within 60 s: {self.log_tail()}")

    def _pick_builder(self, note: list[str]) -> None:
        """A client whose ``docker build`` is BuildKit (for the secret mounts)."""
        candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c]
        for client in dict.fromkeys(candidates):
            if not Path(client).exists():
                continue
            if run([client, "buildx", "version"], 30, check=False, quiet=True).returncode == 0:
                self.docker = client
                note.append(f"builder: {client} buildx;")
                return
            version = run(
                [client, "version", "--format", "{{.Client.Version}}"], 30, check=False, quiet=True
            ).stdout.strip()
            major = version.split(".", 1)[0]
            if major.isdigit() and int(major) < 23:
                # Before 23, the client drives the engine's own BuildKit.
                self.docker = client
                self.build_env = {**os.environ, "DOCKER_BUILDKIT": "1"}
                note.append(f"builder: {client} {version} with DOCKER_BUILDKIT=1;")
                return
        raise CheckFailed("no docker client can use BuildKit: install docker-buildx")

    def log_tail(self) -> str:
        path = self.workdir / "dockerd.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> str | None:
        """Stop the dockerd started here; what was done, or None."""
        if self.dockerd is None:
            return None
        os.killpg(self.dockerd.pid, signal.SIGTERM)
        try:
            self.dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.dockerd.pid, signal.SIGKILL)
            self.dockerd.wait(timeout=30)
        return f"stopped the dockerd this check started (pid {self.dockerd.pid})"


def compose_command(engine: Engine, note: list[str]) -> list[str]:
    """``docker compose`` (the plugin), else ``docker-compose``, installed if need be."""
    for docker in dict.fromkeys(c for c in (shutil.which("docker"), engine.docker) if c):
        if run([docker, "compose", "version"], 30, check=False, quiet=True).returncode == 0:
            note.append(f"{docker} compose")
            return [docker, "compose"]
    if not shutil.which("docker-compose"):
        note.append("installed docker-compose;")
        apt_install("docker-compose")
    version = run(["docker-compose", "version", "--short"], 30).stdout.strip()
    note.append(f"docker-compose {version}")
    return ["docker-compose"]


def ensure_base(engine: Engine, workdir: Path, note: list[str]) -> None:
    """A Debian bookworm image with no registry: debootstrap into a dir, import it."""
    if run([engine.docker, "image", "inspect", BASE_IMAGE], 30, check=False).returncode == 0:
        note.append(f"{BASE_IMAGE} cached")
        return
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    rootfs = workdir / "rootfs"
    began = time.monotonic()
    run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR], 1200)
    debootstrapped = time.monotonic() - began
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    try:
        run([engine.docker, "import", "-", BASE_IMAGE], 600, stdin=tar.stdout.fileno())
    finally:
        tar.stdout.close()
        tar.wait(timeout=60)
    shutil.rmtree(rootfs, ignore_errors=True)
    imported = time.monotonic() - began - debootstrapped
    note.append(f"debootstrap {debootstrapped:.0f} s, import {imported:.0f} s")


def ca_bundle() -> Path | None:
    """The CA bundle this machine's pip uses (it may trust a local proxy's CA)."""
    for name in CA_CANDIDATES:
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return SYSTEM_CA if SYSTEM_CA.is_file() else None


def build(engine: Engine, workdir: Path, version: str, uid: int, note: list[str]) -> None:
    secret_args: list[str] = []
    bundle = ca_bundle()
    if bundle:
        secret_args += ["--secret", f"id=ca,src={bundle}"]
        note.append(f"CA {bundle};")
    index = os.environ.get("PIP_INDEX_URL")
    if index:
        # It may carry a token: a file for the build's secret mount, never a build arg.
        path = workdir / "pip-index-url"
        path.write_text(index)
        path.chmod(0o600)
        secret_args += ["--secret", f"id=pip_index_url,src={path}"]
        note.append("PIP_INDEX_URL;")
    run(
        [
            engine.docker,
            "build",
            "-f",
            str(DOCKERFILE),
            "-t",
            IMAGE,
            "--build-arg",
            f"BASE={BASE_IMAGE}",
            "--build-arg",
            f"CLAUDE_CODE_VERSION={version}",
            "--build-arg",
            f"UID={uid}",
            "--label",
            LABEL,
            *secret_args,
            str(ROOT),
        ],
        1800,
        env=engine.build_env,
    )
    # The image a rebuild replaced, nothing else's.
    run([engine.docker, "image", "prune", "-f", "--filter", f"label={LABEL}"], 120)
    size = run([engine.docker, "image", "inspect", "--format", "{{.Size}}", IMAGE], 30)
    note.append(f"{IMAGE} {int(size.stdout.strip()) / 1e6:.0f} MB")


FORMULA = '''name = "check"
description = "compose-check: one run of the scripted agent"

[[steps]]
id = "act"
title = "Report two phases"
description = """The scripted agent follows this line:
SCENARIO: {scenario}
"""
'''

CONFIG = """# compose-check's config: every container mounts it; the broker URL (with
# the password) and each worker's state dir come from the environment.
state_dir = "/var/lib/formulabeat"

[worker]
concurrency = 4

[flower]
address = "0.0.0.0"
port = 5555

[credentials.default]
max_sessions = 2

[[projects]]
name = "check"
repo_root = "/srv/repos/check"
forge_url = "http://127.0.0.1:3000"
primary_branch = "main"

[[agents]]
name = "scripted"
project = "check"
formula = "/srv/repos/check/formulas/check.toml"
schedule = "0 0 1 1 *"
command = "/opt/formulabeat/.venv/bin/formulabeat-scripted-agent --dangerously-skip-permissions"
driver = "scripted"
min_memory_mb = 256
idle_timeout = 60
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def make_project(workdir: Path, uid: int, port: int, scenario: str) -> tuple[Path, str]:
    """The repository, the config and the .env; returns the .env path and the Flower login."""
    repo = workdir / "repos" / "check"
    (repo / "formulas").mkdir(parents=True)
    (repo / "README.md").write_text("# check\nA throwaway project for compose-check.\n")
    (repo / "formulas" / "check.toml").write_text(FORMULA.format(scenario=scenario))
    git = ["git", "-C", str(repo)]
    run([*git, "init", "-q", "-b", "main"], 30)
    run([*git, "add", "."], 30)
    ident = ["-c", "user.name=compose-check", "-c", "user.email=check@formulabeat.invalid"]
    run(["git", *ident, "-C", str(repo), "commit", "-q", "-m", "check"], 30)
    if is_root():
        # The containers' user owns the checkout (git refuses a repository of another user).
        run(["chown", "-R", f"{uid}:{uid}", str(workdir / "repos")], 60)
    config = workdir / "formulabeat.toml"
    config.write_text(CONFIG)
    config.chmod(0o644)
    login = f"check:{secrets.token_urlsafe(18)}"
    env_file = workdir / "compose.env"
    write_private(
        env_file,
        f"REDIS_PASSWORD={secrets.token_urlsafe(24)}\n"
        f"FLOWER_BASIC_AUTH={login}\n"
        f"FORMULABEAT_IMAGE={IMAGE}\n"
        f"FORMULABEAT_TOML={config}\n"
        f"FORMULABEAT_REPOS={workdir / 'repos'}\n"
        f"FLOWER_PUBLISH=127.0.0.1:{port}\n",
    )
    return env_file, login


class Stack:
    """deploy/compose.yaml under a project name of its own."""

    def __init__(
        self, compose: list[str], engine: Engine, env_file: Path, files: Sequence[Path]
    ) -> None:
        self.name = f"formulabeat-check-{secrets.token_hex(4)}"
        self.engine = engine
        chosen = [arg for path in files for arg in ("-f", str(path))]
        self.base = [*compose, "-p", self.name, *chosen, "--env-file", str(env_file)]
        # Only the env file sets the stack's variables.
        names = ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "FORMULABEAT_", "FLOWER_PUBLISH")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(names)}
        self.env["COMPOSE_INTERACTIVE_NO_CLI"] = "1"
        self.up_called = False

    def compose(
        self, *args: str, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.base, *args], timeout, env=self.env, check=check)

    def up(self) -> None:
        self.up_called = True
        self.compose("up", "-d", timeout=300)

    def exec(self, service: str, *argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *argv, timeout=timeout, check=False)

    def start_exec(self, service: str, *argv: str) -> subprocess.Popen[str]:
        """``exec`` left running; the caller waits for it."""
        return subprocess.Popen(
            [*self.base, "exec", "-T", service, *argv],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for_workers(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self.exec(
                WORKERS[0],
                "celery",
                "-A",
                "tasks.app",
                "inspect",
                "ping",
                "--timeout",
                "2",
                timeout=60,
            )
            last = proc.stdout + proc.stderr
            if all(f"formulabeat@{w}" in last for w in WORKERS):
                return ", ".join(f"formulabeat@{w}" for w in WORKERS)
            down = [s for s in self.statuses() if not s.split(" ", 1)[1].startswith("Up")]
            if down:
                raise CheckFailed(f"not running: {'; '.join(down)}")
            time.sleep(1)
        raise CheckFailed(f"the workers did not both answer a ping within {timeout:g} s:\n{last}")

    def statuses(self) -> list[str]:
        """``<container> <status>`` of each container of the stack."""
        label = f"label=com.docker.compose.project={self.name}"
        argv = [self.engine.docker, "ps", "-a", "--filter", label]
        out = run([*argv, "--format", "{{.Names}} {{.Status}}"], 60).stdout
        return out.splitlines()

    def logs(self) -> str:
        proc = self.compose("logs", "--no-color", "--tail", "40", timeout=120, check=False)
        return proc.stdout + proc.stderr

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        found = []
        for kind in ("container", "network", "volume"):
            argv = [self.engine.docker, kind, "ls", "-q", "--filter", label]
            if kind == "container":
                argv.insert(3, "-a")
            out = run(argv, 60).stdout.split()
            found += [f"{kind} {item}" for item in out]
        return found

    def down(self) -> list[str]:
        self.compose("down", "-v", "--remove-orphans", "-t", "20", timeout=300)
        self.up_called = False
        return self.leftovers()


def http_status(url: str, login: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def wait_for_flower(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    problem = ""
    while time.monotonic() < deadline:
        try:
            status, _ = http_status(url, None)
            if status == 401:
                return
            problem = f"status {status}"
        except (OSError, urllib.error.URLError) as exc:
            problem = str(exc)
        time.sleep(0.5)
    raise CheckFailed(f"Flower did not answer at {url} within {timeout:g} s ({problem})")


RUN_ARGV = ("formulabeat", "run", "check", "scripted", "--wait", "--json", "--timeout")


def check_run(stack: Stack, note: list[str]) -> str:
    proc = stack.exec(WORKERS[0], *RUN_ARGV, "120", timeout=180)
    return _run_result(proc.returncode, proc.stdout, proc.stderr, note)


def check_failover(stack: Stack, note: list[str]) -> str:
    """A run live while the Sentinels fail the master over must still end done."""
    # Longer than check_run's: the agent stays 25 s after its first phase.
    waiting = stack.start_exec(WORKERS[0], *RUN_ARGV, "180")
    try:
        deadline = time.monotonic() + 120
        while not _live(stack):
            if time.monotonic() > deadline or waiting.poll() is not None:
                raise CheckFailed("the run was not seen live (AWAITING_CI) within 120 s")
            time.sleep(1)
        before = _master(stack)
        failover = _sentinel_cli(stack, "failover")
        if "OK" not in failover.stdout:
            raise CheckFailed(f"SENTINEL FAILOVER: {failover.stdout}{failover.stderr}")
        deadline = time.monotonic() + 60
        while _master(stack) in (before, ""):
            if time.monotonic() > deadline:
                raise CheckFailed(f"the Sentinels still name {before} after 60 s")
            time.sleep(0.5)
        note.append(f"master {before} failed over to {_master(stack)} while the run was live;")
        out, err = waiting.communicate(timeout=240)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(30)
    return _run_result(waiting.returncode, out, err, note)


def _live(stack: Stack) -> bool:
    proc = stack.exec(WORKERS[0], "formulabeat", "status", "--json", timeout=60)
    try:
        runs = json.loads(proc.stdout or "[]")
    except ValueError:
        return False
    return any(snapshot.get("state") == "AWAITING_CI" for snapshot in runs)


def _master(stack: Stack) -> str:
    return ":".join(_sentinel_cli(stack, "get-master-addr-by-name").stdout.split())


def _sentinel_cli(stack: Stack, command: str) -> subprocess.CompletedProcess[str]:
    """``SENTINEL <command> formulabeat`` asked of the first Sentinel."""
    argv = ("redis-cli", "-p", "26379", "sentinel", command, "formulabeat")
    return stack.exec("sentinel-1", *argv, timeout=60)


def _run_result(code: int, stdout: str, stderr: str, note: list[str]) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise CheckFailed(f"formulabeat run printed no result (exit {code}):\n{stdout}{stderr}")
    result = json.loads(lines[-1])
    phases = " → ".join(p["phase"] for p in result.get("phases", []))
    note.append(f"outcome {result.get('outcome')} on {result.get('host')} ({phases})")
    if code != 0 or result.get("outcome") != "done":
        raise CheckFailed(f"the run ended {result.get('outcome')}: {result.get('reason')}")
    return str(result["run_id"])


def check_flower(port: int, login: str, run_id: str, note: list[str]) -> None:
    url = f"http://127.0.0.1:{port}/"
    wait_for_flower(url, 60)
    anonymous, _ = http_status(url, None)
    authorised, _ = http_status(url, login)
    note.append(f"{url}: {anonymous} without the login, {authorised} with it;")
    if (anonymous, authorised) != (401, 200):
        raise CheckFailed(f"Flower answered {anonymous} and {authorised}, not 401 and 200")
    deadline = time.monotonic() + 30
    state = None
    while time.monotonic() < deadline:
        status, body = http_status(f"{url}api/task/info/{run_id}", login)
        if status == 200:
            state = json.loads(body).get("state")
            if state == "SUCCESS":
                break
        time.sleep(1)
    note.append(f"the run's task: {state}")
    if state != "SUCCESS":
        raise CheckFailed(f"Flower does not know run {run_id} as SUCCESS (state {state})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--claude-code-version", required=True, help="the npm version to install")
    parser.add_argument(
        "--cold", action="store_true", help="remove the cached images and build cache first"
    )
    parser.add_argument(
        "--ha",
        action="store_true",
        help="with compose.ha.yaml (Sentinels): fail the master over while a run is live",
    )
    args = parser.parse_args(argv)
    timings = Timings()
    workdir = Path(tempfile.mkdtemp(prefix="formulabeat-compose-check-"))
    engine = Engine(workdir)
    stack: Stack | None = None
    failed: str | None = None
    uid = 1000 if is_root() else os.getuid()
    try:
        with timings.step("engine") as note:
            engine.ensure(note)
        with timings.step("compose") as note:
            compose = compose_command(engine, note)
        if args.cold:
            with timings.step("cold start") as note:
                for image in (IMAGE, BASE_IMAGE):
                    run([engine.docker, "image", "rm", "-f", image], 120, check=False)
                run([engine.docker, "builder", "prune", "-af"], 300, check=False)
                note.append(f"removed {IMAGE}, {BASE_IMAGE} and the build cache")
        with timings.step("base image") as note:
            ensure_base(engine, workdir, note)
        with timings.step("build") as note:
            build(engine, workdir, args.claude_code_version, uid, note)
        with timings.step("project") as note:
            port = free_port()
            env_file, login = make_project(workdir, uid, port, HA_SCENARIO if args.ha else SCENARIO)
            note.append(f"repository and config in {workdir} (uid {uid})")
        files = [COMPOSE_FILE, HA_FILE] if args.ha else [COMPOSE_FILE]
        stack = Stack(compose, engine, env_file, files)
        with timings.step("up") as note:
            stack.up()
            note.append(f"project {stack.name}; answering: {stack.wait_for_workers(120)}")
        with timings.step("run, failed over" if args.ha else "run") as note:
            run_id = check_failover(stack, note) if args.ha else check_run(stack, note)
        with timings.step("flower") as note:
            check_flower(port, login, run_id, note)
        with timings.step("down") as note:
            left = stack.down()
            if left:
                raise CheckFailed(f"left after down -v: {', '.join(left)}")
            note.append("no container, network or volume left; images kept as the cache")
    except CheckFailed as exc:
        failed = str(exc)
        if stack is not None and stack.up_called:
            print(f"--- the stack's logs\n{stack.logs()}", file=sys.stderr)
    finally:
        if stack is not None and stack.up_called:
            try:
                left = stack.down()
                print(f"cleanup: compose down -v; left: {', '.join(left) or 'nothing'}")
            except CheckFailed as exc:
                print(f"cleanup: compose down -v failed: {exc}", file=sys.stderr)
        stopped = engine.stop()
        if stopped:
            print(stopped)
        shutil.rmtree(workdir, ignore_errors=True)
    print(timings.table())
    if failed:
        print(f"compose-check: FAILED: {failed}", file=sys.stderr)
        return 1
    print("compose-check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
