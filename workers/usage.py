"""Tokens and cost of a run: read from the agent's transcript as it grows.

Each CLI writes its API responses to the session's transcript (JSONL), each
with an id, a model and the tokens used; its driver names the format
(:class:`TranscriptFormat`): Claude Code's ``assistant`` lines here (a
response with several content blocks is several lines with the same id),
Codex's and Gemini CLI's in their drivers. Each id is counted once. The
reader keeps its place (an offset) and the ids it has counted, so it reads
each new line once, survives a line cut short (read again when it is
complete), a line that is not JSON (skipped), a file that was rewritten or
replaced (read again from the start, each id still counted once), and a
transcript that does not exist yet.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from workers.apierrors import ApiErrorRecord, write_record
from workers.run import Run
from workers.rundir import PROMPT_SUBMITTED, USAGE

# The kinds of tokens, as formulabeat names them, and the usage fields they
# come from in a transcript line and in a one-shot run's result object.
KINDS = ("input", "output", "cache_read", "cache_creation")
_TRANSCRIPT_FIELDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_input_tokens",
    "cache_creation": "cache_creation_input_tokens",
}
_RESULT_FIELDS = {
    "input": "inputTokens",
    "output": "outputTokens",
    "cache_read": "cacheReadInputTokens",
    "cache_creation": "cacheCreationInputTokens",
}
_VARIANT = re.compile(r"\[[^\]]*\]$")
# How often a meter keeps its reader's state on disk.
SAVE_SECONDS = 30.0
# A line this long is not read into memory whole to find out it is not ours.
MAX_LINE_BYTES = 8 * 1024 * 1024

Usage = dict[str, dict[str, int]]  # model -> kind -> tokens


def empty(usage: Mapping[str, Mapping[str, int]]) -> bool:
    """Whether no token was counted."""
    return not any(any(kinds.values()) for kinds in usage.values())


def total_tokens(usage: Mapping[str, Mapping[str, int]]) -> int:
    """Every token of every kind and model (what ``max_tokens`` limits)."""
    return sum(sum(kinds.values()) for kinds in usage.values())


def add(usage: Usage, model: str, counts: Mapping[str, int]) -> None:
    """Add ``counts`` (kind -> tokens) for ``model`` into ``usage``."""
    into = usage.setdefault(model, dict.fromkeys(KINDS, 0))
    for kind in KINDS:
        into[kind] = into.get(kind, 0) + int(counts.get(kind, 0))


def cost_usd(
    usage: Mapping[str, Mapping[str, int]], prices: Mapping[str, Mapping[str, float]]
) -> float | None:
    """The cost in USD from a price table (USD per million tokens by kind).

    None when a model that was used has no price: never a guess.
    """
    total = 0.0
    for model, kinds in usage.items():
        if not any(kinds.values()):
            continue
        price = prices.get(model)
        if price is None:
            return None
        total += sum(kinds.get(kind, 0) * price.get(kind, 0.0) for kind in KINDS) / 1e6
    return total


def from_result(result: Mapping[str, Any]) -> Usage:
    """The usage of a one-shot run, from the CLI's final ``result`` object (``modelUsage``).

    It names models as the CLI does (``claude-opus-4-8[1m]`` for the 1M
    context); the transcript, the API and the price table, without the suffix.
    """
    usage: Usage = {}
    per_model = result.get("modelUsage")
    if isinstance(per_model, dict):
        for model, counts in per_model.items():
            if isinstance(counts, dict):
                name = _VARIANT.sub("", str(model))
                add(usage, name, {k: tokens_of(counts.get(f)) for k, f in _RESULT_FIELDS.items()})
    return usage


def tokens_of(value: object) -> int:
    """A token count from a usage field (0 for anything but a positive integer)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


Counted = tuple[str, str, dict[str, int]]  # (response id, model, kind -> tokens)


class TranscriptFormat(Protocol):
    """How one CLI's transcript lines carry the tokens of its responses."""

    def wanted(self, line: bytes) -> bool:
        """Whether a raw line may carry usage (most lines are tool output: skipped unparsed)."""

    def counted(self, entry: dict[str, Any], context: dict[str, str]) -> Counted | None:
        """The response a parsed line records, if it does. ``context`` carries what
        earlier lines said (the model of the turn), kept with the reader's state."""

    def api_error(self, entry: dict[str, Any]) -> ApiErrorRecord | None:
        """The API error that ended a turn, for a CLI whose transcript is where it says
        so (None: not such a line, or the CLI's hooks report it)."""


class ClaudeTranscript:
    """Claude Code's transcript (and the scripted agent's): ``assistant`` lines."""

    def wanted(self, line: bytes) -> bool:
        """Assistant lines with a usage."""
        return b'"assistant"' in line and b'"usage"' in line

    def counted(self, entry: dict[str, Any], context: dict[str, str]) -> Counted | None:
        """``message.id``, ``message.model`` and ``message.usage`` of an assistant line."""
        if entry.get("type") != "assistant":
            return None
        message = entry.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("usage"), dict):
            return None
        message_id = message.get("id")
        if not isinstance(message_id, str) or not message_id:
            return None
        usage = message["usage"]
        counts = {kind: tokens_of(usage.get(name)) for kind, name in _TRANSCRIPT_FIELDS.items()}
        return message_id, str(message.get("model") or "unknown"), counts

    def api_error(self, entry: dict[str, Any]) -> ApiErrorRecord | None:
        """None: Claude Code's StopFailure hook reports its API errors."""
        return None


CLAUDE_TRANSCRIPT = ClaudeTranscript()


@dataclass
class TranscriptReader:
    """Follows one run's transcripts (a resumed session may write a new one)."""

    fmt: TranscriptFormat = CLAUDE_TRANSCRIPT
    path: str | None = None
    offset: int = 0
    # The file's inode at ``offset``: another file there is read from its start.
    inode: int = 0
    counted: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._seen = set(self.counted)
        # API errors read since the caller last took them (not kept).
        self.api_errors: list[ApiErrorRecord] = []

    def follow(self, path: str) -> None:
        """Read ``path`` from now on (a new session's transcript)."""
        if path != self.path:
            self.path, self.offset, self.inode = path, 0, 0

    def read(self) -> Usage:
        """Count what was appended since the last read; the tokens newly counted."""
        if not self.path:
            return {}
        try:
            info = os.stat(self.path)
        except OSError:
            return {}
        if info.st_ino != self.inode or info.st_size < self.offset:
            # Replaced or rewritten (compaction): every line again, ids once.
            self.inode, self.offset = info.st_ino, 0
        if info.st_size == self.offset:
            return {}
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(min(info.st_size - self.offset, MAX_LINE_BYTES * 4))
        except OSError:
            return {}
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) >= MAX_LINE_BYTES:
            end = len(data)  # one huge line with no end in sight: not a usage line
        self.offset += end
        fresh: Usage = {}
        seen = self._seen
        for line in data[:end].splitlines():
            # Most lines are tool output: look before parsing.
            if not self.fmt.wanted(line):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            failed = self.fmt.api_error(entry)
            if failed is not None:
                self.api_errors.append(failed)
            found = self.fmt.counted(entry, self.context)
            if found is None or found[0] in seen:
                continue
            message_id, model, counts = found
            seen.add(message_id)
            self.counted.append(message_id)
            if any(counts.values()):
                # (A resumed CLI writes "<synthetic>" messages that cost nothing.)
                add(fresh, model, counts)
                add(self.usage, model, counts)
        return fresh

    def read_all(self) -> Usage:
        """Read the transcript to its end (a one-shot run's, once it is over); the usage."""
        while True:
            offset, inode = self.offset, self.inode
            self.read()
            if (self.offset, self.inode) == (offset, inode):
                return self.usage

    def to_dict(self) -> dict[str, Any]:
        """The reader's state, to pick it up again after a worker restart."""
        return {
            "path": self.path,
            "offset": self.offset,
            "inode": self.inode,
            "counted": self.counted,
            "usage": self.usage,
            "context": self.context,
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], fmt: TranscriptFormat = CLAUDE_TRANSCRIPT
    ) -> TranscriptReader:
        """Rebuild a reader saved with :meth:`to_dict`."""
        return cls(
            fmt=fmt,
            path=data.get("path"),
            offset=int(data.get("offset", 0)),
            inode=int(data.get("inode", 0)),
            counted=list(data.get("counted", [])),
            usage={m: dict(k) for m, k in dict(data.get("usage", {})).items()},
            context={str(k): str(v) for k, v in dict(data.get("context", {})).items()},
        )

    def save(self, path: Path) -> None:
        """Write the reader's state to ``path`` (in the run's private directory)."""
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(self.to_dict()))  # one write, not one per token
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, fmt: TranscriptFormat = CLAUDE_TRANSCRIPT) -> TranscriptReader:
        """A reader saved in ``path``, or a new one when there is none (or it is unreadable)."""
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), fmt)
        except (OSError, ValueError, TypeError, AttributeError):
            return cls(fmt=fmt)


class Meter:
    """Counts one run's tokens from its CLI's transcript into the run, and prices them.

    The transcript is the one the CLI named to the prompt-submit hook
    (``prompt-submitted`` in the run directory); the reader's place is kept
    beside it (``usage.json``), so a worker that adopts the run goes on
    counting where the last one stopped.
    """

    def __init__(
        self,
        run: Run,
        prices: Mapping[str, Mapping[str, float]],
        fmt: TranscriptFormat = CLAUDE_TRANSCRIPT,
    ) -> None:
        assert run.run_dir is not None
        self.run = run
        self.prices = prices
        self.run_dir = Path(run.run_dir)
        self.reader = TranscriptReader.load(self.run_dir / USAGE, fmt)
        if self.reader.usage and not run.usage:
            run.usage = {m: dict(k) for m, k in self.reader.usage.items()}
        self._marker_stamp: tuple[int, int] | None = None
        self._saved_at = 0.0
        self._unsaved = False

    def update(self) -> Usage:
        """Read what the transcript gained; the tokens newly counted (empty: none)."""
        self._follow_marker()
        fresh = self.reader.read()
        for failed in self.reader.api_errors:
            # Stamped with the CLI's own time: read again, it is not news.
            write_record(self.run_dir, failed)
        self.reader.api_errors.clear()
        if fresh:
            self.run.usage = {m: dict(k) for m, k in self.reader.usage.items()}
            self.run.cost_usd = cost_usd(self.run.usage, self.prices)
            self._unsaved = True
        # The reader's state is saved now and then, always whole (place, ids
        # and counts together): an adopter may read a few lines again, and
        # counts each once.
        if self._unsaved and time.monotonic() - self._saved_at >= SAVE_SECONDS:
            self.save()
        return fresh

    def save(self) -> None:
        """Keep the reader's state in the run directory (for an adopter)."""
        self.reader.save(self.run_dir / USAGE)
        self._saved_at, self._unsaved = time.monotonic(), False

    def _follow_marker(self) -> None:
        marker = self.run_dir / PROMPT_SUBMITTED
        try:
            info = marker.stat()
        except OSError:
            return
        stamp = (info.st_ino, info.st_mtime_ns)
        if stamp == self._marker_stamp:
            return
        self._marker_stamp = stamp
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._marker_stamp = None  # being written: look again
            return
        path = record.get("transcript_path") if isinstance(record, dict) else None
        if isinstance(path, str) and path:
            self.reader.follow(path)
            self.run.transcript = path


def over_budget(
    run_usage: Mapping[str, Mapping[str, int]],
    cost: float | None,
    max_tokens: int | None,
    max_cost_usd: float | None,
) -> str | None:
    """Why a run is over its own budget, with the figures (None: within it)."""
    tokens = total_tokens(run_usage)
    if max_tokens is not None and tokens > max_tokens:
        return f"used {tokens} tokens, over max_tokens = {max_tokens}"
    if max_cost_usd is not None and cost is not None and cost > max_cost_usd:
        return f"cost ${cost:.4f}, over max_cost_usd = {max_cost_usd:g}"
    return None
