"""A stand-in of the Anthropic Messages API on loopback, for the real Claude Code CLI.

It plays the model. The real CLI sends it ``POST /v1/messages`` (streaming
SSE) with the whole conversation; the stand-in answers from the conversation
alone, so it needs no state per session and works across a ``--resume``:

- the scenario is the line ``SCENARIO: <tokens>`` in the conversation's user
  text (the formula step carries it, as for the scripted agent), default
  ``phase=done``;
- the number of assistant messages already in the conversation says which
  token is next; each token is one response, and a response past the last
  token ends the turn with a short text.

Tokens (underscores in arguments become spaces):

- ``phase=NAME`` / ``phase=failed:REASON``: a Bash tool call writing the phase
  file the prompt names (``echo 'PHASE:NAME' > '<file>'``), as a model
  following formulabeat's protocol does;
- ``phases=A,B``: one Bash call writing both, back to back;
- ``bash=COMMAND``: a Bash call running COMMAND (a guard test's denied command);
- ``sleep=S``: a Bash call ``sleep S``;
- ``idle``: end the turn without writing anything (the Stop hook's case);
- ``crash_once``: a Bash call that kills the CLI (SIGKILL to its process) the
  first time only (a flag file beside the phase file remembers it);
- ``crash``: the same, every time;
- ``apifail=STATUS``: answer with that HTTP error (401, 429, 500, 529, …),
  every time;
- ``outage=STATUS:N`` (before a token): the first N requests for the token
  after it fail with that status (a 529 overload, a 500), then it is served:
  an outage the CLI's own retries do not outlast when N is more than they are;
- ``ratelimit=N`` (before a token): the same with 429 and a ``retry-after``;
- ``outage=0:N``: the same, with no answer at all (the connection closed);
- ``usagelimit=SECONDS`` (before a token): 429 with the subscription headers
  saying the five-hour limit resets in SECONDS (Claude Code, logged in with a
  subscription token, then says ``You've hit your session limit · resets
  <time>``), every time until then;
- ``badcredit`` (before a token): 400 "credit balance is too low", every time;
- ``stamp=PATH`` (anywhere in the line): each phase write then appends
  ``<phase file> <phase> <its mtime>`` to PATH (a benchmark's clock);
- ``trace=PATH`` (anywhere in the line): each tool call first appends
  ``<phase file> <step> <the CLI's pid> <time>`` to PATH (which CLI process
  did which step, for the chaos);
- ``waitfor=PATH``: a Bash call that waits until PATH exists.

An API error the CLI shows becomes an assistant message of its own in a
resumed conversation: only the stand-in's own answers count as responses.
:meth:`MessagesAPI.outage` fails every main request for a while (chaos).

Side requests the CLI makes without tools (titles, topics) get a short text.
Every exchange is recorded (:attr:`MessagesAPI.exchanges`), with the usage it
reported, so tests can check what the model was sent and what it was charged.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests import scenario

_SCENARIO_RE = re.compile(r"^\s*SCENARIO:\s*(.+?)\s*$", re.MULTILINE)
# The phase protocol's line, else (a one-shot prompt) the environment block's.
_PHASE_FILE_RE = re.compile(r"echo 'PHASE:done' > '([^']+)'|^PHASE_FILE=(\S+)$", re.MULTILINE)


def usage_for(cursor: int) -> dict[str, int]:
    """What the response at ``cursor`` reports: different for each, so that a
    sum over a run tells which responses it counted."""
    return {
        "input_tokens": 1000 + cursor,
        "output_tokens": 50 + 7 * cursor,
        "cache_read_input_tokens": 300 + 11 * cursor,
        "cache_creation_input_tokens": 20 + 13 * cursor,
    }


_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


# What the real API says with each status.
_MESSAGES = {
    401: "invalid x-api-key",
    429: "Number of request tokens exceeds your rate limit",
    500: "Internal server error",
    529: "Overloaded",
}


@dataclass
class Exchange:
    """One request the CLI made and what the stand-in answered."""

    at: float
    main: bool
    model: str
    phase_file: str | None
    prompt: str | None
    cursor: int
    action: str
    usage: dict[str, int]
    message_id: str
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200


def _texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [
        str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text"
    ]


def user_prompt(messages: list[dict[str, Any]]) -> str | None:
    """The text the user typed first: the first user message's last non-reminder block."""
    for message in messages:
        if message.get("role") != "user":
            continue
        texts = [t for t in _texts(message) if not t.lstrip().startswith("<system-reminder>")]
        if texts:
            return texts[-1]
    return None


def _tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for message in messages:
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, list):
            continue
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                body = block.get("content")
                if isinstance(body, list):
                    body = "\n".join(str(b.get("text", "")) for b in body if isinstance(b, dict))
                found.append({"is_error": bool(block.get("is_error")), "content": str(body)})
    return found


# A fault's "status" that answers nothing: the connection is closed unanswered.
DROP = 0
# Tokens that say how the request for the token after them fails.
_FAULTS = ("outage", "ratelimit", "usagelimit", "badcredit")
_END_TEXTS = ("Done.", "I stop here.")


def _answered(message: dict[str, Any]) -> bool:
    """Whether an assistant message is one of the stand-in's answers (not a CLI's error text)."""
    content = message.get("content")
    if not isinstance(content, list):
        return False
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_use":
            return True
        text = str(block.get("text", ""))
        if block.get("type") == "text" and (text in _END_TEXTS or text.startswith("Running the ")):
            return True
    return False


class MessagesAPI:
    """The stand-in server: ``with MessagesAPI() as api: ... api.url``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._ids = 0
        # Failures served so far, by (phase file, cursor); an outage of every request.
        self._failed: dict[tuple[str | None, int], int] = {}
        self._outage: tuple[float, int] | None = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                api._handle(self)

            def do_GET(self) -> None:
                self._empty(404)

            def do_HEAD(self) -> None:
                # The CLI probes the base URL before it starts.
                self._empty(200)

            def _empty(self, status: int) -> None:
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MessagesAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def outage(self, seconds: float, status: int = 529) -> None:
        """Fail every main request with ``status`` for the next ``seconds`` (DROP: unanswered)."""
        with self._lock:
            self._outage = (time.time() + seconds, status)

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

    # -- serving -----------------------------------------------------------
    def _next_id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"msg_standin_{self._ids:06d}"

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length") or 0)
        try:
            body = json.loads(request.rfile.read(length) or b"{}")
        except ValueError:
            body = {}
        messages = body.get("messages") or []
        main = bool(body.get("tools"))
        prompt = user_prompt(messages) if main else None
        conversation = "\n".join(t for m in messages if m.get("role") == "user" for t in _texts(m))
        phase_match = _PHASE_FILE_RE.search(conversation)
        phase_file = (phase_match.group(1) or phase_match.group(2)) if phase_match else None
        cursor = sum(1 for m in messages if m.get("role") == "assistant" and _answered(m))
        action = "side" if not main else self._action(conversation, cursor)
        usage = usage_for(cursor) if main else {"input_tokens": 10, "output_tokens": 2}
        stamp, trace = (
            next(
                (t.partition("=")[2] for t in self._tokens(conversation) if t.startswith(prefix)),
                None,
            )
            for prefix in ("stamp=", "trace=")
        )
        fault = self._fault(conversation, phase_file, cursor) if main else None
        if fault is not None:
            blocks, status = [], fault[0]
        else:
            blocks, status = self._respond(action, phase_file, stamp, trace)
        exchange = Exchange(
            at=time.time(),
            main=main,
            model=str(body.get("model", "")),
            phase_file=phase_file,
            prompt=prompt,
            cursor=cursor,
            action=action,
            usage=usage if status == 200 else {},
            message_id=self._next_id(),
            tool_results=_tool_results(messages[-1:]) if main else [],
            status=status,
        )
        with self._lock:
            self.exchanges.append(exchange)
        if status == DROP:
            # No answer at all: the connection closes, as when the API is out of reach.
            request.close_connection = True
        elif status != 200:
            self._send_error(request, status, *(fault[1:] if fault else ({}, None)))
        elif body.get("stream"):
            self._send_stream(request, exchange, blocks)
        else:
            self._send_json(request, exchange, blocks)

    @staticmethod
    def _tokens(conversation: str) -> list[str]:
        found = _SCENARIO_RE.search(conversation)
        return found.group(1).split() if found else ["phase=done"]

    def _plan(self, conversation: str) -> tuple[list[str], dict[int, str]]:
        """The responses' tokens, and the fault token before each one that has one."""
        actions: list[str] = []
        faults: dict[int, str] = {}
        for token in self._tokens(conversation):
            if token.startswith(("stamp=", "trace=")):
                continue
            if token.partition("=")[0] in _FAULTS:
                faults[len(actions)] = token
            else:
                actions.append(token)
        return actions, faults

    def _action(self, conversation: str, cursor: int) -> str:
        actions = self._plan(conversation)[0]
        return actions[cursor] if cursor < len(actions) else "end"

    def _fault(
        self, conversation: str, phase_file: str | None, cursor: int
    ) -> tuple[int, dict[str, str], str | None] | None:
        """(status, headers, message) when this request is to fail, else None."""
        with self._lock:
            if self._outage is not None and time.time() < self._outage[0]:
                return self._outage[1], {}, None
        token = self._plan(conversation)[1].get(cursor)
        if token is None:
            return None
        name, _, arg = token.partition("=")
        key = (phase_file, cursor)
        with self._lock:
            failed = self._failed.get(key, 0)
            if name == "outage":
                status, _, count = arg.partition(":")
                if failed >= int(count or 1):
                    return None
                self._failed[key] = failed + 1
                return int(status), {}, None
            if name == "ratelimit":
                if failed >= int(arg or 1):
                    return None
                self._failed[key] = failed + 1
                return 429, {"retry-after": "1"}, "Number of request tokens exceeds your rate limit"
            if name == "usagelimit":
                # The reset is fixed by the first failure: later ones say the same time.
                reset = self._failed.setdefault(key, int(time.time() + float(arg)))
                if time.time() >= reset:
                    return None
                return 429, _usage_limit_headers(reset), "usage limit"
            if name == "badcredit":
                return (
                    400,
                    {},
                    (
                        "Your credit balance is too low to access the Anthropic API. "
                        "Please go to Plans & Billing to upgrade or purchase credits."
                    ),
                )
        return None

    def _respond(
        self,
        action: str,
        phase_file: str | None,
        stamp: str | None = None,
        trace: str | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """The content blocks (or an HTTP error status) for one action."""
        name, _, arg = action.partition("=")
        target = scenario.sh_quote(phase_file or "/dev/null")
        if name == "apifail":
            return [], int(arg)
        # The same commands every stand-in plays (tests/scenario.py).
        command = scenario.command_for(name, arg, phase_file, stamp)
        if command is None:
            text = "I stop here." if name == "idle" else "Done."
            return [{"type": "text", "text": text}], 200
        if trace:
            # The Bash tool's shell is a child of the CLI's process: $PPID is the CLI.
            quoted = scenario.sh_quote(action)
            line = f'printf \'%s %s %s %s\\n\' {target} {quoted} "$PPID" "$(date +%s.%N)"'
            command = f"{line} >> {scenario.sh_quote(trace)}; {command}"
        tool = {
            "type": "tool_use",
            "id": f"toolu_{abs(hash((command, time.time_ns()))) % 10**12:012d}",
            "name": "Bash",
            "input": {"command": command, "description": f"formula step: {name}"},
        }
        return [{"type": "text", "text": f"Running the {name} step."}, tool], 200

    # -- wire formats --------------------------------------------------------
    @staticmethod
    def _message(exchange: Exchange, content: list[dict[str, Any]], stop: str) -> dict[str, Any]:
        return {
            "id": exchange.message_id,
            "type": "message",
            "role": "assistant",
            "model": exchange.model or "claude-standin",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": exchange.usage,
        }

    def _send_json(
        self, request: BaseHTTPRequestHandler, exchange: Exchange, blocks: list[dict[str, Any]]
    ) -> None:
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        self._send(
            request, 200, "application/json", json.dumps(self._message(exchange, blocks, stop))
        )

    def _send_stream(
        self, request: BaseHTTPRequestHandler, exchange: Exchange, blocks: list[dict[str, Any]]
    ) -> None:
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        start_usage = {**exchange.usage, "output_tokens": 1}
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {**self._message(exchange, [], None), "usage": start_usage},  # type: ignore[arg-type]
                },
            )
        ]
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                opening, delta = (
                    {"type": "text", "text": ""},
                    {
                        "type": "text_delta",
                        "text": block["text"],
                    },
                )
            else:
                opening = {**block, "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            events += [
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": opening},
                ),
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                ),
                ("content_block_stop", {"type": "content_block_stop", "index": index}),
            ]
        events += [
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": exchange.usage.get("output_tokens", 0)},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        text = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
        self._send(request, 200, "text/event-stream", text)

    def _send_error(
        self,
        request: BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str] | None = None,
        message: str | None = None,
    ) -> None:
        kind = _ERRORS.get(status, "api_error")
        text = message or _MESSAGES.get(status, f"stand-in {kind}")
        body = {"type": "error", "error": {"type": kind, "message": text}}
        self._send(request, status, "application/json", json.dumps(body), headers)

    @staticmethod
    def _send(
        request: BaseHTTPRequestHandler,
        status: int,
        kind: str,
        text: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = text.encode()
        request.send_response(status)
        request.send_header("content-type", kind)
        request.send_header("content-length", str(len(data)))
        request.send_header("request-id", f"req_standin_{time.time_ns()}")
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)


def _usage_limit_headers(reset: int) -> dict[str, str]:
    """What the API says to a subscription whose five-hour limit is spent until ``reset``."""
    return {
        "anthropic-ratelimit-unified-status": "rejected",
        "anthropic-ratelimit-unified-reset": str(reset),
        "anthropic-ratelimit-unified-5h-status": "rejected",
        "anthropic-ratelimit-unified-5h-reset": str(reset),
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
    }


def charged(exchanges: list[Exchange]) -> dict[str, int]:
    """What the stand-in charged for ``exchanges``, by formulabeat's kinds of token."""
    kinds = {
        "input": "input_tokens",
        "output": "output_tokens",
        "cache_read": "cache_read_input_tokens",
        "cache_creation": "cache_creation_input_tokens",
    }
    return {kind: sum(e.usage.get(field, 0) for e in exchanges) for kind, field in kinds.items()}
