"""run(): Config → logging → app → trio.run(serve) with signal handling (layer 4).

The runner owns the process: it installs SIGINT/SIGTERM handling (first signal: graceful
drain; second: cancel at once), loads ``--env-file`` and hands over to the supervisor
when ``--workers`` > 1 or ``--reload``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import trio

from .app_loading import load_app
from .asgi_types import ASGIApp
from .asyncio_bridge import import_trio_asyncio
from .config import Config
from .errors import ConfigError
from .logs import configure_logging
from .server import Server, serve
from .tls import load_tls

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)


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


def run_config(app: str | Any, config: Config) -> None:
    configure_logging(config)
    load_env_file(config)
    load_tls(config)  # TLS file/password errors once, before any worker starts
    if config.app_loop == "asyncio":
        import_trio_asyncio()  # a missing extra fails once here, not in every worker
    if config.workers > 1 or config.reload:
        if not isinstance(app, str):
            raise ConfigError(
                "workers and reload need the app as an import string, e.g. 'main:app'"
            )
        from .supervisor import run_supervisor

        run_supervisor(app, config)
        return
    asgi_app = load_app(app, config)
    trio.run(serve_until_signal, asgi_app, config)


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
