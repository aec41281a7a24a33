"""A stand-in of OpenAI's Responses API on loopback, for the real Codex CLI.

Codex (pointed at it by a ``[model_providers.<name>]`` entry with
``wire_api = "responses"``) sends ``GET /v1/models`` once, then ``POST
/v1/responses`` (``stream: true``) with the whole conversation as ``input``
items: messages, and ``function_call`` / ``function_call_output`` pairs. The
stand-in answers each with SSE ``response.created``, one
``response.output_item.done`` (a ``function_call`` of ``exec_command`` whose
``cmd`` Codex really runs, or an assistant ``message``) and
``response.completed`` with the response's ``usage``. The scenario is the
prompt's ``SCENARIO:`` line (tests/scenario.py), the cursor the number of
the stand-in's own items in ``input``.

Besides the conversation, a new TUI thread asks for a title (a request with
no tools and a ``text.format`` JSON schema): it gets ``{"title": ...}``.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests import scenario
from tests.scenario import Exchange, StandIn

MODEL = "stub-model"
# Codex's own retries of a failed request ("Reconnecting... n/5").
_ERRORS = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_is_overloaded",
}


def _text_of(item: dict[str, Any]) -> list[str]:
    content = item.get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [str(part.get("text", "")) for part in content if isinstance(part, dict)]


def _user_texts(items: list[dict[str, Any]]) -> list[str]:
    return [
        text
        for item in items
        if item.get("type", "message") == "message" and item.get("role") == "user"
        for text in _text_of(item)
    ]


def user_prompt(items: list[dict[str, Any]]) -> str | None:
    """The text the user gave first (Codex sends its environment context before it)."""
    for text in _user_texts(items):
        if not text.lstrip().startswith("<environment_context>"):
            return text
    return None


def _ours(item: dict[str, Any]) -> bool:
    """Whether an input item is one of the stand-in's answers."""
    if item.get("type") == "function_call":
        return True
    if item.get("type", "message") == "message" and item.get("role") == "assistant":
        texts = _text_of(item)
        return any(t in (scenario.END_TEXT, scenario.IDLE_TEXT) for t in texts)
    return False


class ResponsesAPI(StandIn):
    """The stand-in server: ``with ResponsesAPI() as api: ... api.url`` (ends in /v1)."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.base_url = f"{self.url}/v1"

    def __enter__(self) -> ResponsesAPI:
        super().__enter__()
        return self

    def handle_get(self, request: BaseHTTPRequestHandler) -> None:
        """``/v1/models``: one model, so that Codex need not guess its metadata."""
        if request.path.startswith("/v1/models"):
            body = {"object": "list", "data": [{"id": MODEL, "object": "model"}], "models": []}
            self.send(request, 200, "application/json", json.dumps(body))
        else:
            super().handle_get(request)

    def handle(self, request: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        items = [i for i in body.get("input") or [] if isinstance(i, dict)]
        main = bool(body.get("tools"))
        conversation = "\n".join(_user_texts(items))
        phase_file = scenario.phase_file_of(conversation)
        cursor = sum(1 for item in items if _ours(item))
        action = scenario.action(conversation, cursor) if main else "side"
        status = (self.fault(conversation, phase_file, cursor) if main else None) or 200
        usage = scenario.usage_for(cursor) if main and status == 200 else {}
        # The Responses API has no cache writes: what it bills is input, cached input, output.
        usage.pop("cache_creation", None)
        exchange = Exchange(
            at=time.time(),
            main=main,
            model=str(body.get("model", "")),
            phase_file=phase_file,
            prompt=user_prompt(items) if main else None,
            cursor=cursor,
            action=action,
            usage=usage,
            message_id=self.next_id("resp_standin_"),
            tool_results=_tool_results(items[-1:]) if main else [],
            status=status,
        )
        self.record(exchange)
        if status != 200:
            kind = _ERRORS.get(status, "server_error")
            message = f"stand-in {kind}"
            error = {"error": {"type": kind, "code": kind, "message": message}}
            self.send(request, status, "application/json", json.dumps(error))
            return
        if main:
            item = self._item(action, phase_file, scenario.stamp_of(conversation))
        else:
            item = _message(json.dumps({"title": "Scenario task"}))
        self.send(request, 200, "text/event-stream", self._stream(exchange, item))

    @staticmethod
    def _item(action: str, phase_file: str | None, stamp: str | None) -> dict[str, Any]:
        name, _, arg = action.partition("=")
        command = scenario.command_for(name, arg, phase_file, stamp)
        if command is None:
            return _message(scenario.IDLE_TEXT if name == "idle" else scenario.END_TEXT)
        call_id = f"call_{time.time_ns()}"
        return {
            "type": "function_call",
            "id": f"fc_{call_id}",
            "call_id": call_id,
            "name": "exec_command",
            "arguments": json.dumps({"cmd": command, "yield_time_ms": 30000}),
            "status": "completed",
        }

    @staticmethod
    def _stream(exchange: Exchange, item: dict[str, Any]) -> str:
        usage = exchange.usage
        billed_input = usage.get("input", 0) + usage.get("cache_read", 0)
        response = {
            "id": exchange.message_id,
            "object": "response",
            "created_at": int(exchange.at),
            "model": exchange.model or MODEL,
            "status": "in_progress",
            "output": [],
        }
        done = {
            **response,
            "status": "completed",
            "output": [item],
            "usage": {
                "input_tokens": billed_input,
                "input_tokens_details": {"cached_tokens": usage.get("cache_read", 0)},
                "output_tokens": usage.get("output", 0),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": billed_input + usage.get("output", 0),
            },
        }
        events: list[tuple[str | None, dict[str, Any]]] = [
            ("response.created", {"type": "response.created", "response": response}),
            (
                "response.output_item.added",
                {"type": "response.output_item.added", "output_index": 0, "item": item},
            ),
            (
                "response.output_item.done",
                {"type": "response.output_item.done", "output_index": 0, "item": item},
            ),
            ("response.completed", {"type": "response.completed", "response": done}),
        ]
        return StandIn.sse(events)


def _message(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{time.time_ns()}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _tool_results(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for item in items:
        if item.get("type") == "function_call_output":
            output = item.get("output")
            if isinstance(output, dict):
                output = output.get("content") or json.dumps(output)
            found.append({"is_error": False, "content": str(output)})
    return found
