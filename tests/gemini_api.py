"""A stand-in of the Gemini API on loopback, for the real Gemini CLI.

Gemini CLI (pointed at it by ``GOOGLE_GEMINI_BASE_URL``) sends, per turn, a
router request (``:generateContent`` of a flash-lite model, asking for a
JSON ``complexity_score``), then ``:streamGenerateContent?alt=sse`` of the
main model with the whole conversation as ``contents`` (``user`` and
``model`` turns; tool calls as ``functionCall`` parts, their results as
``functionResponse`` parts). The stand-in answers the main request with one
SSE frame: a ``functionCall`` of ``run_shell_command`` whose ``command`` the
CLI really runs, or a text, and ``usageMetadata``. The scenario is the
prompt's ``SCENARIO:`` line (tests/scenario.py), the cursor the number of the
stand-in's own answers among the ``model`` turns. Requests without tools (the
router, a session summary) get a short answer and cost nothing.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests import scenario
from tests.scenario import Exchange, StandIn

# The main model the router's answer (a score of 1) selects, measured with 0.61.0.
MODEL = "gemini-3.8-flash"
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _parts(content: dict[str, Any]) -> list[dict[str, Any]]:
    parts = content.get("parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _user_texts(contents: list[dict[str, Any]]) -> list[str]:
    return [
        str(part["text"])
        for content in contents
        if content.get("role") == "user"
        for part in _parts(content)
        if "text" in part
    ]


def user_prompt(contents: list[dict[str, Any]]) -> str | None:
    """The text the user gave first (the CLI sends its session context before it)."""
    for text in _user_texts(contents):
        if not text.lstrip().startswith("<session_context>"):
            return text
    return None


def _ours(content: dict[str, Any]) -> bool:
    """Whether a ``model`` turn is one of the stand-in's answers."""
    if content.get("role") != "model":
        return False
    return any(
        "functionCall" in part or part.get("text") in (scenario.END_TEXT, scenario.IDLE_TEXT)
        for part in _parts(content)
    )


class GeminiAPI(StandIn):
    """The stand-in server: ``with GeminiAPI() as api: ... api.url``."""

    def __enter__(self) -> GeminiAPI:
        super().__enter__()
        return self

    def handle_get(self, request: BaseHTTPRequestHandler) -> None:
        """The model list the CLI asks for at its start."""
        if "/models" in request.path:
            models = {"models": [{"name": f"models/{MODEL}", "displayName": MODEL}]}
            self.send(request, 200, "application/json", json.dumps(models))
        else:
            super().handle_get(request)

    def handle(self, request: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        path = request.path
        model = path.split("/models/")[-1].split(":")[0] if "/models/" in path else ""
        if ":countTokens" in path:
            self.send(request, 200, "application/json", json.dumps({"totalTokens": 10}))
            return
        contents = [c for c in body.get("contents") or [] if isinstance(c, dict)]
        main = bool(body.get("tools"))
        conversation = "\n".join(_user_texts(contents))
        phase_file = scenario.phase_file_of(conversation)
        cursor = sum(1 for content in contents if _ours(content))
        action = scenario.action(conversation, cursor) if main else "side"
        status = (self.fault(conversation, phase_file, cursor) if main else None) or 200
        usage = scenario.usage_for(cursor) if main and status == 200 else {}
        # Gemini bills cached input, and no cache writes.
        usage.pop("cache_creation", None)
        exchange = Exchange(
            at=time.time(),
            main=main,
            model=model,
            phase_file=phase_file,
            prompt=user_prompt(contents) if main else None,
            cursor=cursor,
            action=action,
            usage=usage,
            message_id=self.next_id("gemini_standin_"),
            tool_results=_tool_results(contents[-1:]) if main else [],
            status=status,
        )
        self.record(exchange)
        if status != 200:
            error = {
                "error": {
                    "code": status,
                    "message": f"stand-in {_STATUS.get(status, 'INTERNAL').lower()}",
                    "status": _STATUS.get(status, "INTERNAL"),
                }
            }
            self.send(request, status, "application/json", json.dumps(error))
            return
        if main:
            parts = [self._part(action, phase_file, scenario.stamp_of(conversation))]
        else:
            parts = [{"text": self._side_text(body)}]
        frame = {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": _usage_metadata(usage),
            "modelVersion": model or MODEL,
            "responseId": exchange.message_id,
        }
        if "alt=sse" in path or ":streamGenerateContent" in path:
            self.send(request, 200, "text/event-stream", self.sse([(None, frame)]))
        else:
            self.send(request, 200, "application/json", json.dumps(frame))

    @staticmethod
    def _side_text(body: dict[str, Any]) -> str:
        """The router's JSON (a simple task: score 1), else a short text."""
        config = json.dumps(body.get("generationConfig") or {})
        if "complexity_score" in config:
            return json.dumps({"complexity_reasoning": "a scripted step", "complexity_score": 1})
        return "A scripted session."

    @staticmethod
    def _part(action: str, phase_file: str | None, stamp: str | None) -> dict[str, Any]:
        name, _, arg = action.partition("=")
        command = scenario.command_for(name, arg, phase_file, stamp)
        if command is None:
            return {"text": scenario.IDLE_TEXT if name == "idle" else scenario.END_TEXT}
        call = {"command": command, "description": f"formula step: {name}"}
        return {"functionCall": {"name": "run_shell_command", "args": call}}


def _usage_metadata(usage: dict[str, int]) -> dict[str, int]:
    prompt = usage.get("input", 0) + usage.get("cache_read", 0)
    output = usage.get("output", 0)
    return {
        "promptTokenCount": prompt,
        "cachedContentTokenCount": usage.get("cache_read", 0),
        "candidatesTokenCount": output,
        "totalTokenCount": prompt + output,
    }


def _tool_results(contents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for content in contents:
        for part in _parts(content):
            answer = part.get("functionResponse")
            if isinstance(answer, dict):
                response = answer.get("response")
                text = json.dumps(response) if not isinstance(response, str) else response
                found.append({"is_error": "error" in text.lower(), "content": text})
    return found
