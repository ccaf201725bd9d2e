"""Run the app on an asyncio event loop hosted inside trio, for ``--app-loop asyncio`` (layer 3).

Most FastAPI apps in the wild call asyncio-only libraries (asyncpg, redis.asyncio,
SQLAlchemy's asyncio engine, aiohttp). On a trio server those calls fail with "no running
event loop". With ``app_loop="asyncio"``, :func:`open_app_loop` opens a trio-asyncio loop
for the lifetime of ``serve()`` and wraps the app once in :class:`AsyncioApp`. Every app
call (lifespan, HTTP, WebSocket) then goes through the wrapper, so the connection code
does not know the bridge exists.

Theory of operation::

    trio task (RequestCycle.run / lifespan / ws)      asyncio task on the trio-asyncio loop
    ─────────────────────────────────────────────      ──────────────────────────────────────
    call_app(AsyncioApp) ── run_aio_coroutine ───────► app(scope, bridge.receive, bridge.send)
    └── nursery "calls"                                    │ await receive()
        └── receive() as a short trio task ◄───────────────┘ (an asyncio Future per call)

* Inside the app, ``asyncio.get_running_loop()`` works and sniffio reports ``"asyncio"``,
  so anyio-based frameworks (Starlette, FastAPI) select their asyncio backend.
* trio → asyncio cancellation: when the trio task awaiting the app is cancelled (graceful
  shutdown deadline, hard stop), trio-asyncio cancels the asyncio task and waits for it to
  finish, then raises ``trio.Cancelled``: structured concurrency holds across the bridge.
* asyncio → trio cancellation: when the app cancels an awaited ``receive()``/``send()``
  (``asyncio.timeout``, a Starlette task group reacting to ``http.disconnect``), the trio
  task running that call is cancelled through its cancel scope. A message trio had
  already received by then is kept for the next ``receive()``.
* An ``asyncio.CancelledError`` that escapes the app although trio did not cancel it (the app
  cancelled its own task) is a ``BaseException`` that would otherwise tear down the
  connection nursery; it is turned into :class:`AppTaskCancelledError`, an ordinary app
  error (500 / close 1011), like any other exception from the app.

trio-asyncio is an optional dependency (``pip install 'trioserve[asyncio]'``); it is
imported only when ``app_loop="asyncio"``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable, MutableMapping
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import Any, Final, cast

import trio

from ..asgi_types import ASGIApp, ASGIReceive, ASGISend, Message
from ..config import Config
from ..errors import AppProtocolError, ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = "app_loop='asyncio' needs trio-asyncio: pip install 'trioserve[asyncio]'"
# What trio-asyncio replaces in asyncio, where the originals live, and who must keep them.
_PATCHED_FUNCTIONS: Final = (
    "get_running_loop",
    "_get_running_loop",
    "get_event_loop",
    "current_task",
)
_ORIGINS: Final = frozenset({"asyncio", "asyncio.events", "asyncio.tasks", "_asyncio"})
_PATCHING_PACKAGES: Final = frozenset({"asyncio", "_asyncio", "trio_asyncio"})


class AppTaskCancelledError(Exception):
    """The app's asyncio task was cancelled from inside the app, not by the server."""


def import_trio_asyncio() -> Any:
    """Import trio-asyncio, or explain how to install it.

    Raises:
        ConfigError: trio-asyncio is not installed.
    """
    try:
        import trio_asyncio
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    _rebind_stale_asyncio_imports()
    return trio_asyncio


def _rebind_stale_asyncio_imports() -> None:
    """Point ``from asyncio import get_running_loop``-style copies at trio-asyncio's versions.

    trio-asyncio makes ``asyncio.get_running_loop()`` and friends find its loop by replacing
    those functions in the ``asyncio`` modules when it is imported. A module that imported
    the function itself earlier keeps the original, which raises "no running event loop"
    inside a trio-asyncio task (python-trio/trio-asyncio#83). anyio's asyncio backend does
    exactly that, so an app whose FastAPI/anyio was imported before the loop was opened
    (embedding, tests; the CLI imports trio-asyncio before the app) would fail in its thread
    pool. Only module attributes that still hold asyncio's own original are rebound.
    """
    for module_name, module in list(sys.modules.items()):
        if module_name.partition(".")[0] in _PATCHING_PACKAGES:
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name in _PATCHED_FUNCTIONS:
            value = namespace.get(name)
            if value is None:
                continue
            replacement = getattr(asyncio, name)
            if value is not replacement and getattr(value, "__module__", None) in _ORIGINS:
                namespace[name] = replacement
                logger.debug("rebound %s.%s to trio-asyncio's version", module_name, name)


def accept_any_executor(loop: Any, trio_executor: type[Executor]) -> None:
    """Make ``loop.run_in_executor`` take any ``concurrent.futures.Executor``, as asyncio's does.

    asyncio's ``run_in_executor(executor, func, *args)`` submits ``func`` to ``executor``
    and wraps the ``concurrent.futures.Future`` it returns (``asyncio.wrap_future``).
    trio-asyncio 0.16's ``TrioEventLoop.run_in_executor`` instead asserts that
    ``executor`` is ``None`` or its own ``TrioExecutor``, so an app passing its own
    ``ThreadPoolExecutor`` (a2wsgi's ``WSGIMiddleware`` does, on every request) fails with
    a bare ``AssertionError``. Such executors get asyncio's behaviour here; ``None`` and
    ``TrioExecutor`` keep trio-asyncio's (trio worker threads). The executor's threads are
    the app's: ``runner.exit_watchdog`` bounds how long a stuck one can delay the exit.
    """
    trio_run_in_executor = loop.run_in_executor
    if getattr(trio_run_in_executor, "accepts_any_executor", False):
        return  # a reused loop, already done

    def run_in_executor(
        executor: Executor | None, func: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        if executor is None or isinstance(executor, trio_executor):
            return cast("asyncio.Future[Any]", trio_run_in_executor(executor, func, *args))
        return asyncio.wrap_future(executor.submit(func, *args), loop=loop)

    run_in_executor.accepts_any_executor = True  # type: ignore[attr-defined]
    loop.run_in_executor = run_in_executor


class AsyncioApp:
    """An ASGI app whose calls run as asyncio tasks on a trio-asyncio loop.

    Args:
        app: the ASGI 3 application.
        loop: an open ``trio_asyncio`` event loop.
    """

    __slots__ = ("app", "loop")

    def __init__(self, app: ASGIApp, loop: Any) -> None:
        self.app = app
        self.loop = loop

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        """Run ``app(scope, receive, send)`` as an asyncio task and wait for it.

        Raises:
            AppTaskCancelledError: the app cancelled its own task.
            Exception: whatever the app raised, as it raised it.
            trio.Cancelled: the calling trio task was cancelled (raised only after the
                asyncio task has finished).
        """
        bridge = _CallBridge(self.loop, receive, send)
        app = self.app

        async def app_call() -> None:
            # The app is called here, inside the asyncio task, so that even an app whose
            # __call__ does work before returning its awaitable sees the asyncio loop.
            await app(scope, bridge.receive, bridge.send)

        error: Exception | None = None
        async with trio.open_nursery() as calls:
            bridge.calls = calls
            try:
                await self.loop.run_aio_coroutine(app_call())
            except asyncio.CancelledError as exc:
                # trio-asyncio turns the cancellation *it* caused into trio.Cancelled;
                # this one came from the app itself.
                error = AppTaskCancelledError("the app's asyncio task was cancelled")
                error.__cause__ = exc
            except Exception as exc:  # re-raised below, not wrapped in the nursery's group
                error = exc
            finally:
                bridge.calls = None
            # The app returned: receive()/send() calls its leftover asyncio tasks still
            # await are cancelled, as a trio app's tasks would be.
            calls.cancel_scope.cancel()
        if error is not None:
            raise error


class _CallBridge:
    """``receive``/``send`` of one app call as asyncio coroutines running trio code.

    Each call runs as a trio task in the app call's own nursery (``calls``): it belongs to
    the request's task tree, so when trio cancels the request, calls in flight *and calls
    made afterwards* (an app's cleanup ``await send(...)``) are cancelled too; the app sees
    ``asyncio.CancelledError`` and cannot block the drain on a client that stopped reading.
    Cancelling the asyncio side cancels the trio task through its cancel scope.
    """

    __slots__ = ("_last_receive", "_receive", "_send", "_undelivered", "calls", "loop")

    def __init__(self, loop: Any, receive: ASGIReceive, send: ASGISend) -> None:
        self.loop = loop
        self.calls: trio.Nursery | None = None
        self._receive = receive
        self._send = send
        # Messages received just as the app cancelled its receive(): trio had already
        # consumed them, so they are handed to the next receive(), never lost. Receives
        # run one after the other (each waits for the previous one's trio task), so a
        # message kept here is never overtaken by a later one.
        self._undelivered: list[Message] = []
        self._last_receive: trio.Event | None = None

    # Real coroutine functions (not Future-returning callables), so apps may also pass
    # receive() to asyncio.create_task().
    async def receive(self) -> Message:
        future = self._start(self._receive_in_order, None, keep=True)
        try:
            result: Message = await future
        except asyncio.CancelledError:
            # asyncio cancels a task even when the future it awaits already holds the
            # result: that message is the next one.
            if future.done() and not future.cancelled() and future.exception() is None:
                self._undelivered.insert(0, future.result())
            raise
        return result

    async def send(self, message: Message) -> None:
        await self._start(self._send, message, keep=False)

    async def _receive_in_order(self) -> Message:
        previous = self._last_receive
        finished = self._last_receive = trio.Event()
        try:
            if previous is not None:
                await previous.wait()
            if self._undelivered:
                return self._undelivered.pop(0)
            return await self._receive()
        finally:
            finished.set()

    def _start(self, call: Any, message: Message | None, *, keep: bool) -> asyncio.Future[Any]:
        if self.calls is None:
            raise AppProtocolError("receive() or send() awaited after the ASGI call returned")
        future: asyncio.Future[Any] = self.loop.create_future()
        self.calls.start_soon(self._run, call, message, future, keep)
        return future

    async def _run(
        self, call: Any, message: Message | None, future: asyncio.Future[Any], keep: bool
    ) -> None:
        with trio.CancelScope() as scope:

            def cancel_trio_side(done: asyncio.Future[Any]) -> None:
                if done.cancelled():
                    scope.cancel()

            future.add_done_callback(cancel_trio_side)
            try:
                result = await (call() if message is None else call(message))
            except Exception as exc:
                # Not handled here: handed to the app, which sees it raised by receive()
                # or send() exactly as on trio (ClientDisconnected, AppProtocolError...).
                if not future.done():
                    future.set_exception(exc)
                return
            except BaseException:
                if not future.done():
                    future.cancel()
                raise
            if not future.done():
                future.set_result(result)
            elif keep and result is not None:
                self._undelivered.append(result)
        if scope.cancelled_caught and not future.done():
            future.cancel()


@asynccontextmanager
async def open_app_loop(app: ASGIApp, config: Config) -> AsyncIterator[ASGIApp]:
    """Yield ``app`` as the server must call it for ``config.app_loop``.

    With ``"trio"`` this yields ``app`` unchanged. With ``"asyncio"`` it opens a
    trio-asyncio loop for the duration of the block (or reuses the one the embedding
    program already opened) and yields an :class:`AsyncioApp`.

    Raises:
        ConfigError: ``"asyncio"`` without trio-asyncio installed.

    Resource handling:
        A loop opened here is closed when the block exits, after everything in the block
        (every app call) has finished; like ``asyncio.run``, closing cancels the asyncio
        tasks the app left running in the background. Exceptions from the block are
        re-raised as they are, not wrapped in the exception groups of the loop's
        nurseries.
    """
    if config.app_loop == "trio":
        yield app
        return
    trio_asyncio = import_trio_asyncio()
    running = trio_asyncio.current_loop.get()
    if running is not None:
        accept_any_executor(running, trio_asyncio.TrioExecutor)
        yield AsyncioApp(app, running)
        return
    body_error: Exception | None = None
    async with trio_asyncio.open_loop() as loop:
        accept_any_executor(loop, trio_asyncio.TrioExecutor)
        try:
            yield AsyncioApp(app, loop)
        except Exception as exc:  # re-raised below, outside the loop's nurseries
            body_error = exc
    if body_error is not None:
        raise body_error
