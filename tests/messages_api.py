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
- ``apifail=STATUS``: answer with that HTTP error (401, 429, 500, 529, …);
- ``stamp=PATH`` (anywhere in the line): each phase write then appends
  ``<phase file> <phase> <its mtime>`` to PATH (a benchmark's clock);
- ``waitfor=PATH``: a Bash call that waits until PATH exists.

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


def _spaced(text: str) -> str:
    return text.replace("_", " ")


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class MessagesAPI:
    """The stand-in server: ``with MessagesAPI() as api: ... api.url``."""

    def __init__(self, port: int = 0) -> None:
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._ids = 0
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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MessagesAPI:
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
        cursor = sum(1 for m in messages if m.get("role") == "assistant")
        action = "side" if not main else self._action(conversation, cursor)
        usage = usage_for(cursor) if main else {"input_tokens": 10, "output_tokens": 2}
        stamp = next(
            (t.partition("=")[2] for t in self._tokens(conversation) if t.startswith("stamp=")),
            None,
        )
        blocks, status = self._respond(action, phase_file, stamp)
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
        if status != 200:
            self._send_error(request, status)
        elif body.get("stream"):
            self._send_stream(request, exchange, blocks)
        else:
            self._send_json(request, exchange, blocks)

    @staticmethod
    def _tokens(conversation: str) -> list[str]:
        found = _SCENARIO_RE.search(conversation)
        return found.group(1).split() if found else ["phase=done"]

    def _action(self, conversation: str, cursor: int) -> str:
        tokens = [t for t in self._tokens(conversation) if not t.startswith("stamp=")]
        return tokens[cursor] if cursor < len(tokens) else "end"

    def _respond(
        self, action: str, phase_file: str | None, stamp: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """The content blocks (or an HTTP error status) for one action."""
        name, _, arg = action.partition("=")
        target = _sh_quote(phase_file or "/dev/null")

        def stamped(phase: str) -> str:
            # The write's time is the phase file's own mtime, read after it.
            if not stamp:
                return ""
            mtime = f'"$(stat -c %.9Y {target})"'
            return f"; printf '%s %s %s\\n' {target} {phase} {mtime} >> {_sh_quote(stamp)}"

        if name == "apifail":
            return [], int(arg)
        command: str | None = None
        if name == "phase":
            phase, _, reason = arg.partition(":")
            command = (
                f"printf 'PHASE:{phase}\\nReason: %s\\n' {_sh_quote(_spaced(reason))} > {target}"
                if reason
                else f"echo 'PHASE:{phase}' > {target}"
            ) + stamped(phase)
        elif name == "phases":
            command = "; ".join(f"echo 'PHASE:{p}' > {target}{stamped(p)}" for p in arg.split(","))
        elif name == "waitfor":
            # inotifywait would need a package; a 1 s poll costs next to nothing.
            command = f"while [ ! -e {_sh_quote(arg)} ]; do sleep 1; done"
        elif name == "bash":
            command = _spaced(arg)
        elif name == "sleep":
            command = f"sleep {float(arg):g}"
        elif name in ("crash", "crash_once"):
            # The Bash tool's shell is a child of the CLI's process.
            kill = "kill -KILL $PPID"
            flag = _sh_quote(f"{phase_file}.crashed")
            command = kill if name == "crash" else f"[ -e {flag} ] || {{ touch {flag}; {kill}; }}"
        if command is None:
            text = "I stop here." if name == "idle" else "Done."
            return [{"type": "text", "text": text}], 200
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

    def _send_error(self, request: BaseHTTPRequestHandler, status: int) -> None:
        kind = _ERRORS.get(status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": f"stand-in {kind}"}}
        self._send(request, status, "application/json", json.dumps(body))

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, kind: str, text: str) -> None:
        data = text.encode()
        request.send_response(status)
        request.send_header("content-type", kind)
        request.send_header("content-length", str(len(data)))
        request.send_header("request-id", f"req_standin_{time.time_ns()}")
        request.end_headers()
        request.wfile.write(data)


def charged(exchanges: list[Exchange]) -> dict[str, int]:
    """What the stand-in charged for ``exchanges``, by formulabeat's kinds of token."""
    kinds = {
        "input": "input_tokens",
        "output": "output_tokens",
        "cache_read": "cache_read_input_tokens",
        "cache_creation": "cache_creation_input_tokens",
    }
    return {kind: sum(e.usage.get(field, 0) for e in exchanges) for kind, field in kinds.items()}
