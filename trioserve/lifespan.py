"""The ASGI lifespan protocol as an async context manager (layer 3).

``async with lifespan(app, config) as state:`` runs startup before the body and shutdown
after it. ``--lifespan auto`` tolerates apps that raise on the lifespan scope (logged at
INFO, as uvicorn does); ``on`` requires the protocol; ``off`` skips it.
The app call runs in a nursery owned by this context manager; it never raises into it:
app errors are classified by :func:`~trioserve.app_call.call_app`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from .app_call import call_app
from .asgi_types import ASGIApp
from .config import Config
from .errors import AppProtocolError, LifespanError

logger = logging.getLogger(__name__)

LIFESPAN_ASGI: Final = {"version": "3.0", "spec_version": "2.0"}


class _Lifespan:
    def __init__(self, app: ASGIApp, config: Config) -> None:
        self.app = app
        self.mode = config.lifespan
        self.state: dict[str, Any] = {}
        self.startup_done = trio.Event()  # startup.complete/failed sent, or app ended
        self.shutdown_requested = trio.Event()
        self.shutdown_done = trio.Event()
        self.app_finished = trio.Event()
        self.startup_failed: str | None = None
        self.shutdown_failed: str | None = None
        self.app_error: Exception | None = None
        self._received = 0
        self._sent_startup = False

    async def run(self) -> None:
        scope = {"type": "lifespan", "asgi": LIFESPAN_ASGI, "state": self.state}
        try:
            self.app_error = await call_app(
                self.app, scope, self.receive, self.send, log_errors=False
            )
            if self.app_error is not None and (self.mode == "on" or self._sent_startup):
                # In "auto" mode an app that raises before answering startup simply does
                # not support lifespan; anything else is a real app error.
                logger.error("Exception in 'lifespan' protocol", exc_info=self.app_error)
        finally:
            self.app_finished.set()
            self.startup_done.set()
            self.shutdown_done.set()

    async def receive(self) -> dict[str, Any]:
        self._received += 1
        if self._received == 1:
            return {"type": "lifespan.startup"}
        await self.shutdown_requested.wait()
        return {"type": "lifespan.shutdown"}

    async def send(self, message: Any) -> None:
        message_type = message.get("type") if isinstance(message, dict) else None
        if message_type == "lifespan.startup.complete" and not self._sent_startup:
            self._sent_startup = True
            self.startup_done.set()
        elif message_type == "lifespan.startup.failed" and not self._sent_startup:
            self._sent_startup = True
            self.startup_failed = str(message.get("message", ""))
            self.startup_done.set()
        elif message_type == "lifespan.shutdown.complete" and self.shutdown_requested.is_set():
            self.shutdown_done.set()
        elif message_type == "lifespan.shutdown.failed" and self.shutdown_requested.is_set():
            self.shutdown_failed = str(message.get("message", ""))
            self.shutdown_done.set()
        else:
            raise AppProtocolError(f"unexpected lifespan message {message!r}")


@asynccontextmanager
async def lifespan(
    app: ASGIApp, config: Config, *, shutdown_timeout: float | None = None
) -> AsyncIterator[dict[str, Any] | None]:
    """Run lifespan startup, yield the state dict (None when unsupported/off), then shutdown.

    Args:
        app: the ASGI app.
        config: supplies ``lifespan`` (auto/on/off).
        shutdown_timeout: bound for lifespan shutdown when the body was cancelled.

    Raises:
        LifespanError: startup failed (``lifespan.startup.failed`` or, with ``on``, the
            app raised).
    """
    if config.lifespan == "off":
        yield None
        return
    ls = _Lifespan(app, config)
    failure: LifespanError | None = None
    body_error: BaseException | None = None
    # Exceptions must not be raised inside the nursery block (trio would wrap them in an
    # ExceptionGroup): they are caught and re-raised once the nursery has closed.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ls.run)
        await ls.startup_done.wait()
        if ls.startup_failed is not None:
            logger.error("Application startup failed: %s", ls.startup_failed or "(no message)")
            failure = LifespanError(f"Application startup failed: {ls.startup_failed}")
        elif not ls._sent_startup and config.lifespan == "on":
            failure = LifespanError(
                "Application startup failed: the app does not support lifespan", ls.app_error
            )
        if failure is not None or not ls._sent_startup:
            nursery.cancel_scope.cancel()
        else:
            logger.info("Application startup complete.")
            try:
                yield ls.state
            except BaseException as exc:
                body_error = exc
            await _shutdown(ls, shutdown_timeout)
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if body_error is not None:
        raise body_error
    if not ls._sent_startup:
        # The app ended (returned or raised) without answering lifespan.startup.
        logger.info("ASGI 'lifespan' protocol appears unsupported.")
        yield None


async def _shutdown(ls: _Lifespan, shutdown_timeout: float | None) -> None:
    """Send lifespan.shutdown and wait for the answer.

    Runs even when the server was cancelled (hard stop): then shielded and bounded, as
    every cleanup is.
    """
    ls.shutdown_requested.set()
    cancelled = trio.current_effective_deadline() == -math.inf
    bound = math.inf
    if cancelled:
        bound = 5.0 if shutdown_timeout is None else shutdown_timeout
    with trio.move_on_after(bound, shield=cancelled) as scope:
        await ls.shutdown_done.wait()
    if scope.cancelled_caught:
        logger.warning("Lifespan shutdown did not finish in %.1fs", bound)
    elif ls.shutdown_failed is not None:
        logger.error("Application shutdown failed: %s", ls.shutdown_failed)
    elif ls.app_error is None:
        logger.info("Application shutdown complete.")
    # The app's lifespan coroutine normally returns right after shutdown.complete.
    with trio.move_on_after(1.0, shield=cancelled):
        await ls.app_finished.wait()
