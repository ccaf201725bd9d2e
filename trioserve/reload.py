"""Watch source files for ``--reload`` and report changes (layer 4, beside ``supervisor``).

The supervisor runs :func:`watch_changes` as one of its tasks and restarts the worker
process when it reports a change. Watching is done by ``watchfiles.awatch``, which runs on
trio through anyio (its Rust watcher waits in a worker thread).

What is watched: ``--reload-dir`` directories (default: the current directory); files
matching a ``--reload-include`` glob (always ``*.py``) and no ``--reload-exclude`` glob;
never anything under ``.venv``, ``.git`` or ``__pycache__``. A glob is matched against the
file name and against the path relative to the watched directory, so ``*.html`` and
``templates/*.html`` both work; an exclude glob also matches directory names (``build``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import aclosing
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Final

import trio

from .config import Config

logger = logging.getLogger(__name__)

DEFAULT_INCLUDES: Final = ("*.py",)
ALWAYS_EXCLUDED_DIRS: Final = (".venv", ".git", "__pycache__")
# How long the watcher thread waits before handing control back (bounds how long
# cancellation takes, since a thread cannot be interrupted).
WATCH_TIMEOUT_MS: Final = 500


class ReloadFilter:
    """Decide whether a changed path should trigger a reload (a ``watchfiles`` filter)."""

    def __init__(
        self, roots: Sequence[Path], includes: Sequence[str], excludes: Sequence[str]
    ) -> None:
        self.roots = list(roots)
        self.includes = (*DEFAULT_INCLUDES, *(p for p in includes if p not in DEFAULT_INCLUDES))
        self.excludes = tuple(excludes)

    def __call__(self, change: Any, path: str) -> bool:
        return self.accepts(Path(path))

    def accepts(self, path: Path) -> bool:
        relative = self._relative(path)
        parts = relative.parts
        if any(part in ALWAYS_EXCLUDED_DIRS for part in parts[:-1]):
            return False
        text = relative.as_posix()
        for pattern in self.excludes:
            if fnmatch(text, pattern) or any(fnmatch(part, pattern) for part in parts):
                return False
        return any(fnmatch(path.name, p) or fnmatch(text, p) for p in self.includes)

    def _relative(self, path: Path) -> Path:
        return _relative_to_any(path, self.roots) or Path(path.name)


def watched_dirs(config: Config) -> list[Path]:
    """The directories to watch: ``--reload-dir`` (existing ones) or the current directory."""
    dirs: list[Path] = []
    for entry in config.reload_dirs or (".",):
        path = Path(entry).resolve()
        if not path.is_dir():
            logger.warning("Reload directory %s does not exist; ignoring it.", entry)
            continue
        if path not in dirs:
            dirs.append(path)
    return dirs or [Path.cwd()]


async def watch_changes(
    config: Config,
    on_change: Callable[[list[str]], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_change(paths)`` after each batch of relevant file changes.

    ``task_status.started()`` comes once the watcher is installed, so an edit made after
    that is never missed. Returns only when cancelled (within about half a second: the
    watcher thread is given back control that often).
    """
    import watchfiles

    dirs = watched_dirs(config)
    watch_filter = ReloadFilter(dirs, config.reload_includes, config.reload_excludes)
    step_ms = max(1, int(config.reload_delay * 1000))
    started = False
    watcher = watchfiles.awatch(
        *dirs,
        watch_filter=watch_filter,
        step=step_ms,
        rust_timeout=WATCH_TIMEOUT_MS,
        yield_on_timeout=True,
    )
    async with aclosing(watcher):
        async for changes in watcher:
            if not started:
                # The first yield (a timeout or a change) proves the watcher is installed.
                started = True
                logger.info(
                    "Will watch for changes in these directories: %s", [str(d) for d in dirs]
                )
                task_status.started()
            if changes:
                on_change(sorted({_shown(Path(path), dirs) for _, path in changes}))


def _shown(path: Path, roots: Sequence[Path]) -> str:
    return str(_relative_to_any(path, roots) or path)


def _relative_to_any(path: Path, roots: Sequence[Path]) -> Path | None:
    """``path`` relative to the first of ``roots`` that contains it."""
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root)
    return None
