"""Owning a server process: signal handling, allocator tuning, a bounded exit (layer 6).

Both kinds of process that serve run the same code here: the single process started by
:func:`trioserve.runner.run_config` and each worker process
(``python -m trioserve.workers.worker``). :func:`serve_until_signal` turns SIGINT/SIGTERM into
a graceful drain (a second signal cancels at once), :func:`tune_allocator` keeps freed heap
memory in the process, :func:`freeze_startup_objects` takes what startup made out of the
garbage collector's walks, and :func:`arm_exit_watchdog` bounds how long an app's stuck thread
can hold the exit. A program embedding :func:`trioserve.serve` owns its signals, allocator
and exit, so none of this runs there.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Final, NoReturn

import trio

from ..admin import ServerHealth, serve_admin
from ..asgi_types import ASGIApp
from ..config import Config
from ..server import Server, serve

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

# These lines keep the logger they had when this code lived in runner.py: the startup line
# ("trioserve running on ...") and the signal lines are what a --log-config filters on.
logger = logging.getLogger("trioserve.runner")

_M_TRIM_THRESHOLD: Final = -1  # glibc's mallopt() parameter number
TRIM_THRESHOLD: Final = 4 * 1024 * 1024
# After the server stopped: how long the interpreter's exit may wait for the app's threads.
EXIT_TIMEOUT: Final = 1.0


def arm_exit_watchdog(code: int, timeout: float = EXIT_TIMEOUT) -> None:
    """End the process with ``code`` if it has not exited ``timeout`` seconds from now.

    Called by the process entry points (the CLI and ``trioserve.workers.worker``) once the server
    has stopped, just before the interpreter exits. That exit joins every non-daemon thread
    first (``concurrent.futures`` pools included, through their ``threading`` exit hook),
    and a thread the app started may never end: a view blocked in ``time.sleep(3600)`` or
    a socket read kept a2wsgi's pool thread, and with it the process, alive after SIGTERM
    until a second signal (or Kubernetes' SIGKILL). The graceful timeout already bounded
    the app's requests; past ``timeout`` the remaining threads are named in a warning and
    the process ends with ``os._exit`` (exit handlers still waiting behind the stuck thread
    are skipped; log handlers are flushed first). A process that exits in time is not
    affected: the watchdog is a daemon thread and ends with it. An embedding program that
    calls :func:`run` owns its exit and is never armed.
    """

    def watch() -> None:
        time.sleep(timeout)
        me = threading.current_thread()
        stuck = [
            thread.name
            for thread in threading.enumerate()
            if thread is not me and not thread.daemon and thread is not threading.main_thread()
        ]
        logger.warning(
            "Exiting without waiting for %d application thread(s) still running %.1fs after "
            "shutdown: %s",
            len(stuck),
            timeout,
            ", ".join(stuck) or "(the main thread's exit handlers)",
        )
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    threading.Thread(target=watch, name="trioserve-exit-watchdog", daemon=True).start()


def freeze_startup_objects() -> None:
    """In a server process we own, once the app is loaded and lifespan startup is done:
    collect once, then move every object alive (modules, the app, what startup built) into
    the collector's permanent generation (``gc.freeze()``).

    They live as long as the process. Left in the oldest generation, each full collection
    walks all of them again (tens of thousands of objects for a FastAPI app with its
    imports), a pause that falls on whichever request happens to trigger it and that grows
    with every import. Not done by ``serve()``: a program embedding trioserve owns its
    collector.
    """
    gc.collect()
    gc.freeze()


def tune_allocator() -> None:
    """In a server process we own: keep freed heap memory up to 4 MiB instead of 128 KiB.

    With glibc's default trim threshold, a request or response body of a few dozen KiB
    freed at the top of the heap is handed back to the kernel, and the next request maps
    it again: a 64 KiB echo then costs ~15 page faults and a brk call per request (a
    fifth of its CPU time). Not done by ``serve()``: a program embedding trioserve owns
    its allocator settings. A no-op where the C library is not glibc.
    """
    with contextlib.suppress(ValueError, OSError, AttributeError):
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return
        ctypes.CDLL(None).mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


async def serve_until_signal(
    app: ASGIApp,
    config: Config,
    startup_line: bool = True,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM: the first drains gracefully, the second cancels.

    A signal that arrives during lifespan startup cancels at once. Signal handlers are
    installed only for the duration of this call and restored after. ``task_status``
    receives the :class:`Server` once it serves (worker processes report readiness).
    With ``--admin-bind``/``--admin-uds`` the admin endpoints are served beside it, from
    before lifespan startup until the server has stopped.

    Raises:
        LifespanError, BindError: from :func:`serve`, unwrapped from trio's exception
            group so that callers (the CLI's exit codes) see the exception itself.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                watcher = _SignalWatcher(nursery.cancel_scope)
                nursery.start_soon(watcher.run, signals)
                health = ServerHealth()
                if config.has_admin:  # up during lifespan startup too: /readyz says 503
                    await nursery.start(serve_admin, config, health)
                server: Server = await nursery.start(serve, app, config)
                watcher.server = server
                health.serving(server)
                freeze_startup_objects()
                if startup_line:
                    for url in server.urls:
                        logger.info("trioserve running on %s (Press CTRL+C to quit)", url)
                task_status.started(server)
                await server.wait_stopped()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _raise_single(group)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the only exception inside ``group``, or the group itself."""
    leaves = list(_leaves(group))
    if len(leaves) == 1:
        raise leaves[0]
    raise group


class _SignalWatcher:
    def __init__(self, cancel_scope: trio.CancelScope) -> None:
        self.cancel_scope = cancel_scope
        self.server: Server | None = None
        self.count = 0

    async def run(self, signals: Any) -> None:
        async for signum in signals:
            self.count += 1
            name = signal.Signals(signum).name
            if self.count == 1 and self.server is not None:
                logger.info("Received %s, shutting down gracefully", name)
                self.server.shutdown_nowait()
            else:
                logger.warning("Received %s, exiting now", name)
                self.cancel_scope.cancel()
                return
