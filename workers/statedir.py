"""Private on-disk state: directories of mode 0700, files of mode 0600.

Nothing formulabeat writes lives at a predictable name in a shared directory:
everything is under the configured state dir, and each run gets a directory
with an unpredictable name (``mkdtemp``) inside it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700; refuse a symlink.

    Every directory this creates is 0700, not only the last: ``mkdir(parents=True)``
    gives the parents it makes the umask's mode, so a state dir made as the
    parent of ``runs/`` would be left readable by everyone.
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        # mode is masked by the umask; 0700 with any umask still means 0700 or less.
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
    if path.is_symlink():
        raise OSError(f"{path} is a symlink; refusing to keep private state there")
    os.chmod(path, 0o700)
    return path


def runs_path(state_dir: Path) -> Path:
    """Where this host's run directories (and so its worktrees) are, made or not."""
    return state_dir / "runs"


def runs_dir(state_dir: Path) -> Path:
    """The directory holding one private directory per run on this host (made 0700)."""
    return private_dir(runs_path(state_dir))


def new_run_dir(state_dir: Path, run_id: str) -> Path:
    """A fresh private directory for one run: ``<state>/runs/<id8>-<random>``."""
    return Path(tempfile.mkdtemp(prefix=f"{run_id[:8]}-", dir=runs_dir(state_dir)))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (never through a symlink)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
