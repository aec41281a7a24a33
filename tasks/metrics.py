"""Prometheus metrics from each worker (prometheus-client), on ``[metrics]`` address:port.

Counted here, where runs are reported: runs by outcome, phase transitions,
skips by kind, live sessions, tokens by model and kind, and how long a phase
write took to be seen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from celery.signals import worker_ready
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from workers.run import Run

log = logging.getLogger("formulabeat.metrics")

RUNS = Counter("formulabeat_runs_total", "Runs ended, by outcome", ["project", "agent", "outcome"])
PHASES = Counter(
    "formulabeat_phase_transitions_total", "Phase changes seen", ["project", "agent", "phase"]
)
SKIPS = Counter("formulabeat_skips_total", "Runs skipped, by kind", ["project", "agent", "kind"])
LIVE = Gauge("formulabeat_live_sessions", "Runs being monitored on this worker")
API_WAITS = Counter(
    "formulabeat_api_waits_total",
    "Waits for the API after a turn ended on a transient API error, by the CLI's kind",
    ["project", "agent", "kind"],
)
TOKENS = Counter(
    "formulabeat_tokens_total",
    "Tokens the agents used, from their transcripts",
    ["project", "agent", "model", "kind"],
)
DETECTION = Histogram(
    "formulabeat_phase_detection_seconds",
    "From the phase file's write to the phase being reported",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def skip_kind(reason: str) -> str:
    """A small, fixed label for a skip reason (labels must not be free text)."""
    for words, kind in _SKIP_KINDS:
        if words in reason:
            return kind
    return "other"


_SKIP_KINDS = (
    ("disabled", "disabled"),
    ("already running", "already_running"),
    ("low memory", "low_memory"),
    ("cancelled", "cancelled"),
    ("limited by the API", "limited"),
)


def api_wait(run: Run, kind: str) -> None:
    """Count a wait for the API (the kind is the CLI's own small vocabulary)."""
    API_WAITS.labels(run.project, run.agent, kind[:40]).inc()


def phase_seen(run: Run) -> None:
    """Count a phase change and how long after the write it was seen."""
    PHASES.labels(run.project, run.agent, run.final_phase or "").inc()
    if run.phase_file:
        with contextlib.suppress(OSError):
            DETECTION.observe(max(0.0, time.time() - os.stat(run.phase_file).st_mtime))


def tokens_counted(run: Run, fresh: Mapping[str, Mapping[str, int]]) -> None:
    """Count tokens a run just used."""
    for model, kinds in fresh.items():
        for kind, tokens in kinds.items():
            if tokens:
                TOKENS.labels(run.project, run.agent, model, kind).inc(tokens)


def run_ended(run: Run) -> None:
    """Count an ended run (and a skip by kind)."""
    RUNS.labels(run.project, run.agent, run.outcome or "failed").inc()
    if run.outcome == "skipped":
        SKIPS.labels(run.project, run.agent, skip_kind(run.reason or "")).inc()


@worker_ready.connect
def _serve(sender: Any = None, **_: Any) -> None:
    from tasks.app import config

    cfg = config()
    if not cfg.metrics_port:
        return
    try:
        start_http_server(cfg.metrics_port, addr=cfg.metrics_address)
    except OSError as exc:
        # Another worker on this host serves the port; this one goes on without.
        log.warning(
            "metrics: cannot listen on %s:%s: %s", cfg.metrics_address, cfg.metrics_port, exc
        )
        return
    log.info("metrics on http://%s:%s/metrics", cfg.metrics_address, cfg.metrics_port)
