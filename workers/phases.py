"""The phase file: the agent's only channel back to the orchestrator.

Its first line is the phase (``PHASE:done``); for a failure a ``Reason:``
line may follow. It is read without following symlinks and with a size cap,
so a hostile or broken file fails the run with a clear reason instead of
crashing or hanging the worker.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from workers import run as outcomes
from workers.errors import PhaseFileError

MAX_PHASE_BYTES = 64 * 1024

PHASE_DONE = "PHASE:done"
PHASE_MERGED = "PHASE:merged"
PHASE_FAILED = "PHASE:failed"
PHASE_ESCALATE = "PHASE:escalate"
PHASE_CRASHED = "PHASE:crashed"

# The phase that ends a run, and the outcome it ends with.
TERMINAL = {
    PHASE_DONE: outcomes.DONE,
    PHASE_MERGED: outcomes.MERGED,
    PHASE_FAILED: outcomes.FAILED,
    PHASE_ESCALATE: outcomes.ESCALATE,
}


@dataclass(frozen=True)
class PhaseReading:
    """What the phase file says now: its first line and an optional reason."""

    phase: str
    reason: str | None


def read_phase(path: str) -> PhaseReading | None:
    """Read the phase file; None when it is absent or still empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PhaseFileError(f"phase file {path} is a symlink") from None
        raise PhaseFileError(f"cannot open phase file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PhaseFileError(f"phase file {path} is not a regular file")
        if info.st_size > MAX_PHASE_BYTES:
            raise PhaseFileError(
                f"phase file {path} is {info.st_size} bytes (limit {MAX_PHASE_BYTES})"
            )
        data = os.read(fd, MAX_PHASE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PhaseFileError(f"phase file {path} is not UTF-8 text (byte {exc.start})") from None
    lines = [line.strip() for line in text.splitlines()]
    first = next((line for line in lines if line), "")
    if not first:
        return None
    reason = None
    for line in lines[1:]:
        if line.lower().startswith("reason:"):
            reason = line.split(":", 1)[1].strip() or None
            break
    return PhaseReading(phase=first, reason=reason)


def state_name(phase: str) -> str:
    """The Celery state (and Flower event) name of a phase: PHASE:awaiting_ci → AWAITING_CI."""
    name = phase.removeprefix("PHASE:").strip().lower()
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
    return (cleaned or "unknown").upper()
