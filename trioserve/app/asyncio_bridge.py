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
    call_app(AsyncioApp) ── loop.create_task ────────► app(scope, bridge.receive, bridge.send)
    _CallBridge.serve: sleeps until handed a call          │ await receive() / send()
    ├── performs it itself, resolves the Future ◄──────────┘ (an asyncio Future per call)
    └── returns (or raises) when the app's task has ended

Per request this costs one asyncio task and, per ``receive()``/``send()``, one trio
wake-up and one asyncio wake-up: no trio task, no nursery. An HTTP response's
``http.response.start`` does not cross alone (it goes with the first body), so a
hello-world response crosses once. :func:`run_ready_callbacks_together` makes the loop run
all ready asyncio callbacks in one trio step. Measured in bench/RESULTS-app-loop.md.

* Inside the app, ``asyncio.get_running_loop()`` works and sniffio reports ``"asyncio"``,
  so anyio-based frameworks (Starlette, FastAPI) select their asyncio backend.
* trio → asyncio cancellation: when the trio task awaiting the app is cancelled (graceful
  shutdown deadline, hard stop), the bridge cancels the asyncio task and the calls it has
  in flight in trio, waits for the task to finish, then raises ``trio.Cancelled``:
  structured concurrency holds across the bridge.
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
from typing import Any, Final, NoReturn, cast

import trio

from ..asgi_types import ASGIApp, ASGIReceive, ASGISend, Message
from ..config import Config
from ..errors import AppProtocolError, ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "app_loop='asyncio' needs trio-asyncio: pip install trio-asyncio (trioserve's [asyncio] extra)"
)
# What trio-asyncio replaces in asyncio, where the originals live, and who must keep them.
_PATCHED_FUNCTIONS: Final = (
    "get_running_loop",
    "_get_running_loop",
    "get_event_loop",
    "current_task",
)
_ORIGINS: Final = frozenset({"asyncio", "asyncio.events", "asyncio.tasks", "_asyncio"})
_PATCHING_PACKAGES: Final = frozenset({"asyncio", "_asyncio", "trio_asyncio"})
_RETURNED: Final = object()  # how an app call ended that returned (see _CallBridge._outcome)


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


def run_ready_callbacks_together(loop: Any) -> None:
    """Make the trio-asyncio loop run every ready asyncio callback in one trio step.

    trio-asyncio 0.16's main loop takes one callback (``Handle``) at a time from its
    queue, and each take is a trio checkpoint under a ``move_on_after`` scope: with many
    connections the loop task runs *one* asyncio callback per trio scheduler batch, however
    many are ready (see bench/RESULTS-app-loop.md). Here, after each take that waited, the
    callbacks already queued at that moment run too, without a checkpoint between them, as
    asyncio's own loop runs its ready queue once per iteration: callbacks those add wait
    for the next step, so an asyncio task that never awaits anything real still lets trio
    run between steps.

    Only this one loop instance changes; a trio-asyncio without the private
    ``_main_loop_one`` and ``_q_recv`` (another version) is left as it is.
    """
    take_one = getattr(loop, "_main_loop_one", None)
    queue = getattr(loop, "_q_recv", None)
    if take_one is None or queue is None or getattr(take_one, "runs_ready_together", False):
        return

    async def main_loop_one(no_wait: bool = False) -> None:
        await take_one(no_wait)
        if no_wait:  # (the drain when the loop closes: one at a time, as before)
            return
        for _ in range(queue.statistics().current_buffer_used):
            try:
                await take_one(True)  # no checkpoint for a plain callback
            except trio.WouldBlock:  # (a timer or trio task handle took the place)
                return

    main_loop_one.runs_ready_together = True  # type: ignore[attr-defined]
    loop._main_loop_one = main_loop_one
    if not loop.get_debug():
        # trio-asyncio checks every callback given to call_soon() (is it a coroutine
        # function? inspect's slow path, twice per request); asyncio's own loop does so
        # only in debug mode, and so does this one now.
        loop._check_callback = _no_check


def _no_check(callback: object, method: str) -> None:
    """``BaseEventLoop._check_callback`` outside debug mode, as asyncio's loop has it."""


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
        bridge = _CallBridge(self.loop, receive, send, hold_start=scope.get("type") == "http")
        await bridge.serve(self.app, scope)


class _Crossing:
    """One ``receive()`` (``message`` None) or ``send(message)`` handed to the trio side."""

    __slots__ = ("future", "held", "message", "scope")

    def __init__(self, message: Any, held: list[Message], future: asyncio.Future[Any]) -> None:
        self.message: Message | None = message
        self.held = held  # sends held back until this crossing, done first (in order)
        self.future = future  # what the app's asyncio task awaits
        self.scope: trio.CancelScope | None = None  # set while trio performs it


class _CallBridge:
    """One app call: its asyncio task, and its ``receive``/``send`` done on the trio side.

    The trio task that awaits the app (:meth:`serve`) is the bridge's *servant*: while the
    app's asyncio task runs, it sleeps until the app hands it a ``receive()``/``send()``,
    performs that call itself, in the request's own task, and resolves the asyncio future
    the app awaits. A crossing thus costs one trio wake-up and one asyncio wake-up, with no
    task spawned on either side and no nursery (whose exit alone costs a scheduler trip).

    Only a call made while the servant is already busy with another (Starlette awaits
    ``receive()`` for a disconnect while it streams with ``send()``) runs as a trio task
    of its own, started with ``loop.run_trio_task``; such a task is *detached*: it lives
    in the loop's nursery, but :meth:`serve` keeps it in ``_detached``, cancels it when
    the app call ends or is cancelled, and returns only once it has finished, so it never
    outlives the app call that made it. When trio cancels the request, calls in flight
    *and calls made afterwards* (an app's cleanup ``await send(...)``) are cancelled too;
    the app sees ``asyncio.CancelledError`` and cannot block the drain on a client that
    stopped reading. Cancelling the asyncio side cancels the trio call through its cancel
    scope.

    For an HTTP call, ``http.response.start`` does not cross on its own (the server sends
    the head with the first body chunk anyway): it goes with the app's next call, or when
    its task ends. An error it causes (an invalid header) is raised by that next call, or
    by the app call itself.
    """

    __slots__ = (
        "_cancelling",
        "_detached",
        "_held",
        "_hold_start",
        "_interrupt",
        "_last_receive",
        "_next",
        "_open",
        "_outcome",
        "_parked",
        "_raise_cancel",
        "_receive",
        "_send",
        "_servant",
        "_task",
        "_undelivered",
        "loop",
    )

    def __init__(
        self, loop: Any, receive: ASGIReceive, send: ASGISend, *, hold_start: bool
    ) -> None:
        self.loop = loop
        self._open = True  # False once the app's task has ended
        self._receive = receive
        self._send = send
        self._hold_start = hold_start
        self._held: list[Message] = []
        # Messages received just as the app cancelled its receive(): trio had already
        # consumed them, so they are handed to the next receive(), never lost. Receives
        # run one after the other (each waits for the previous one's trio call), so a
        # message kept here is never overtaken by a later one.
        self._undelivered: list[Message] = []
        self._last_receive: trio.Event | None = None
        # The servant: the trio task in serve(), the crossing it is to perform (or is
        # performing), and whether it sleeps waiting for one.
        self._servant: trio.lowlevel.Task | None = None
        self._next: _Crossing | None = None
        self._parked = False
        self._detached: set[_Crossing] = set()  # crossings made while the servant was busy
        self._task: asyncio.Task[None] | None = None
        # How the app's task ended: _RETURNED or the exception; None while it runs.
        self._outcome: object = None
        # trio cancelled the call (or worse): the app's task is cancelled, and once it has
        # ended, this is what serve() raises.
        self._cancelling = False
        self._raise_cancel: Callable[[], NoReturn] | None = None
        self._interrupt: BaseException | None = None

    # -- the trio side ---------------------------------------------------------------------

    async def serve(self, app: ASGIApp, scope: MutableMapping[str, Any]) -> None:
        """Run the app's asyncio task to its end, performing its crossings meanwhile.

        Raises:
            See :meth:`AsyncioApp.__call__`.
        """
        self._servant = trio.lowlevel.current_task()
        coro = self._app_task(app, scope)
        try:
            self._task = self.loop.create_task(coro)
        except BaseException:
            coro.close()  # (never awaited: no warning)
            raise
        while True:
            call = self._next
            if self._outcome is not None:
                if call is not None:  # a leftover task's, not started: cancelled
                    self._next = None
                    self._held[:0] = call.held
                    call.future.cancel()
                break
            if call is not None:
                try:
                    await self._perform(call)
                except BaseException as exc:  # trio cancelled us: see _interrupted
                    self._interrupted(exc)
                self._next = None
            else:
                self._parked = True
                await trio.lowlevel.wait_task_rescheduled(self._abort)
        while self._detached:  # (cancelled by _app_ended)
            self._parked = True
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        await self._finish()

    async def _finish(self) -> None:
        """Send what is still held back, then return or raise as the app's task ended."""
        outcome = self._outcome
        held, self._held = self._held, []
        for message in held:  # as the app had sent it before it ended
            try:
                await self._send(message)
            except Exception as exc:
                if outcome is _RETURNED:
                    outcome = exc  # the app's error, as if raised by its send()
                break
        if self._interrupt is not None and not isinstance(self._interrupt, trio.Cancelled):
            raise self._interrupt  # KeyboardInterrupt & co. met while performing a call
        if isinstance(outcome, asyncio.CancelledError):
            if self._raise_cancel is not None:
                try:
                    self._raise_cancel()  # trio.Cancelled, now that the app's task ended
                except trio.Cancelled as cancelled:
                    raise cancelled from outcome
            if self._interrupt is not None:
                raise self._interrupt from outcome
            # trio did not cancel the task: the app cancelled itself.
            raise AppTaskCancelledError("the app's asyncio task was cancelled") from outcome
        if isinstance(outcome, BaseException):
            raise outcome

    async def _perform(self, call: _Crossing) -> None:
        """Do one crossing in this trio task and resolve the future the app awaits.

        Raises:
            BaseException: trio cancelled this task (the future is cancelled first).
        """
        future = call.future
        if future.done():  # the app cancelled it before trio got to it
            self._held[:0] = call.held  # what it carried was sent before: keep it
            return
        result: Message | None = None
        try:
            with trio.CancelScope() as scope:
                call.scope = scope
                if self._cancelling:  # trio cancelled the app call: no new waits
                    scope.cancel()
                for message in call.held:
                    await self._send(message)
                if call.message is None:
                    result = await self._receive_in_order()
                else:
                    await self._send(call.message)
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
        if scope.cancelled_caught:  # the app cancelled it (see _withdraw)
            if not future.done():
                future.cancel()
        elif not future.done():
            future.set_result(result)
        elif result is not None:  # cancelled, but trio had received it: the next one
            self._undelivered.append(result)

    async def _perform_detached(self, call: _Crossing) -> None:
        """A crossing made while the servant was busy, in a trio task of its own."""
        try:
            await self._perform(call)
        except trio.Cancelled:
            raise  # (the loop's nursery is being cancelled: only after every app call)
        except BaseException as exc:  # KeyboardInterrupt & co.: serve() raises it
            self._interrupted(exc)
        finally:
            self._detached.discard(call)
            self._wake()

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

    def _wake(self) -> None:
        """Wake the servant if it sleeps (it then looks at ``_next`` and ``_outcome``)."""
        if self._parked:
            self._parked = False
            assert self._servant is not None
            trio.lowlevel.reschedule(self._servant)

    def _abort(self, raise_cancel: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
        """trio cancels the sleeping servant: cancel the app's task and wait for its end.

        (As ``trio_asyncio.run_aio_future`` does: structured concurrency holds.)
        """
        if self._raise_cancel is None:
            self._raise_cancel = raise_cancel
        self._cancel_task()
        return trio.lowlevel.Abort.FAILED

    def _interrupted(self, exc: BaseException) -> None:
        """trio cancelled the servant while it performed a crossing."""
        if self._interrupt is None:
            self._interrupt = exc
        self._cancel_task()

    def _cancel_task(self) -> None:
        task = self._task
        if self._cancelling or task is None:
            return
        self._cancelling = True
        self._cancel_detached()
        task.cancel()
        # A task cancelled before its first step never runs _app_task: its end is
        # noticed here instead (one more asyncio callback, on this rare path only).
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._outcome is None:
            self._app_ended(asyncio.CancelledError())
        self._wake()

    def _cancel_detached(self) -> None:
        for call in self._detached:
            if call.scope is not None:
                call.scope.cancel()
            else:  # not started yet: _perform skips it
                call.future.cancel()

    # -- the asyncio side (runs in the app's task) -----------------------------------------

    async def _app_task(self, app: ASGIApp, scope: MutableMapping[str, Any]) -> None:
        # The app is called here, inside the asyncio task, so that even an app whose
        # __call__ does work before returning its awaitable sees the asyncio loop.
        try:
            await app(scope, self.receive, self.send)
        except GeneratorExit:
            raise  # (the loop closing a task that never ended: nothing awaits it)
        except BaseException as exc:  # handed to serve(), which raises it in trio
            self._app_ended(exc)
        else:
            self._app_ended(_RETURNED)

    def _app_ended(self, outcome: object) -> None:
        self._outcome = outcome
        self._open = False  # receive()/send() from now on: AppProtocolError
        # Calls its leftover asyncio tasks still await are cancelled, as a trio app's
        # tasks would be.
        call = self._next
        if call is not None and call.scope is not None:
            call.scope.cancel()
        self._cancel_detached()
        self._wake()

    # Real coroutine functions (not Future-returning callables), so apps may also pass
    # receive() to asyncio.create_task().
    async def receive(self) -> Message:
        last = self._last_receive
        if self._undelivered and (last is None or last.is_set()):
            return self._undelivered.pop(0)  # no receive in flight: no need to cross
        call = self._cross(None)
        try:
            result: Message = await call.future
        except asyncio.CancelledError:
            self._withdraw(call)
            raise
        return result

    async def send(self, message: Message) -> None:
        if (
            self._hold_start
            and not self._held
            and self._open
            and type(message) is dict
            and message.get("type") == "http.response.start"
        ):
            self._held.append(message)
            return
        call = self._cross(message)
        try:
            await call.future
        except asyncio.CancelledError:
            self._withdraw(call)
            raise

    def _cross(self, message: Message | None) -> _Crossing:
        if not self._open:
            raise AppProtocolError("receive() or send() awaited after the ASGI call returned")
        call = _Crossing(message, self._held, self.loop.create_future())
        self._held = []
        if self._next is None:
            self._next = call
            self._wake()
        else:
            self._detached.add(call)
            self.loop.run_trio_task(self._perform_detached, call)
        return call

    def _withdraw(self, call: _Crossing) -> None:
        """The app's task was cancelled while it awaited ``call``."""
        future = call.future
        if future.done() and not future.cancelled() and future.exception() is None:
            # asyncio cancels a task even when the future it awaits already holds the
            # result: that message is the next one.
            if call.message is None:
                self._undelivered.insert(0, future.result())
        elif call.scope is not None:
            call.scope.cancel()  # trio is performing it (not yet started: _perform skips it)


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
        run_ready_callbacks_together(running)
        yield AsyncioApp(app, running)
        return
    body_error: Exception | None = None
    async with trio_asyncio.open_loop() as loop:
        accept_any_executor(loop, trio_asyncio.TrioExecutor)
        run_ready_callbacks_together(loop)
        try:
            yield AsyncioApp(app, loop)
        except Exception as exc:  # re-raised below, outside the loop's nurseries
            body_error = exc
    if body_error is not None:
        raise body_error
