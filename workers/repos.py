"""The agent's ``.profile`` repository and the project's ops repository (GitPython).

Both are cloned or pulled with the forge token passed as an HTTP header by
environment (see :mod:`workers.forge`), so ``.git/config`` and ``git remote``
only ever show the plain URL.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import git

from workers.errors import FormulaError, RepoError
from workers.forge import git_auth_env, repo_url, resolve_identity
from workers.statedir import private_dir
from workers.worktrees import GIT_TIMEOUT, open_repo

log = logging.getLogger("formulabeat.repos")
_IDENTITY = git.Actor("formulabeat", "formulabeat@localhost")


def _scrub(text: str, env: dict[str, str]) -> str:
    for value in env.values():
        if len(value) > 8:
            text = text.replace(value, "***")
    return text


def _git_error(what: str, exc: git.GitCommandError, env: dict[str, str]) -> RepoError:
    stderr = str(exc.stderr or "").strip().removeprefix("stderr:").strip().strip("'")
    return RepoError(f"{what} failed: {_scrub(stderr, env) or 'exit status ' + str(exc.status)}")


def _run(repo: git.Repo, env: dict[str, str], *args: str) -> str:
    with repo.git.custom_environment(**env):
        return str(repo.git.execute(["git", *args], kill_after_timeout=GIT_TIMEOUT))


def ensure_clone(url: str, path: Path, branch: str | None, env: dict[str, str]) -> Path:
    """Clone ``url`` into ``path``, or fetch and fast-forward the clone already there."""
    if (path / ".git").exists():
        repo = open_repo(path)
        try:
            _run(repo, env, "fetch", "origin")
            if branch:
                _run(repo, env, "checkout", branch)
            _run(repo, env, "pull", "--ff-only")
        except git.GitCommandError as exc:
            raise _git_error(f"updating {path}", exc, env) from None
        return path
    private_dir(path.parent)
    argv = [
        "git",
        "clone",
        "--quiet",
        *(["--branch", branch] if branch else []),
        "--",
        url,
        str(path),
    ]
    try:
        # Repo.clone_from streams through a process with no timeout; execute() has one.
        git.Git().execute(argv, env={**os.environ, **env}, kill_after_timeout=GIT_TIMEOUT)
    except git.GitCommandError as exc:
        raise _git_error(f"cloning {url}", exc, env) from None
    return path


def load_profile_formula(
    forge_url: str, token: str | None, cache_dir: Path, fallback: Path, login: str | None = None
) -> tuple[Path, str]:
    """The agent's formula: ``<login>/.profile``'s formula.toml, else ``fallback``.

    Returns the path and its source (``.profile (<login>)`` or ``formulas/``).
    ``login`` saves the identity request when the caller has resolved it.
    """
    if token:
        login = login or resolve_identity(forge_url, token)
        if login:
            env = git_auth_env(login, token)
            path = cache_dir / login
            try:
                ensure_clone(repo_url(forge_url, f"{login}/.profile"), path, None, env)
            except RepoError as exc:
                log.warning("no .profile repo for %s, using %s: %s", login, fallback, exc)
            else:
                formula = path / "formula.toml"
                if formula.is_file():
                    log.info("formula source: .profile (%s)", formula)
                    return formula, f".profile ({login})"
                log.warning(".profile of %s has no formula.toml, using %s", login, fallback)
    if token and not fallback.is_file():
        raise FormulaError(f"formula not found: neither a .profile formula.toml nor {fallback}")
    # Without a token there is no .profile to try: load_formula says what is missing.
    return fallback, "formulas/"


def ensure_ops_repo(
    ops_root: Path, forge_url: str, ops_repo: str | None, branch: str, env: dict[str, str]
) -> None:
    """Pull the ops repository (warning on failure), or clone it when it is absent."""
    if (ops_root / ".git").exists():
        repo = open_repo(ops_root)
        for args in (
            ("fetch", "origin", branch),
            ("checkout", branch),
            ("pull", "--ff-only", "origin", branch),
        ):
            try:
                _run(repo, env, *args)
            except git.GitCommandError as exc:
                log.warning("ops repo %s: git %s: %s", ops_root, args[0], _git_error("", exc, env))
        return
    if ops_repo:
        ensure_clone(repo_url(forge_url, ops_repo), ops_root, branch, env)


def ops_commit_and_push(
    ops_root: Path, message: str, files: list[str], branch: str, env: dict[str, str]
) -> bool:
    """Stage ``files`` (all changes when empty), commit if anything changed, push."""
    repo = open_repo(ops_root)
    for name in files:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise RepoError(f"ops file {name!r} must be a path inside the ops repository")
    try:
        if files:
            repo.git.add("--", *files, kill_after_timeout=GIT_TIMEOUT)
        else:
            repo.git.add("-A", kill_after_timeout=GIT_TIMEOUT)
        if repo.head.is_valid() and not repo.index.diff("HEAD"):
            return False
        repo.index.commit(message, author=_IDENTITY, committer=_IDENTITY)
        _run(repo, env, "push", "origin", f"HEAD:{branch}")
    except git.GitCommandError as exc:
        raise _git_error(f"pushing the ops repo {ops_root}", exc, env) from None
    return True
