"""run(): Config → logging → app → trio.run(serve) with signal handling (layer 4).

The runner owns the process: it installs SIGINT/SIGTERM handling (first signal: graceful
drain; second: cancel at once), loads ``--env-file`` and hands over to the supervisor
when ``--workers`` > 1 or ``--reload``.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import trio

from .app_loading import load_app
from .asgi_types import ASGIApp
from .config import Config
from .errors import ConfigError
from .logs import configure_logging
from .server import Server, serve

logger = logging.getLogger(__name__)


def run(app: str | Any, **options: Any) -> None:
    """Run ``app`` ("module:attr" or an ASGI app object) until SIGINT/SIGTERM.

    Args:
        app: import string or application object.
        **options: :class:`~trioserve.Config` fields (the CLI's options).

    Raises:
        ConfigError, AppLoadError, LifespanError, OSError: see ``trioserve.errors``.
    """
    config = options.pop("config", None) or Config(**options)
    run_config(app, config)


def run_config(app: str | Any, config: Config) -> None:
    configure_logging(config)
    load_env_file(config)
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


async def serve_until_signal(app: ASGIApp, config: Config, startup_line: bool = True) -> None:
    """Serve until SIGINT/SIGTERM: the first drains gracefully, the second cancels.

    A signal that arrives during lifespan startup cancels at once. Signal handlers are
    installed only for the duration of this call and restored after.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            watcher = _SignalWatcher(nursery.cancel_scope)
            nursery.start_soon(watcher.run, signals)
            server: Server = await nursery.start(serve, app, config)
            watcher.server = server
            if watcher.count:
                server.shutdown_nowait()
            if startup_line:
                for url in server.urls:
                    logger.info("trioserve running on %s (Press CTRL+C to quit)", url)
            await server._stopped.wait()
            nursery.cancel_scope.cancel()


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
