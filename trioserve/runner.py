"""run(): Config → logging → app → trio.run(serve) with signal handling (layer 4).

The runner owns the process: it installs SIGINT/SIGTERM handling (first signal: graceful
drain; second: cancel at once), loads ``--env-file`` and hands over to the supervisor
when ``--workers`` > 1 or ``--reload``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final, NoReturn

import trio

from .app.asyncio_bridge import import_trio_asyncio
from .app.loading import load_app
from .asgi_types import ASGIApp
from .config import Config
from .errors import ConfigError
from .logs import configure_logging
from .server import Server, serve
from .tls import load_tls

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD: Final = -1  # glibc's mallopt() parameter number
TRIM_THRESHOLD: Final = 4 * 1024 * 1024
# After the server stopped: how long the interpreter's exit may wait for the app's threads.
EXIT_TIMEOUT: Final = 1.0


def run(app: str | Any, **options: Any) -> None:
    """Run ``app`` ("module:attr" or an ASGI app object) until SIGINT/SIGTERM.

    Args:
        app: import string or application object.
        **options: :class:`~trioserve.Config` fields (the CLI's options).

    Raises:
        ConfigError, AppLoadError, LifespanError, BindError: see ``trioserve.errors``.
    """
    config = options.pop("config", None)
    if config is None:
        known = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
        config = Config(**options)
    run_config(app, config)


def run_config(app: str | Any, config: Config, *, warnings: Sequence[str] = ()) -> None:
    """Run ``app`` with an already validated ``config`` (the body of :func:`run` and the CLI).

    Args:
        app: import string or application object.
        config: the options.
        warnings: lines the caller found before logging was set up (the CLI's notice about
            ``UVICORN_*`` variables), logged as warnings once it is.

    Raises:
        ConfigError, AppLoadError, LifespanError, BindError: see ``trioserve.errors``.
    """
    configure_logging(config)
    for line in warnings:
        logger.warning("%s", line)
    load_env_file(config)
    load_tls(config)  # TLS file/password errors once, before any worker starts
    if config.app_loop == "asyncio":
        import_trio_asyncio()  # a missing extra fails once here, not in every worker
    if config.reload and config.workers > 1:
        # As uvicorn does: many Docker images set WEB_CONCURRENCY, and --reload is a
        # development switch, so one reloading process is what is wanted.
        logger.warning(
            "workers=%d (--workers or WEB_CONCURRENCY) is ignored with --reload; "
            "running one reloading process.",
            config.workers,
        )
        config = dataclasses.replace(config, workers=1)
    if config.workers > 1 or config.reload:
        if not isinstance(app, str):
            raise ConfigError(
                "workers and reload need the app as an import string, e.g. 'main:app'"
            )
        _check_worker_log_config(config)
        from .workers.supervisor import run_supervisor

        run_supervisor(app, config)
        return
    asgi_app = load_app(app, config)
    tune_allocator()
    trio.run(serve_until_signal, asgi_app, config)


def _check_worker_log_config(config: Config) -> None:
    """A ``log_config`` dict reaches worker processes as JSON: refuse one that is not."""
    if not isinstance(config.log_config, dict):
        return
    try:
        json.dumps(config.log_config)
    except (TypeError, ValueError):
        raise ConfigError(
            "with workers or reload, a log_config dict must be JSON-serializable (worker "
            "processes receive it as JSON): name classes as strings, e.g. "
            "'()': 'mypackage.MyFormatter'"
        ) from None


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


def load_env_file(config: Config) -> None:
    """Load ``--env-file`` (``KEY=VALUE`` lines, parsed by python-dotenv) into os.environ."""
    if config.env_file is None:
        return
    if not os.path.isfile(config.env_file):
        raise ConfigError(f"env_file not found: {config.env_file}")
    from dotenv import load_dotenv

    load_dotenv(config.env_file, override=True)


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

    Raises:
        LifespanError, BindError: from :func:`serve`, unwrapped from trio's exception
            group so that callers (the CLI's exit codes) see the exception itself.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                watcher = _SignalWatcher(nursery.cancel_scope)
                nursery.start_soon(watcher.run, signals)
                server: Server = await nursery.start(serve, app, config)
                watcher.server = server
                if startup_line:
                    for url in server.urls:
                        logger.info("trioserve running on %s (Press CTRL+C to quit)", url)
                task_status.started(server)
                await server._stopped.wait()
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
