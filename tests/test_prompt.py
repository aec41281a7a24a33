"""The prompt: formula, context files, scratch notes, analysis and the footer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from workers.analysis import structural_report
from workers.config import AgentConfig, ProjectConfig
from workers.errors import ContextError
from workers.formula import parse_formula
from workers.prompt import (
    MAX_SCRATCH_BYTES,
    build_context_block,
    build_footer,
    build_prompt,
    resolve_context,
)

FORMULA = """name = "planner"
[context]
files = ["docs/plan.md"]
[[steps]]
id = "a"
title = "Plan"
description = "Make a plan."
"""


@pytest.fixture
def project(tmp_path: Path) -> ProjectConfig:
    repo, ops = tmp_path / "repo", tmp_path / "ops"
    (repo / "docs").mkdir(parents=True)
    ops.mkdir()
    (repo / "README.md").write_text("read me\n")
    (repo / "docs" / "plan.md").write_text("the plan\n")
    (ops / "journal.md").write_text("journal text\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    return ProjectConfig(
        name="proj",
        repo_root=repo,
        ops_repo_root=ops,
        forge_url="http://forge:3000",
        forge_repo="acme/proj",
        primary_branch="main",
    )


def agent(**options: object) -> AgentConfig:
    return AgentConfig(
        name="planner",
        project="proj",
        formula=Path("f.toml"),
        schedule="* * * * *",
        **options,  # type: ignore[arg-type]
    )


def test_footer_keeps_the_originals_text_contract(project: ProjectConfig) -> None:
    footer = build_footer(project, "/state/runs/x/phase", "/state/runs/x/worktree")
    api = "http://forge:3000/api/v1/repos/acme/proj"
    assert "## Forge API reference" in footer
    assert f"Base URL: {api}" in footer
    assert 'Auth header: -H "Authorization: token ${FORGE_TOKEN}"' in footer
    assert "NEVER echo or include the actual token value" in footer
    assert "PRIMARY_BRANCH=main" in footer
    assert "PHASE_FILE=/state/runs/x/phase" in footer
    assert "## Phase protocol (REQUIRED)" in footer
    assert "echo 'PHASE:done' > '/state/runs/x/phase'" in footer.splitlines()
    assert (
        "printf 'PHASE:failed\\nReason: %s\\n' 'describe error' > '/state/runs/x/phase'"
        in footer.splitlines()
    )


def test_sdk_footer_has_no_phase_protocol(project: ProjectConfig) -> None:
    footer = build_footer(project, "/p/phase", "/w", protocol=False)
    assert "## Phase protocol" not in footer
    assert "echo 'PHASE:done'" not in footer
    assert "## Forge API reference" in footer and "## Environment" in footer


def test_the_token_value_never_enters_the_prompt(
    project: ProjectConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGE_TOKEN", "tok-SECRET-1234")
    formula = parse_formula(FORMULA, Path("f.toml"))
    parts = build_prompt(
        run_id="r1",
        project=project,
        agent=agent(),
        formula=formula,
        formula_source="formulas/",
        phase_file="/p/phase",
        worktree="/w",
    )
    assert "tok-SECRET-1234" not in parts.prompt
    assert "${FORGE_TOKEN}" in parts.prompt


def test_context_block_labels_each_existing_file(project: ProjectConfig) -> None:
    block = build_context_block(["README.md", "missing.md", "ops:journal.md"], project)
    assert block == "### README.md\nread me\n\n### journal.md\njournal text\n"


def test_prompt_includes_formula_and_both_context_lists(project: ProjectConfig) -> None:
    formula = parse_formula(FORMULA, Path("f.toml"))
    parts = build_prompt(
        run_id="r1",
        project=project,
        agent=agent(context=("README.md",)),
        formula=formula,
        formula_source="formulas/",
        phase_file="/p/phase",
        worktree="/w",
    )
    assert formula.text.strip() in parts.prompt
    assert parts.prompt.index("### README.md") < parts.prompt.index("### docs/plan.md")
    assert parts.prompt.endswith(parts.footer + "\n")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("../secret.txt", "'..' may not leave the repository"),
        ("docs/../../secret.txt", "'..' may not leave the repository"),
        ("/etc/passwd", "must be a path relative to its repository"),
        ("ops:../secret.txt", "'..' may not leave the repository"),
        ("ops:/etc/hostname", "must be a path relative to its repository"),
        ("", "must be a path relative to its repository"),
    ],
)
def test_context_paths_may_not_leave_their_repo(
    project: ProjectConfig, entry: str, problem: str
) -> None:
    with pytest.raises(ContextError, match=problem):
        resolve_context(entry, project)


def test_context_symlink_out_of_the_repo_is_refused(project: ProjectConfig) -> None:
    os.symlink(project.repo_root.parent / "secret.txt", project.repo_root / "link.md")
    with pytest.raises(ContextError, match="resolves outside its repository"):
        build_context_block(["link.md"], project)
    # A symlink that stays inside is fine.
    os.symlink(project.repo_root / "README.md", project.repo_root / "inner.md")
    assert "read me" in build_context_block(["inner.md"], project)


def test_ops_context_without_an_ops_repo_is_refused(project: ProjectConfig) -> None:
    bare = ProjectConfig(
        name="p",
        repo_root=project.repo_root,
        ops_repo_root=None,
        forge_url="http://x",
        forge_repo="p",
        primary_branch="main",
    )
    with pytest.raises(ContextError, match="no ops_repo_root configured"):
        resolve_context("ops:journal.md", bare)


def test_scratch_notes_are_reinjected_capped_at_8192_bytes(
    project: ProjectConfig, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch.md"
    formula = parse_formula(FORMULA, Path("f.toml"))

    def prompt() -> str:
        return build_prompt(
            run_id="r1",
            project=project,
            agent=agent(),
            formula=formula,
            formula_source="formulas/",
            phase_file="/p/phase",
            worktree="/w",
            scratch_file=scratch,
        ).prompt

    first = prompt()
    assert "## Previous context (from scratch file)" not in first
    assert "## Context scratch file (compaction survival)" in first
    assert f"to: {scratch}" in first
    scratch.write_text("N" * 10000)
    second = prompt()
    assert "## Previous context (from scratch file)" in second
    injected = second.split("## Previous context (from scratch file)\n", 1)[1].split("\n", 1)[0]
    assert injected == "N" * MAX_SCRATCH_BYTES


def test_structural_analysis_is_embedded_and_its_failure_is_not_fatal(
    project: ProjectConfig,
) -> None:
    import dataclasses

    ok = dataclasses.replace(
        project,
        graph_command=f"{sys.executable} -c 'import json; print(json.dumps({{\"stats\": 3}}))'",
    )
    report = structural_report(ok)
    assert report is not None and json.loads(report) == {"stats": 3}
    failing = dataclasses.replace(
        project, graph_command=f"{sys.executable} -c 'raise SystemExit(3)'"
    )
    assert structural_report(failing) is None
    missing = dataclasses.replace(project, graph_command="/no/such/analyser --json")
    assert structural_report(missing) is None
    not_json = dataclasses.replace(project, graph_command="echo hello")
    assert structural_report(not_json) is None
