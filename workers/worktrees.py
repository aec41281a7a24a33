"""Git worktrees: one per run, in the run's private directory (GitPython).

Every git call has a timeout (GitPython's ``kill_after_timeout``) so a hung
git cannot hold a worker slot forever.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import git

from workers.errors import RepoError
from workers.run import now_iso
from workers.statedir import write_private

GIT_TIMEOUT = 120.0
PRESERVED_MARKER = "PRESERVED.json"


def open_repo(repo_root: Path) -> git.Repo:
    """The git repository at ``repo_root``, or a RepoError that says what is wrong."""
    if not repo_root.exists():
        raise RepoError(f"repository {repo_root} does not exist")
    try:
        return git.Repo(repo_root)
    except git.InvalidGitRepositoryError:
        raise RepoError(f"{repo_root} is not a git repository") from None
    except git.NoSuchPathError:
        raise RepoError(f"repository {repo_root} does not exist") from None


def add_worktree(repo_root: Path, path: Path, ref: str = "HEAD") -> Path:
    """Create a detached worktree of ``ref`` at ``path`` (which must not exist yet)."""
    repo = open_repo(repo_root)
    if path.exists():
        raise RepoError(f"worktree path {path} is already taken")
    try:
        repo.git.worktree("add", "--detach", str(path), ref, kill_after_timeout=GIT_TIMEOUT)
    except git.GitCommandError as exc:
        raise RepoError(f"git worktree add in {repo_root} failed: {_stderr(exc)}") from None
    return path


def remove_worktree(repo_root: Path, path: Path) -> None:
    """Remove a run's worktree; a directory already gone is pruned from git's list."""
    with contextlib.suppress(RepoError, git.GitCommandError):
        repo = open_repo(repo_root)
        if path.exists():
            repo.git.worktree("remove", "--force", str(path), kill_after_timeout=GIT_TIMEOUT)
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(RepoError, git.GitCommandError):
        open_repo(repo_root).git.worktree("prune", kill_after_timeout=GIT_TIMEOUT)


def preserve(run_dir: Path, reason: str) -> Path:
    """Keep a run's directory for debugging, with a marker saying why and when."""
    marker = run_dir / PRESERVED_MARKER
    write_private(marker, json.dumps({"reason": reason, "at": now_iso()}) + "\n")
    return marker


def _stderr(exc: git.GitCommandError) -> str:
    text = str(exc.stderr or exc).strip()
    return text.removeprefix("stderr:").strip().strip("'").strip()
