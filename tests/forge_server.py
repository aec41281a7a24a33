"""A forge on loopback for tests: the API's /user and git's smart HTTP, both behind a token.

Real servers, not mocks: ``git http-backend`` serves bare repositories as a
CGI behind a ThreadingHTTPServer that demands ``Authorization: Basic
base64(login:token)``; ``GET /api/v1/user`` demands ``Authorization: token``.
Every request's path and headers are recorded so tests can check where the
token travelled.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import git


class ForgeServer:
    """A forge stand-in serving ``<root>/<owner>/<name>.git``."""

    def __init__(self, root: Path, login: str, token: str) -> None:
        self.root = root
        self.login = login
        self.token = token
        self.requests: list[dict[str, Any]] = []
        forge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                forge.handle(self)

            def do_POST(self) -> None:
                forge.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ForgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_repo(self, owner_name: str, files: dict[str, str]) -> Path:
        """A bare repository with ``files`` committed on main, pushable over HTTP."""
        bare = self.root / f"{owner_name}.git"
        work = self.root / "_work" / owner_name
        repo = git.Repo.init(work, initial_branch="main")
        with repo.config_writer() as writer:
            writer.set_value("user", "name", "forge")
            writer.set_value("user", "email", "forge@forge.invalid")
        for name, text in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        repo.index.add(list(files))
        repo.index.commit("initial")
        repo.clone(bare, bare=True)
        with git.Repo(bare).config_writer() as writer:
            writer.set_value("http", "receivepack", "true")
        return bare

    def commit(self, owner_name: str, files: dict[str, str], message: str) -> None:
        """Push a new commit to a served repository (as someone else would)."""
        work = self.root / "_work" / owner_name
        repo = git.Repo(work)
        for name, text in files.items():
            (work / name).write_text(text)
        repo.index.add(list(files))
        repo.index.commit(message)
        repo.git.push(str(self.root / f"{owner_name}.git"), "main")

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append({"path": request.path, "headers": headers})
        parts = urlsplit(request.path)
        if parts.path == "/api/v1/user":
            if headers.get("authorization") != f"token {self.token}":
                self._reply(request, 401, b'{"message": "unauthorized"}')
            else:
                self._reply(request, 200, json.dumps({"login": self.login}).encode())
            return
        expected = "Basic " + base64.b64encode(f"{self.login}:{self.token}".encode()).decode()
        if headers.get("authorization") != expected:
            request.send_response(401)
            request.send_header("WWW-Authenticate", 'Basic realm="forge"')
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        length = int(headers.get("content-length") or 0)
        body = request.rfile.read(length) if length else b""
        env = {
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": request.command,
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": self.login,
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": headers.get("git-protocol", ""),
            "HTTP_CONTENT_ENCODING": headers.get("content-encoding", ""),
            "PATH": "/usr/bin:/bin",
        }
        proc = subprocess.run(
            ["git", "http-backend"],
            input=body,
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        status, cgi_headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                cgi_headers.append((name, value.strip()))
        request.send_response(status)
        for name, value in cgi_headers:
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
