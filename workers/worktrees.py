"""Git worktrees: one per run, in the run's private directory (GitPython).

Every git call has a timeout (GitPython's ``kill_after_timeout``) so a hung
git cannot hold a worker slot forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import git

from workers.errors import RepoError
from workers.run import now_iso
from workers.rundir import PRESERVED
from workers.statedir import write_private

GIT_TIMEOUT = 120.0


def require_git() -> None:
    """A RepoError unless a git executable is on PATH."""
    if shutil.which("git") is None:
        raise RepoError("git not found on PATH: install git (apt-get install git)")


def open_repo(repo_root: Path) -> git.Repo:
    """The git repository at ``repo_root``, or a RepoError that says what is wrong."""
    require_git()
    if not repo_root.exists():
        raise RepoError(f"repository {repo_root} does not exist")
    try:
        return git.Repo(repo_root)
    except git.InvalidGitRepositoryError:
        raise RepoError(f"{repo_root} is not a git repository") from None
    except git.NoSuchPathError:
        raise RepoError(f"repository {repo_root} does not exist") from None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def refused(repo_root: Path) -> RepoError:
    """git's "dubious ownership" refusal of ``repo_root``, with both ways out."""
    try:
        owner = _user(repo_root.stat().st_uid)
    except OSError:
        owner = "another user"
    me = _user(os.geteuid())
    return RepoError(
        f"git refuses {repo_root}: it is owned by {owner}, not by {me} who runs the worker "
        f"(git's 'dubious ownership'): chown -R {me} {repo_root}, or "
        f"git config --global --add safe.directory {repo_root} as {me}"
    )


def git_failure(what: str, repo_root: Path, exc: git.GitCommandError) -> RepoError:
    """A failed git command in ``repo_root``: git's refusal of its owner said with the fix."""
    if "dubious ownership" in str(exc.stderr):
        return refused(repo_root)
    return RepoError(f"{what} in {repo_root} failed: {_stderr(exc)}")


def unwritable(repo_root: Path, path: Path) -> RepoError:
    """``path`` in the repository cannot be written, and each run adds a worktree there."""
    me = _user(os.geteuid())
    return RepoError(
        f"{path} is not writable by {me}, who runs the worker: each run adds a git worktree "
        f"there, so {me} needs write access to {repo_root} (chown -R {me} {repo_root})"
    )


def repo_problem(repo_root: Path) -> str | None:
    """What would stop a run from adding a worktree to ``repo_root``, with the fix; else None."""
    try:
        repo = open_repo(repo_root)
        repo.git.rev_parse("--git-common-dir", kill_after_timeout=GIT_TIMEOUT)
    except RepoError as exc:
        return str(exc)
    except git.GitCommandError as exc:
        return str(git_failure("git rev-parse", repo_root, exc))
    common = Path(repo.common_dir)
    for path in (common, common / "objects", common / "refs"):
        if path.exists() and not os.access(path, os.W_OK):
            return str(unwritable(repo_root, path))
    return None


def worktree_path(run_dir: Path, run_id: str) -> Path:
    """Where a run's worktree goes: named for the run, so that git's record of
    it (``.git/worktrees/<name>``) says which run it belongs to."""
    return run_dir / f"worktree-{run_id}"


@contextlib.contextmanager
def worktree_lock(repo: git.Repo, timeout: float = GIT_TIMEOUT) -> Iterator[None]:
    """Hold the repository's worktree lock: one ``git worktree`` change at a time.

    git 2.39 reads every ``.git/worktrees/*/commondir`` while it adds a
    worktree, and fails on an entry another ``worktree add`` has created but
    not yet filled in; runs starting side by side (threads, or hosts sharing
    the repository) take turns here instead.
    """
    path = Path(repo.common_dir) / "formulabeat-worktrees.lock"
    try:
        handle = open(path, "a")  # noqa: SIM115 (the with below closes it)
    except OSError as exc:
        if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
            raise unwritable(Path(repo.working_dir), path) from None
        raise RepoError(f"cannot open {path}: {exc.strerror}") from None
    with handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RepoError(
                        f"{path} stayed locked for {timeout:g} s: another git worktree change hangs"
                    ) from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_worktree(repo_root: Path, path: Path, ref: str = "HEAD") -> Path:
    """Create a detached worktree of ``ref`` at ``path`` (which must not exist yet)."""
    repo = open_repo(repo_root)
    if path.exists():
        raise RepoError(f"worktree path {path} is already taken")
    try:
        with worktree_lock(repo):
            repo.git.worktree("add", "--detach", str(path), ref, kill_after_timeout=GIT_TIMEOUT)
    except git.GitCommandError as exc:
        raise git_failure("git worktree add", repo_root, exc) from None
    return path


def fresh_ref(repo_root: Path, primary_branch: str) -> str:
    """``origin/<primary>`` after a fetch; the local branch when there is no origin."""
    repo = open_repo(repo_root)
    if "origin" not in [remote.name for remote in repo.remotes]:
        return primary_branch
    try:
        repo.git.fetch("origin", primary_branch, kill_after_timeout=GIT_TIMEOUT)
    except git.GitCommandError as exc:
        raise git_failure(f"git fetch origin {primary_branch}", repo_root, exc) from None
    return f"origin/{primary_branch}"


def remove_worktree(repo_root: Path, path: Path) -> None:
    """Remove a run's worktree; a directory already gone is pruned from git's list."""
    with contextlib.suppress(RepoError, git.GitCommandError):
        repo = open_repo(repo_root)
        with worktree_lock(repo):
            if path.exists():
                with contextlib.suppress(git.GitCommandError):  # not this repo's
                    repo.git.worktree(
                        "remove", "--force", str(path), kill_after_timeout=GIT_TIMEOUT
                    )
            shutil.rmtree(path, ignore_errors=True)
            repo.git.worktree("prune", kill_after_timeout=GIT_TIMEOUT)
    shutil.rmtree(path, ignore_errors=True)


def preserve(run_dir: Path, reason: str) -> Path:
    """Keep a run's directory for debugging, with a marker saying why and when."""
    marker = run_dir / PRESERVED
    write_private(marker, json.dumps({"reason": reason, "at": now_iso()}) + "\n")
    return marker


def _stderr(exc: git.GitCommandError) -> str:
    text = str(exc.stderr or exc).strip()
    return text.removeprefix("stderr:").strip().strip("'").strip()


def run_dir_age(run_dir: Path, now: float) -> float:
    """Seconds since anything directly in ``run_dir`` last changed."""
    newest = run_dir.stat().st_mtime
    for entry in run_dir.iterdir():
        with contextlib.suppress(OSError):
            newest = max(newest, entry.lstat().st_mtime)
    return now - newest


def cleanup_stale(
    runs_root: Path,
    repo_roots: list[Path],
    max_age: float,
    preserved_max_age: float,
    in_use: set[Path],
    now: float,
) -> list[Path]:
    """Remove run directories older than ``max_age`` (preserved ones after
    ``preserved_max_age``) unless a live tmux pane works in them; then prune
    each repository's worktree list. Returns what was removed."""
    removed: list[Path] = []
    if not runs_root.is_dir():
        return removed
    for run_dir in sorted(runs_root.iterdir()):
        if not run_dir.is_dir() or run_dir.is_symlink():
            continue
        if any(path == run_dir or run_dir in path.parents for path in in_use):
            continue
        limit = preserved_max_age if (run_dir / PRESERVED).exists() else max_age
        try:
            if run_dir_age(run_dir, now) < limit:
                continue
        except OSError:
            continue
        for worktree in run_dir.glob("worktree*"):
            for root in repo_roots:
                if worktree.exists():
                    remove_worktree(root, worktree)
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(run_dir)
    for root in repo_roots:
        with contextlib.suppress(RepoError, git.GitCommandError):
            repo = open_repo(root)
            with worktree_lock(repo):
                repo.git.worktree("prune", kill_after_timeout=GIT_TIMEOUT)
    return removed
