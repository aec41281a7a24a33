"""What the API stand-ins share: the scenario a prompt carries, and the HTTP server.

Every stand-in (Anthropic's Messages API in tests/messages_api.py, OpenAI's
Responses API in tests/responses_api.py, the Gemini API in
tests/gemini_api.py) plays the model from the line ``SCENARIO: <tokens>`` in
the conversation's user text, one token per response, so one test can run
over every CLI. What a token asks for (see tests/messages_api.py for the
list) becomes a shell command here; each stand-in wraps it in its own wire
format (a ``tool_use`` block, a ``function_call`` item, a ``functionCall``
part). The number of responses the stand-in already gave, which each counts
in the conversation its CLI sends back, says which token is next: no state
per session, so a resumed conversation goes on where it stood.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SCENARIO_RE = re.compile(r"^\s*SCENARIO:\s*(.+?)\s*$", re.MULTILINE)
# The phase protocol's line, else (a one-shot prompt) the environment block's.
PHASE_FILE_RE = re.compile(r"echo 'PHASE:done' > '([^']+)'|^PHASE_FILE=(\S+)$", re.MULTILINE)
# What a response that runs no command says (how a stand-in knows its own answers).
END_TEXT = "Done."
IDLE_TEXT = "I stop here."


def tokens(conversation: str) -> list[str]:
    """The scenario's tokens (default ``phase=done``)."""
    found = SCENARIO_RE.search(conversation)
    return found.group(1).split() if found else ["phase=done"]


# Tokens that say how the request for the token after them fails:
# ``outage=STATUS:N`` (the first N requests for it get STATUS, then it is
# served), ``ratelimit=N`` (N times 429). ``apifail=STATUS`` is a token of its
# own that fails every time.
FAULTS = ("outage", "ratelimit")


def plan(conversation: str) -> tuple[list[str], dict[int, str]]:
    """The responses' tokens, and the fault token before each one that has one."""
    actions: list[str] = []
    faults: dict[int, str] = {}
    for token in tokens(conversation):
        if token.startswith("stamp="):
            continue
        if token.partition("=")[0] in FAULTS:
            faults[len(actions)] = token
        else:
            actions.append(token)
    return actions, faults


def action(conversation: str, cursor: int) -> str:
    """The token the response at ``cursor`` plays (``end`` past the last)."""
    actions = plan(conversation)[0]
    return actions[cursor] if cursor < len(actions) else "end"


def phase_file_of(conversation: str) -> str | None:
    """The phase file the prompt names."""
    found = PHASE_FILE_RE.search(conversation)
    return (found.group(1) or found.group(2)) if found else None


def stamp_of(conversation: str) -> str | None:
    """The ``stamp=PATH`` of the scenario, if any."""
    return next((t.partition("=")[2] for t in tokens(conversation) if t.startswith("stamp=")), None)


def usage_for(cursor: int) -> dict[str, int]:
    """What the response at ``cursor`` costs, by formulabeat's kinds: different for
    each, so that a sum over a run tells which responses it counted."""
    return {
        "input": 1000 + cursor,
        "output": 50 + 7 * cursor,
        "cache_read": 300 + 11 * cursor,
        "cache_creation": 20 + 13 * cursor,
    }


def sh_quote(text: str) -> str:
    """``text`` as one shell word."""
    return "'" + text.replace("'", "'\\''") + "'"


def command_for(name: str, arg: str, phase_file: str | None, stamp: str | None) -> str | None:
    """The shell command a token asks the model to run (None: it answers with text)."""
    target = sh_quote(phase_file or "/dev/null")

    def stamped(phase: str) -> str:
        # The write's time is the phase file's own mtime, read after it.
        if not stamp:
            return ""
        mtime = f'"$(stat -c %.9Y {target})"'
        return f"; printf '%s %s %s\\n' {target} {phase} {mtime} >> {sh_quote(stamp)}"

    if name == "phase":
        phase, _, reason = arg.partition(":")
        why = sh_quote(reason.replace("_", " "))
        written = (
            f"printf 'PHASE:{phase}\\nReason: %s\\n' {why} > {target}"
            if reason
            else f"echo 'PHASE:{phase}' > {target}"
        )
        return written + stamped(phase)
    if name == "phases":
        return "; ".join(f"echo 'PHASE:{p}' > {target}{stamped(p)}" for p in arg.split(","))
    if name == "waitfor":
        return f"while [ ! -e {sh_quote(arg)} ]; do sleep 1; done"
    if name == "bash":
        return arg.replace("_", " ")
    if name == "sleep":
        return f"sleep {float(arg):g}"
    if name in ("crash", "crash_once"):
        # The tool's shell is a child of the CLI's process.
        kill = "kill -KILL $PPID"
        flag = sh_quote(f"{phase_file}.crashed")
        return kill if name == "crash" else f"[ -e {flag} ] || {{ touch {flag}; {kill}; }}"
    return None


@dataclass
class Exchange:
    """One request a CLI made and what the stand-in answered."""

    at: float
    main: bool
    model: str
    phase_file: str | None
    prompt: str | None
    cursor: int
    action: str
    # What the stand-in billed, by formulabeat's kinds (empty for an error).
    usage: dict[str, int]
    message_id: str
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200


class StandIn:
    """A threaded HTTP server on loopback that records every exchange.

    Subclasses implement :meth:`handle` (``POST``) and may answer ``GET``.
    """

    def __init__(self, port: int = 0) -> None:
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._ids = 0
        # An outage of every main request: (until, status).
        self._outage: tuple[float, int] | None = None
        # Failures served so far, by (phase file, cursor).
        self._failed: dict[tuple[str | None, int], int] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                api.handle(self, api.read_body(self))

            def do_GET(self) -> None:
                api.handle_get(self)

            def do_HEAD(self) -> None:
                api.send(self, 200, "application/json", "")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what tests read ---------------------------------------------------
    def main_exchanges(self, phase_file: str | None = None) -> list[Exchange]:
        """The conversation's exchanges (not side requests), of one run if named."""
        with self._lock:
            return [
                e
                for e in self.exchanges
                if e.main and (phase_file is None or e.phase_file == phase_file)
            ]

    def for_run(self, run_id: str) -> list[Exchange]:
        """The main exchanges whose prompt names ``run_id``."""
        with self._lock:
            return [e for e in self.exchanges if e.main and e.prompt and run_id in e.prompt]

    def outage(self, seconds: float, status: int = 503) -> None:
        """Fail every main request with ``status`` for the next ``seconds``."""
        with self._lock:
            self._outage = (time.time() + seconds, status)

    def in_outage(self) -> int | None:
        """The status every main request gets now, if an outage is on."""
        with self._lock:
            if self._outage is not None and time.time() < self._outage[0]:
                return self._outage[1]
        return None

    def fault(self, conversation: str, phase_file: str | None, cursor: int) -> int | None:
        """The HTTP status this main request gets, if the scenario says it fails."""
        outage = self.in_outage()
        if outage is not None:
            return outage
        name, _, arg = action(conversation, cursor).partition("=")
        if name == "apifail":
            return int(arg)
        token = plan(conversation)[1].get(cursor)
        if token is None:
            return None
        name, _, arg = token.partition("=")
        status, count = (
            (arg.partition(":")[0], arg.partition(":")[2])
            if name == "outage"
            else (
                "429",
                arg,
            )
        )
        key = (phase_file, cursor)
        with self._lock:
            failed = self._failed.get(key, 0)
            if failed >= int(count or 1):
                return None
            self._failed[key] = failed + 1
        return int(status)

    # -- serving -----------------------------------------------------------
    def handle(self, request: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        """Answer one POST."""
        raise NotImplementedError

    def handle_get(self, request: BaseHTTPRequestHandler) -> None:
        """Answer one GET (404 unless a stand-in knows the path)."""
        self.send(request, 404, "application/json", "{}")

    def record(self, exchange: Exchange) -> None:
        """Keep an exchange for the tests."""
        with self._lock:
            self.exchanges.append(exchange)

    def next_id(self, prefix: str) -> str:
        """A fresh id for a response."""
        with self._lock:
            self._ids += 1
            return f"{prefix}{self._ids:06d}"

    @staticmethod
    def read_body(request: BaseHTTPRequestHandler) -> dict[str, Any]:
        """The request's JSON body ({} when it has none or it is not JSON)."""
        length = int(request.headers.get("content-length") or 0)
        try:
            body = json.loads(request.rfile.read(length) or b"{}")
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    @staticmethod
    def send(
        request: BaseHTTPRequestHandler,
        status: int,
        kind: str,
        text: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send a whole response."""
        data = text.encode()
        request.send_response(status)
        request.send_header("content-type", kind)
        request.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    @staticmethod
    def sse(events: list[tuple[str | None, dict[str, Any]]]) -> str:
        """Server-sent events: ``event:`` (when named) and ``data:`` lines."""
        return "".join(
            (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"
            for name, data in events
        )


def charged(exchanges: list[Exchange]) -> dict[str, int]:
    """What a stand-in billed for ``exchanges``, by formulabeat's kinds of token."""
    kinds = ("input", "output", "cache_read", "cache_creation")
    return {kind: sum(e.usage.get(kind, 0) for e in exchanges) for kind in kinds}
