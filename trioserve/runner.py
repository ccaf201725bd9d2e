"""run(): Config → logging → app → trio.run(serve) with signal handling (layer 7).

The runner owns the process: it configures logging, loads ``--env-file`` and TLS once, and
either hands over to the supervisor (``--workers`` > 1 or ``--reload``) or serves in this
process with :func:`trioserve.workers.serving.serve_until_signal` (first SIGINT/SIGTERM:
graceful drain; second: cancel at once), the code worker processes serve with too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import trio

from .app.asyncio_bridge import import_trio_asyncio
from .app.loading import load_app
from .config import Config
from .errors import ConfigError
from .logs import configure_logging
from .tls import load_tls
from .workers.serving import serve_until_signal, tune_allocator

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


def load_env_file(config: Config) -> None:
    """Load ``--env-file`` (``KEY=VALUE`` lines, parsed by python-dotenv) into os.environ."""
    if config.env_file is None:
        return
    if not os.path.isfile(config.env_file):
        raise ConfigError(f"env_file not found: {config.env_file}")
    from dotenv import load_dotenv

    load_dotenv(config.env_file, override=True)
