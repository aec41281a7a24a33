"""A line of ``formulabeat doctor``: what was checked, whether it is ok, and what to do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One line of the report: ``detail`` says what was found, or how to fix it."""

    name: str
    ok: bool
    detail: str
