"""The ASGI lifespan protocol as an async context manager (layer 3).

``async with lifespan(app, config) as state:`` runs startup before the body and shutdown
after it, also when the body raises or is cancelled (then shielded and bounded).

Modes (``--lifespan``):

* ``off``: the app never sees a lifespan scope; the state is ``None``.
* ``auto``: an app that raises or returns before answering ``lifespan.startup`` does not
  support the protocol; that is logged at INFO and serving goes on (uvicorn's rule).
* ``on``: the same situation is a startup failure.

The app's error is reported exactly once: an app that sends ``lifespan.startup.failed``
has its message logged (Starlette puts the traceback there) and the exception it raises
afterwards is not logged again; an app that raises without a message has its traceback
logged. :class:`~trioserve.errors.LifespanError` then carries a one-line summary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from ..asgi_types import ASGIApp
from ..config import Config
from ..errors import AppProtocolError, LifespanError
from .call import call_app

logger = logging.getLogger(__name__)

LIFESPAN_ASGI: Final = {"version": "3.0", "spec_version": "2.0"}
# Bound for lifespan shutdown when the server is cancelled (hard stop) and no
# --timeout-graceful-shutdown is set: cleanup is shielded, so it must be bounded.
CANCELLED_SHUTDOWN_TIMEOUT: Final = 5.0
# How long to wait for the app's lifespan call to return after shutdown.complete.
APP_RETURN_TIMEOUT: Final = 1.0


class _Lifespan:
    """One lifespan app call and what it has told us so far."""

    def __init__(self, app: ASGIApp, mode: str) -> None:
        self.app = app
        self.mode = mode
        self.state: dict[str, Any] = {}
        self.startup_done = trio.Event()  # startup answered, or the app ended
        self.shutdown_requested = trio.Event()
        self.shutdown_done = trio.Event()  # shutdown answered, or the app ended
        self.app_finished = trio.Event()
        self.started = False  # lifespan.startup.complete received
        self.startup_failed: str | None = None
        self.shutdown_failed: str | None = None
        self.app_error: Exception | None = None
        self._startup_sent = False
        # The app call is shielded from the server's cancellation, so that a cancelled
        # serve() can still run lifespan shutdown; lifespan() cancels it explicitly.
        self.cancel_scope = trio.CancelScope(shield=True)

    async def run(self) -> None:
        scope = {"type": "lifespan", "asgi": LIFESPAN_ASGI, "state": self.state}
        try:
            with self.cancel_scope:
                error = await call_app(self.app, scope, self.receive, self.send, log_errors=False)
            if self.cancel_scope.cancelled_caught:
                return
            self.app_error = error
            answered = self.started or self.startup_failed is not None
            if error is None or self.startup_failed is not None or self.shutdown_failed:
                pass  # returned, or already reported through a *.failed message
            elif answered or self.mode == "on":
                logger.error("Exception in 'lifespan' protocol", exc_info=error)
        finally:
            self.app_finished.set()
            self.startup_done.set()
            self.shutdown_done.set()

    async def receive(self) -> dict[str, Any]:
        if not self._startup_sent:
            self._startup_sent = True
            return {"type": "lifespan.startup"}
        await self.shutdown_requested.wait()
        return {"type": "lifespan.shutdown"}

    async def send(self, message: Mapping[str, Any]) -> None:
        message_type = message.get("type") if isinstance(message, Mapping) else None
        answered = self.started or self.startup_failed is not None
        if message_type == "lifespan.startup.complete" and not answered:
            self.started = True
            self.startup_done.set()
        elif message_type == "lifespan.startup.failed" and not answered:
            self.startup_failed = str(message.get("message", ""))
            self.startup_done.set()
        elif message_type == "lifespan.shutdown.complete" and self.shutdown_requested.is_set():
            self.shutdown_done.set()
        elif message_type == "lifespan.shutdown.failed" and self.shutdown_requested.is_set():
            self.shutdown_failed = str(message.get("message", ""))
            self.shutdown_done.set()
        else:
            raise AppProtocolError(f"unexpected lifespan message {message!r}")

    def startup_error(self) -> LifespanError | None:
        """The failure to raise (already logged once), or None when serving may go on."""
        if self.startup_failed is not None:
            logger.error("Application startup failed: %s", self.startup_failed or "(no message)")
            return LifespanError(
                f"Application startup failed: {_last_line(self.startup_failed)}", self.app_error
            )
        if not self.started and self.mode == "on":
            if self.app_error is None:
                logger.error("Application startup failed: the app returned without answering")
                return LifespanError(
                    "Application startup failed: the app returned without answering "
                    "lifespan.startup"
                )
            error = self.app_error
            return LifespanError(
                f"Application startup failed: {type(error).__name__}: {error}", error
            )
        return None


def _last_line(text: str) -> str:
    """The last non-blank line (a traceback's ``Error: message`` line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


@asynccontextmanager
async def lifespan(
    app: ASGIApp, config: Config, *, shutdown_timeout: float | None = None
) -> AsyncIterator[dict[str, Any] | None]:
    """Run lifespan startup, yield the state dict (None when unsupported or off), then shutdown.

    Args:
        app: the ASGI app.
        config: supplies ``lifespan`` (auto/on/off).
        shutdown_timeout: bound for lifespan shutdown when the body was cancelled
            (``CANCELLED_SHUTDOWN_TIMEOUT`` if None).

    Raises:
        LifespanError: startup failed (``lifespan.startup.failed``, or with ``on`` the app
            raised or returned without answering). The app's error is logged once.

    Cancellation:
        If cancelled during startup the app call is cancelled too. If the body is
        cancelled, shutdown still runs, shielded and bounded by ``shutdown_timeout``.
    """
    if config.lifespan == "off":
        yield None
        return
    ls = _Lifespan(app, config.lifespan)
    failure: LifespanError | None = None
    body_error: BaseException | None = None
    # Nothing is raised inside the nursery block (trio would wrap it in an ExceptionGroup):
    # errors are kept and re-raised once the nursery has closed.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ls.run)
        try:
            await ls.startup_done.wait()
            if ls.startup_failed is not None:
                # Starlette raises right after startup.failed: keep that for app_exception.
                with trio.move_on_after(APP_RETURN_TIMEOUT):
                    await ls.app_finished.wait()
            failure = ls.startup_error()
            if ls.started:
                logger.info("Application startup complete.")
                try:
                    yield ls.state
                except BaseException as exc:
                    body_error = exc
                await _shutdown(ls, shutdown_timeout)
        finally:
            ls.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if body_error is not None:
        raise body_error
    if not ls.started:
        logger.info("ASGI 'lifespan' protocol appears unsupported.")
        yield None


async def _shutdown(ls: _Lifespan, shutdown_timeout: float | None) -> None:
    """Send ``lifespan.shutdown`` and wait for the answer (shielded and bounded if cancelled)."""
    ls.shutdown_requested.set()
    cancelled = trio.current_effective_deadline() == -math.inf
    bound = math.inf
    if cancelled:
        bound = CANCELLED_SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout
    with trio.move_on_after(bound, shield=cancelled) as scope:
        await ls.shutdown_done.wait()
    if scope.cancelled_caught:
        logger.warning("Application shutdown did not finish in %.1fs", bound)
        return
    if ls.shutdown_failed is not None:
        logger.error("Application shutdown failed: %s", ls.shutdown_failed or "(no message)")
    elif ls.app_error is None:
        logger.info("Application shutdown complete.")
    # The lifespan call normally returns right after shutdown.complete.
    with trio.move_on_after(APP_RETURN_TIMEOUT, shield=cancelled):
        await ls.app_finished.wait()
