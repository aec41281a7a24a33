"""The optional structural-analysis command of a project, for the prompt.

Its JSON report is embedded in the prompt; any failure (missing command,
error, timeout, output that is not JSON) is logged and the prompt goes
without it, as the original's ``build_graph_section`` did.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess

from workers.config import ProjectConfig

log = logging.getLogger("formulabeat.analysis")
MAX_REPORT_BYTES = 256 * 1024


def structural_report(project: ProjectConfig) -> str | None:
    """Run the project's ``graph_command`` in its repository; its JSON, or None."""
    if not project.graph_command:
        return None
    try:
        proc = subprocess.run(
            shlex.split(project.graph_command),
            cwd=project.repo_root,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=project.graph_timeout,
            check=False,
        )
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        log.warning(
            "project %s: graph_command failed, continuing without it: %s", project.name, exc
        )
        return None
    if proc.returncode != 0:
        log.warning(
            "project %s: graph_command exited %s, continuing without it",
            project.name,
            proc.returncode,
        )
        return None
    text = proc.stdout[:MAX_REPORT_BYTES].decode("utf-8", errors="replace")
    try:
        json.loads(text)
    except ValueError:
        log.warning(
            "project %s: graph_command printed no JSON, continuing without it", project.name
        )
        return None
    return text
