"""Watch source files for ``--reload`` and report changes (layer 4, beside ``supervisor``).

The supervisor runs :func:`watch_changes` as one of its tasks and restarts the worker
process when it reports a change. Two mechanisms, named as uvicorn names them (the startup
line says which one runs, :func:`choose_reloader` picks it):

* ``WatchFiles``: ``watchfiles.awatch`` (a dependency), which runs on trio through anyio
  (its Rust watcher waits in a worker thread).
* ``StatReload``: when ``watchfiles`` cannot be imported (a platform without its wheels, a
  trimmed image), every ``--reload-delay`` seconds a worker thread walks the watched
  directories and compares each watched file's modification time and size with the last
  walk. It costs a directory walk per period instead of kernel notifications, and it follows
  the same dirs, includes and excludes (uvicorn's StatReload ignores the globs).

What is watched: ``--reload-dir`` directories (default: the current directory); files
matching a ``--reload-include`` glob (always ``*.py``) and no ``--reload-exclude`` glob;
never anything under ``.venv``, ``.git`` or ``__pycache__``. A glob is matched against the
file name and against the path relative to the watched directory, so ``*.html`` and
``templates/*.html`` both work; an exclude glob also matches directory names (``build``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import aclosing
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Final, Literal

import trio

from ..config import Config

logger = logging.getLogger(__name__)

DEFAULT_INCLUDES: Final = ("*.py",)
ALWAYS_EXCLUDED_DIRS: Final = (".venv", ".git", "__pycache__")
# How long the watcher thread waits before handing control back (bounds how long
# cancellation takes, since a thread cannot be interrupted).
WATCH_TIMEOUT_MS: Final = 500

Reloader = Literal["WatchFiles", "StatReload"]
# A file's state as StatReload compares it: (st_mtime_ns, st_size).
FileState = tuple[int, int]


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

    def enters(self, directory: Path) -> bool:
        """Whether a directory walk should descend into ``directory`` (StatReload).

        A directory named in :data:`ALWAYS_EXCLUDED_DIRS` or matching an exclude glob holds
        nothing :meth:`accepts` would take, so the walk skips it whole.
        """
        name = directory.name
        return name not in ALWAYS_EXCLUDED_DIRS and not any(
            fnmatch(name, pattern) for pattern in self.excludes
        )

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


def choose_reloader(config: Config) -> Reloader:
    """``"WatchFiles"`` when ``watchfiles`` imports, else ``"StatReload"`` (logs one line)."""
    try:
        import watchfiles  # noqa: F401  (only whether it imports)
    except ImportError as exc:
        logger.warning(
            "watchfiles could not be imported (%s); polling the watched files every %gs instead.",
            exc,
            config.reload_delay,
        )
        return "StatReload"
    return "WatchFiles"


async def watch_changes(
    config: Config,
    on_change: Callable[[list[str]], None],
    reloader: Reloader = "WatchFiles",
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_change(paths)`` after each batch of relevant file changes.

    Args:
        config: ``reload_dirs``, ``reload_includes``, ``reload_excludes``, ``reload_delay``.
        on_change: called with the changed paths, shown relative to their watched directory.
        reloader: the mechanism, from :func:`choose_reloader`.

    ``task_status.started()`` comes once the watcher is installed (StatReload: once the
    first walk is done), so an edit made after that is never missed. Returns only when
    cancelled (within about half a second: the watcher thread is given back control that
    often; a StatReload walk in progress is abandoned).
    """
    dirs = watched_dirs(config)
    watch_filter = ReloadFilter(dirs, config.reload_includes, config.reload_excludes)
    if reloader == "StatReload":
        await _poll_changes(dirs, watch_filter, config.reload_delay, on_change, task_status)
        return
    import watchfiles

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
                _announce(dirs, task_status)
            if changes:
                on_change(sorted({_shown(Path(path), dirs) for _, path in changes}))


async def _poll_changes(
    dirs: Sequence[Path],
    watch_filter: ReloadFilter,
    interval: float,
    on_change: Callable[[list[str]], None],
    task_status: trio.TaskStatus[None],
) -> None:
    """StatReload: walk ``dirs`` every ``interval`` seconds; report added, changed and
    removed files. The walk runs in a thread, so a large tree never stalls the supervisor
    (its signal handling and worker health checks)."""
    snapshot = await trio.to_thread.run_sync(scan_files, dirs, watch_filter, abandon_on_cancel=True)
    _announce(dirs, task_status)
    while True:
        await trio.sleep(interval)
        current = await trio.to_thread.run_sync(
            scan_files, dirs, watch_filter, abandon_on_cancel=True
        )
        changed = {p for p in snapshot.keys() | current.keys() if snapshot.get(p) != current.get(p)}
        snapshot = current
        if changed:
            on_change(sorted({_shown(path, dirs) for path in changed}))


def scan_files(dirs: Sequence[Path], watch_filter: ReloadFilter) -> dict[Path, FileState]:
    """The state of every file under ``dirs`` that ``watch_filter`` accepts (StatReload).

    Symbolic links to directories are not followed; unreadable directories and files that
    vanish during the walk are skipped (a vanished file shows up as removed next time).
    """
    found: dict[Path, FileState] = {}
    for root in dirs:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if watch_filter.enters(here / d)]
            for name in filenames:
                path = here / name
                if path in found or not watch_filter.accepts(path):
                    continue
                try:
                    stat = path.stat()
                except OSError:
                    continue
                found[path] = (stat.st_mtime_ns, stat.st_size)
    return found


def _announce(dirs: Sequence[Path], task_status: trio.TaskStatus[None]) -> None:
    logger.info("Will watch for changes in these directories: %s", [str(d) for d in dirs])
    task_status.started()


def _shown(path: Path, roots: Sequence[Path]) -> str:
    return str(_relative_to_any(path, roots) or path)


def _relative_to_any(path: Path, roots: Sequence[Path]) -> Path | None:
    """``path`` relative to the first of ``roots`` that contains it."""
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root)
    return None
