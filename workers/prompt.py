"""The prompt an agent receives: formula, context files and the footer.

The footer keeps the original's text contract: a forge API reference that
names ``${FORGE_TOKEN}`` as text (never its value), the environment block,
and the phase protocol naming the phase file exactly as the original did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from workers.config import AgentConfig, ProjectConfig
from workers.errors import ContextError
from workers.formula import Formula

MAX_CONTEXT_FILE_BYTES = 256 * 1024
MAX_SCRATCH_BYTES = 8192


@dataclass(frozen=True)
class PromptParts:
    """The whole prompt, and the footer alone (kept for context compaction)."""

    prompt: str
    footer: str


def context_paths(agent: AgentConfig, formula: Formula) -> list[str]:
    """Context entries of the agent config, then the formula's, without repeats."""
    seen: dict[str, None] = {}
    for entry in (*agent.context, *formula.context_files):
        seen.setdefault(entry, None)
    return list(seen)


def resolve_context(entry: str, project: ProjectConfig) -> tuple[str, Path]:
    """The label and safe path of a context entry (``ops:`` reads the ops repo)."""
    if entry.startswith("ops:"):
        label = entry.removeprefix("ops:")
        if project.ops_repo_root is None:
            raise ContextError(
                f"context {entry!r}: project {project.name} has no ops_repo_root configured"
            )
        root = project.ops_repo_root
    else:
        label, root = entry, project.repo_root
    relative = Path(label)
    if not label or relative.is_absolute():
        raise ContextError(f"context {entry!r}: must be a path relative to its repository")
    if ".." in relative.parts:
        raise ContextError(f"context {entry!r}: '..' may not leave the repository")
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root / relative))
    if target != real_root and real_root not in target.parents:
        raise ContextError(f"context {entry!r}: resolves outside its repository (symlink)")
    return label, target


def build_context_block(entries: list[str], project: ProjectConfig) -> str:
    """``### <label>`` and the text of each context file that exists."""
    parts = []
    for entry in entries:
        label, path = resolve_context(entry, project)
        if not path.is_file():
            continue
        data = path.read_bytes()[:MAX_CONTEXT_FILE_BYTES]
        parts.append(f"### {label}\n{data.decode('utf-8', errors='replace').rstrip()}\n")
    return "\n".join(parts)


def forge_api(project: ProjectConfig) -> str:
    """The forge's repository API base URL, as the footer shows it."""
    return f"{project.forge_url}/api/v1/repos/{project.forge_repo}"


def build_footer(
    project: ProjectConfig, phase_file: str | None, worktree: str, protocol: bool = True
) -> str:
    """The footer; ``protocol`` False leaves out the phase protocol (the SDK/one-shot form)."""
    api = forge_api(project)
    auth = '-H "Authorization: token ${FORGE_TOKEN}"'
    lines = [
        "## Forge API reference",
        f"Base URL: {api}",
        f"Auth header: {auth}",
        f"Read issue: curl -sf {auth} '{api}/issues/{{number}}' | jq '.body'",
        f"Create issue: curl -sf -X POST {auth} -H 'Content-Type: application/json' "
        f'\'{api}/issues\' -d \'{{"title":"...","body":"...","labels":[LABEL_ID]}}\'',
        f"List labels: curl -sf {auth} '{api}/labels'",
        "NEVER echo or include the actual token value in output — always reference ${FORGE_TOKEN}.",
        "## Environment",
        f"PROJECT_REPO_ROOT={project.repo_root}",
        f"WORKTREE={worktree}",
        f"OPS_REPO_ROOT={project.ops_repo_root or ''}",
        f"PRIMARY_BRANCH={project.primary_branch}",
    ]
    if phase_file is not None and "'" in phase_file:
        raise ContextError(f"phase file path {phase_file!r} contains a single quote")
    lines.append(f"PHASE_FILE={phase_file or ''}")
    if phase_file is not None and protocol:
        lines += [
            "## Phase protocol (REQUIRED)",
            "When all work is done:",
            f"echo 'PHASE:done' > '{phase_file}'",
            "On unrecoverable error:",
            f"printf 'PHASE:failed\\nReason: %s\\n' 'describe error' > '{phase_file}'",
        ]
    return "\n".join(lines)


def scratch_instruction(scratch_file: str) -> str:
    """Ask the agent to flush its notes to a scratch file that survives compaction."""
    return "\n".join(
        [
            "## Context scratch file (compaction survival)",
            "Periodically (every 10-15 tool calls), write a summary of:",
            "- What you have discovered so far",
            "- Decisions made and why",
            "- What remains to do",
            f"to: {scratch_file}",
            "If this file existed at session start, its contents have already been injected "
            "into your prompt above.",
            "This file is ephemeral — not evidence or permanent memory, just a compaction "
            "survival mechanism.",
        ]
    )


def scratch_context(scratch_file: Path) -> str:
    """The previous run's scratch notes (at most 8192 bytes), or nothing."""
    try:
        with scratch_file.open("rb") as handle:
            data = handle.read(MAX_SCRATCH_BYTES)
    except OSError:
        return ""
    if not data.strip():
        return ""
    text = data.decode("utf-8", errors="replace")
    return f"## Previous context (from scratch file)\n{text.rstrip()}\n"


def graph_section(report_json: str | None) -> str:
    """The structural-analysis section around a JSON report (empty when there is none)."""
    if not report_json:
        return ""
    return f"## Structural analysis\n```json\n{report_json.strip()}\n```\n"


def build_prompt(
    *,
    run_id: str,
    project: ProjectConfig,
    agent: AgentConfig,
    formula: Formula,
    formula_source: str,
    phase_file: str | None,
    worktree: str,
    protocol: bool = True,
    scratch_file: Path | None = None,
    graph_json: str | None = None,
) -> PromptParts:
    """Assemble the prompt for one run (``protocol`` False: the one-shot footer)."""
    context = build_context_block(context_paths(agent, formula), project)
    footer = build_footer(project, phase_file, worktree, protocol)
    sections = [
        f"You are the {agent.name} agent of project {project.name} "
        f"(formula {formula.name!r}, run {run_id}).",
        "Work through the formula's steps in order.",
        "",
        f"## Formula ({formula_source})",
        formula.text.rstrip(),
        "",
    ]
    if context:
        sections += ["## Context", context]
    if scratch_file is not None:
        previous = scratch_context(scratch_file)
        if previous:
            sections.append(previous)
    graph = graph_section(graph_json)
    if graph:
        sections.append(graph)
    if scratch_file is not None:
        sections += [scratch_instruction(str(scratch_file)), ""]
    sections.append(footer)
    return PromptParts(prompt="\n".join(sections) + "\n", footer=footer)
