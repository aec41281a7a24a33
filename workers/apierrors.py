"""API errors that end an agent's turn: wait and go on, or fail, and until when.

An agent CLI retries a failed API call a few times by itself, then ends its
turn on the error and says so (Claude Code runs its StopFailure hook, which
leaves the ``api-error`` record in the run directory). The record names the
CLI's kind of error and its own text; the agent's driver classifies it as
transient (overloaded, rate or usage limited, a server error, the API out of
reach: the run waits and goes on) or permanent (a refused credential, an
exhausted balance: the run fails at once, naming the fix). A reset time the
text states wins over the configured delay.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from workers.rundir import API_ERROR

# A wait doubles from the agent's api_retry_delay up to this (30 minutes).
MAX_RETRY_DELAY = 1800.0
# A stated reset is a wall-clock minute ("resets 4:58pm"): going on a few
# seconds after it keeps the first request from landing just before it.
RESET_MARGIN = 5.0
# A reset time just gone ("resets 4:58pm" read at 4:58:40) is now, not tomorrow.
RESET_PAST_SLACK = 120.0

_MONTHS = {
    month: number
    for number, month in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_CLOCK = re.compile(
    r"\bresets?\s+(?:at\s+|on\s+)?"
    r"(?:(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+(?P<day>\d{1,2}),?\s+"
    r"(?:at\s+)?)?"
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<ampm>am|pm)?"
    r"(?:\s*\((?P<zone>[^)]+)\))?",
    re.IGNORECASE,
)
_ISO = re.compile(
    r"\b(?:resets?|until|after|at)\s+(?:at\s+)?"
    r"(?P<stamp>\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2}| UTC)?)",
    re.IGNORECASE,
)
_IN = re.compile(
    r"\b(?:try again|retry|retrying|resets?)\s+(?:in|after)\s+(?P<n>\d+(?:\.\d+)?)\s*"
    r"(?P<unit>s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)\b",
    re.IGNORECASE,
)
_RETRY_AFTER = re.compile(r"\bretry-after:?\s*(?P<n>\d+)\b", re.IGNORECASE)
# Claude Code's older usage-limit text: "Claude AI usage limit reached|<epoch>".
_EPOCH = re.compile(r"limit reached\|(?P<epoch>\d{10})\b", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class ApiFailure:
    """One turn's API error, as the agent's driver judges it."""

    kind: str
    message: str
    # Waiting and going on may succeed (overloaded, limited, a server error).
    transient: bool
    # When the CLI or the API says the limit resets (Unix time), if it says.
    reset_at: float | None = None
    # What the user must do, for an error that waiting will not cure.
    fix: str | None = None

    def describe(self) -> str:
        """``kind: message`` as a run's reason or a wait's error quotes it."""
        text = " ".join(self.message.split())
        return f"{self.kind}: {text}" if text else self.kind


@dataclass(frozen=True)
class ApiErrorRecord:
    """What the run directory's ``api-error`` record says."""

    at: float
    kind: str
    message: str


def read_record(run_dir: Path | str) -> ApiErrorRecord | None:
    """The run directory's last API-error record (None: none, or not readable yet)."""
    try:
        with open(Path(run_dir) / API_ERROR, encoding="utf-8", errors="replace") as handle:
            data = json.loads(handle.read(65536))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        at = float(data.get("at", 0))
    except (TypeError, ValueError):
        return None
    return ApiErrorRecord(
        at=at, kind=str(data.get("kind") or "unknown"), message=str(data.get("message") or "")
    )


def write_record(run_dir: Path | str, record: ApiErrorRecord) -> None:
    """Leave an API-error record in the run directory (for a CLI whose hooks do not),
    replaced whole: the watcher never reads half of one."""
    path = Path(run_dir) / API_ERROR
    tmp = path.with_name(f".{API_ERROR}.{os.getpid()}.tmp")
    data = {"at": record.at, "kind": record.kind, "message": record.message[:4000]}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data))
    os.replace(tmp, path)


def retry_delay(first: float, attempt: int) -> float:
    """Seconds before try ``attempt`` (1, 2, …): ``first``, doubling, at most 30 minutes."""
    return min(MAX_RETRY_DELAY, first * 2.0 ** max(0, attempt - 1))


def stated_reset(message: str, now: float) -> float | None:
    """The reset time ``message`` states, as a Unix time (None: it states none).

    Understood: Claude Code's ``resets 4:58pm (UTC)`` and ``resets Dec 9, 4pm
    (Europe/Paris)`` (a clock time in the zone it names, else this host's),
    an ISO 8601 time after ``resets``/``until``/``at``, ``try again in 30
    seconds``, ``retry-after: 30`` and the older ``limit reached|<epoch>``.
    """
    found = _EPOCH.search(message)
    if found:
        return float(found.group("epoch"))
    found = _ISO.search(message)
    if found:
        stamp = found.group("stamp").replace(" UTC", "+00:00").replace("Z", "+00:00")
        try:
            moment = dt.datetime.fromisoformat(stamp)
        except ValueError:
            moment = None
        if moment is not None:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
            return moment.timestamp()
    found = _IN.search(message) or _RETRY_AFTER.search(message)
    if found:
        unit = (found.groupdict().get("unit") or "s")[0].lower()
        return now + float(found.group("n")) * _UNITS[unit]
    found = _CLOCK.search(message)
    if found and (found.group("minute") or found.group("ampm")):
        return _clock_time(found, now)
    return None


def _clock_time(found: re.Match[str], now: float) -> float | None:
    hour, minute = int(found.group("hour")), int(found.group("minute") or 0)
    ampm = (found.group("ampm") or "").lower()
    if ampm:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if ampm == "pm" else 0)
    if hour > 23 or minute > 59:
        return None
    zone = _zone(found.group("zone"))
    today = dt.datetime.fromtimestamp(now, zone)
    if found.group("month"):
        month, day = _MONTHS[found.group("month")[:3].lower()], int(found.group("day"))
        try:
            moment = today.replace(month=month, day=day, hour=hour, minute=minute, second=0)
        except ValueError:
            return None
        if moment.timestamp() < now - 180 * 86400:
            moment = moment.replace(year=moment.year + 1)  # "Jan 2" read in December
        return moment.timestamp()
    moment = today.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if moment.timestamp() < now - RESET_PAST_SLACK:
        moment += dt.timedelta(days=1)
    return moment.timestamp()


def _zone(name: str | None) -> dt.tzinfo | None:
    """The time zone a CLI named (IANA name or UTC/GMT); None: this host's own."""
    if not name:
        return None
    name = name.strip()
    if name.upper() in ("UTC", "GMT", "Z"):
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


# Kinds an agent CLI reports for errors that waiting may cure.
TRANSIENT_KINDS = frozenset(
    {"rate_limit", "server_error", "overloaded", "timeout", "connection_error", "unknown"}
)


def classify(
    kind: str, message: str, now: float, fixes: Mapping[str, str] | None = None
) -> ApiFailure:
    """The common judgement: transient kinds wait, every other kind fails with its fix."""
    transient = kind in TRANSIENT_KINDS
    fix = None
    if not transient:
        fix = (fixes or {}).get(kind) or (
            f"the API refused the request ({kind}), which trying again will not change"
        )
    reset = stated_reset(message, now) if transient else None
    return ApiFailure(kind=kind, message=message, transient=transient, reset_at=reset, fix=fix)


def format_time(epoch: float) -> str:
    """A Unix time as people read it in a reason: ``16:58:05 UTC`` (with the date if not today)."""
    moment = dt.datetime.fromtimestamp(math.floor(epoch), dt.UTC)
    today = dt.datetime.now(dt.UTC).date()
    if moment.date() == today:
        return moment.strftime("%H:%M:%S UTC")
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
