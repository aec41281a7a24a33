"""Formulas: TOML files that tell an agent what to do, step by step.

A formula has a ``name``, one or more ``[[steps]]`` each with ``id``,
``title`` and ``description``, and optionally ``[context] files``. A bad
formula fails the run with the file, the line and what is wrong.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import FormulaError

MAX_FORMULA_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Step:
    """One step of a formula."""

    id: str
    title: str
    description: str


@dataclass(frozen=True)
class Formula:
    """A validated formula and the text it was read from."""

    path: Path
    name: str
    steps: tuple[Step, ...]
    context_files: tuple[str, ...]
    text: str


def load_formula(path: Path) -> Formula:
    """Read and validate the formula at ``path``."""
    try:
        if path.stat().st_size > MAX_FORMULA_BYTES:
            raise FormulaError(f"formula {path} is larger than {MAX_FORMULA_BYTES} bytes")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FormulaError(f"formula {path} not found") from None
    except IsADirectoryError:
        raise FormulaError(f"formula {path} is a directory, not a file") from None
    except OSError as exc:
        raise FormulaError(f"formula {path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormulaError(f"formula {path}: not UTF-8 text (byte {exc.start})") from None
    return parse_formula(text, path)


def parse_formula(text: str, path: Path) -> Formula:
    """Validate formula TOML ``text`` read from ``path``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FormulaError(f"formula {path}: not valid TOML: {exc}") from None
    lines = text.splitlines()

    def fail(line: int | None, problem: str) -> FormulaError:
        where = f"{path}:{line}" if line else f"{path}"
        return FormulaError(f"formula {where}: {problem}")

    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise fail(_line_of(lines, r"name\s*="), "'name' must be a non-empty string")
    steps_raw = data.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise fail(None, "has no steps: add at least one [[steps]] table")
    step_lines = [
        i + 1 for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*steps\s*\]\]", line)
    ]
    steps: list[Step] = []
    seen: set[str] = set()
    for index, raw_step in enumerate(steps_raw):
        line = step_lines[index] if index < len(step_lines) else None
        if not isinstance(raw_step, dict):
            raise fail(line, f"steps[{index}] must be a table")
        values = _step_values(raw_step, index, line, fail)
        if values[0] in seen:
            raise fail(line, f"steps[{index}]: id {values[0]!r} is used twice")
        seen.add(values[0])
        steps.append(Step(*values))
    context = data.get("context", {})
    if not isinstance(context, dict):
        raise fail(_line_of(lines, r"context\s*="), "'context' must be a table ([context])")
    files = context.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise fail(_line_of(lines, r"files\s*="), "[context] files must be an array of strings")
    return Formula(path=path, name=name, steps=tuple(steps), context_files=tuple(files), text=text)


def _step_values(
    raw: dict[str, Any], index: int, line: int | None, fail: Any
) -> tuple[str, str, str]:
    values = []
    for key in ("id", "title", "description"):
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise fail(line, f"steps[{index}] needs '{key}' as a non-empty string")
        values.append(value)
    return values[0], values[1], values[2]


def _line_of(lines: list[str], pattern: str) -> int | None:
    for number, line in enumerate(lines, start=1):
        if re.match(rf"\s*{pattern}", line):
            return number
    return None
