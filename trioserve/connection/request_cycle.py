"""One ASGI request/response cycle, whatever HTTP version carries it (layer 4).

:class:`RequestCycle` is the app call of one request with its ``receive`` and ``send``:
the validation and dispatch of the app's messages, write turns and coalescing of streamed
chunks, ``http.disconnect``, the 500 / 499 outcomes, the access log line and the release
of the ``--limit-concurrency`` place (``ServerState.admit`` / ``release``). It knows no
parser: it is written against :class:`RequestChannel`, the narrow interface of what
carries the request (``connection.http1.HTTPConnection`` for HTTP/1.1; an HTTP/2 stream
implements the same), and :class:`ResponseEncoder`, the response state machine
(``protocol.http1_messages.ResponseWriter`` for HTTP/1.1).

The app call runs in the connection's task until it first waits
(:class:`UntilFirstWait`): an app that answers without waiting for anything, the
common case, costs no task spawn and no hand-off. It may outlive its response (Starlette's
BackgroundTasks); once the response is complete its ``receive()`` answers
``http.disconnect`` and further ``send()`` calls raise :class:`AppProtocolError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import stat
from bisect import bisect_left
from collections.abc import Callable, Coroutine, Generator, Mapping
from time import time
from typing import Any, Final, Protocol

import trio

from ..access_format import CLIENT_CLOSED_REQUEST
from ..app.call import call_app
from ..errors import AppProtocolError, ClientDisconnected
from ..metrics import DURATION_BUCKETS
from ..protocol.response_extensions import FileRegion, accepts_trailers, pathsend_path
from .state import ServerState, log_access
from .stream import MAX_WRITE_PIECES

logger = logging.getLogger(__name__)

# Streamed body chunks the app hands over back to back (awaiting nothing in between) are
# written together, up to this many bytes: one syscall instead of several.
COALESCE_BYTES: Final = 256 * 1024

# What receive() answers once the request is over for the app (one shared dict).
DISCONNECT: Final[dict[str, Any]] = {"type": "http.disconnect"}

# The duration histogram's first bounds (its first bucket is derived, its next two are
# found without a bisection: see RequestCycle._finish).
FASTEST_BUCKET: Final = DURATION_BUCKETS[0]
SECOND_BUCKET: Final = DURATION_BUCKETS[1]
THIRD_BUCKET: Final = DURATION_BUCKETS[2]
_next: Final = next  # (UntilFirstWait's; bound once: compiled, a builtin is looked up per use)
_RETURNED: Final = object()  # (what UntilFirstWait's next() answers once the call returned)


class ResponseStream(Protocol):
    """Where a cycle's response bytes go (``connection.stream.ConnectionStream``)."""

    @property
    def peer_gone(self) -> bool: ...  # the peer left: send() raises ClientDisconnected
    @property
    def broken(self) -> bool: ...  # a write was interrupted: nothing more may be written
    @property
    def peer(self) -> str: ...  # for log lines and errors

    async def write(self, data: bytes | list[bytes], *, last: bool = False) -> None:
        """Write ``data`` whole (``last``: it ends the response); ClientDisconnected if gone."""

    async def write_file(self, pieces: list[bytes | FileRegion]) -> None:
        """Write ``pieces``, some of them file regions (``http.response.pathsend``): the
        file's bytes, read in pieces where the stream cannot take the file itself.
        ClientDisconnected if the peer left; AppProtocolError if the file shrank."""


class CycleView(Protocol):
    """What a channel may read of its cycle (never write)."""

    @property
    def done(self) -> bool: ...  # the response completed (or was aborted)
    @property
    def disconnected(self) -> bool: ...  # the app was told http.disconnect

    async def wait_done(self) -> None:
        """Return once the response is complete."""


class RequestChannel(Protocol):
    """What carries one request: an HTTP/1.1 connection, or an HTTP/2 stream.

    The cycle reads these; it never writes the channel's fields.
    """

    @property
    def state(self) -> ServerState: ...
    @property
    def stream(self) -> ResponseStream: ...
    @property
    def closing(self) -> bool: ...  # draining: the response must say so (Connection: close)
    @property
    def body_error(self) -> int | None:
        """The status a failed request body calls for (400, 408, 413), or None."""

    def continue_bytes(self) -> bytes:
        """The interim ``100 Continue`` response, or b"" when the client no longer waits."""

    async def receive_body(self, cycle: CycleView) -> dict[str, Any]:
        """The next ``http.request`` message, or :data:`DISCONNECT` once the body is
        over (``body_error`` says whether it failed) or the peer left; after the last body
        piece, wait for a disconnect or the end of the response."""

    async def answer_and_close(self, status: int, *, method: bytes = b"GET") -> bool:
        """Send the server's own error response and end the exchange; whether it was sent."""


class ResponseEncoder(Protocol):
    """The response state machine: validates the app's messages and encodes them."""

    @property
    def started(self) -> bool: ...  # the head has been handed over
    @property
    def complete(self) -> bool: ...
    @property
    def status(self) -> int | None: ...
    @property
    def body_bytes(self) -> int: ...

    @property
    def trailers(self) -> bool: ...  # the app's start announced trailers

    def start(self, message: Mapping[str, object], *, close: bool = False) -> bool | None:
        """Validate and hold the head; True if the app announced trailers and the
        encoder wants to be told whether the client takes them (accept_trailers)."""

    def body_pieces(self, message: Mapping[str, object]) -> list[bytes]: ...
    def note_status(self, status: int) -> None: ...

    # The response extensions (``protocol.response_extensions``), in the same terms: each
    # validates the app's message and returns the bytes to write, in order, on this
    # response's stream.
    def early_hint(self, message: Mapping[str, object]) -> bytes:
        """``http.response.early_hint`` (before start): the 103 to write, or b"" when the
        client cannot take one."""

    def file_pieces(self, region: FileRegion) -> list[bytes | FileRegion]:
        """``http.response.pathsend``: the file (``region``) as the rest of the body, with
        the head if it has not left; ends the response unless trailers were announced."""

    def accept_trailers(self, accepted: bool) -> None:
        """Told after a start that announced trailers: whether the client takes them."""

    def trailer_pieces(self, message: Mapping[str, object]) -> list[bytes]:
        """``http.response.trailers`` (after the body's last message): the bytes ending
        the response once ``more_trailers`` is false (the trailers, if accepted)."""


class RequestCycle:
    """One request/response: the app-call task with its ``receive`` and ``send``.

    Args:
        channel: what carries the request (see :class:`RequestChannel`).
        scope: the request's ASGI scope (``protocol.scope``).
        writer: the response state machine for this request.
        method: the request method (for the server's own error answers).
        expect_100: the client waits for ``100 Continue`` before sending its body; it is
            sent when the app first asks for the body.
        dated: ``writer`` was made just now with the Date header, read from the clock
            (``ServerState.response_headers``; HTTP/1.1): that read times the request.

    The caller has admitted the call (``ServerState.admit``); :meth:`run` releases it.
    """

    # (No __slots__: what most requests never change stays a class attribute, so making a
    # cycle sets 7 attributes instead of 16.)
    # The response completed (or was aborted); _done_event only exists while something
    # waits for that (rare: an app that will not read while pipelined bytes pile up).
    done = False
    _done_event: trio.Event | None = None
    # Set when the response completes or when streamed chunks were left buffered; made
    # only when someone waits or signals (most responses complete without either).
    attention: trio.Event | None = None
    _buffered = 0
    aborted = False
    disconnected = False
    body_error: int | None = None  # the request body failed: the status to answer with
    _continue_write: trio.Event | None = None
    # send() from several tasks of one app: writes take turns, so their bytes never
    # interleave on the wire (and trio never sees two senders on the stream).
    _writing = False
    _write_turn: trio.Event | None = None

    def __init__(
        self,
        channel: RequestChannel,
        scope: dict[str, Any],
        writer: ResponseEncoder,
        method: bytes,
        expect_100: bool,
        dated: bool = False,
    ) -> None:
        self.channel = channel
        self.scope = scope
        self.writer = writer
        self.method = method
        self._buffer: list[bytes] = []
        # The client waits for 100 before sending its body; True until the app reads.
        self.expect_100 = expect_100
        # The request's clock, for the access line and the duration histogram (not read
        # when neither is on): the wall clock, as the Date header's. With metrics on and
        # ``dated`` (the channel made the writer just now, HTTP/1.1), the read made for the
        # Date header is the start (ServerState.date_clock: 0.0 without a Date header).
        state = channel.state
        if state.metrics is not None:
            self._start_time = (state.date_clock if dated else 0.0) or time()
        elif state.access_log and state.access_log_enabled():
            self._start_time = time()
        else:
            self._start_time = 0.0

    # -- the app call task -----------------------------------------------------------------

    async def run(self) -> None:
        """Call the app, then make sure the response ends one way or another."""
        channel = self.channel
        stream = channel.stream
        state = channel.state
        try:  # admitted by the channel (state.admit()), released below
            exc = await call_app(state.app, self.scope, self.receive, self.send)
            if exc is not None:
                state.report_app_error(exc)
            if self.done:
                return
            writer = self.writer
            if not writer.started:
                if stream.peer_gone and self.body_error is None:
                    # The client left before anything was answered (an abandoned upload):
                    # nothing was sent and the server did not fail. Logged as nginx's 499,
                    # never as a 5xx. (An app error on the way is logged by call_app.)
                    writer.note_status(CLIENT_CLOSED_REQUEST)
                    self._finish(aborted=True)
                    return
                if exc is None and self.body_error is None:
                    logger.error("ASGI callable returned without starting response")
                await self._send_error(self.body_error or 500)
            else:
                # (Not the app's fault when the request body failed: it was told to stop.)
                if exc is None and not stream.peer_gone and self.body_error is None:
                    logger.error("ASGI callable returned without completing response")
                if self._buffer and not (stream.peer_gone or stream.broken):
                    # What the app did send still reaches the client before the close.
                    with contextlib.suppress(ClientDisconnected):
                        await self._write_buffered()
                self._finish(aborted=True)
        finally:
            state.release()
            if not self.done:
                self._finish(aborted=True)

    async def _send_error(self, status: int) -> None:
        self.writer.note_status(status)
        metrics = self.channel.state.metrics
        if self.body_error is not None and metrics is not None:
            metrics.protocol_error(status)  # (a malformed or stalled request body)
        written = await self.channel.answer_and_close(status, method=self.method)
        self._finish(aborted=not written)

    def _finish(self, *, aborted: bool) -> None:
        self.aborted = aborted
        self._buffer = []  # (after an abort: a truncated response, the connection closes)
        self.done = True
        if self._done_event is not None:
            self._done_event.set()
        if self.attention is not None:
            self.attention.set()
        if self._start_time:
            duration = max(time() - self._start_time, 0.0)  # (0: the wall clock stepped back)
            state = self.channel.state
            metrics = state.metrics
            if metrics is not None:
                # Counted for /metrics (trioserve.metrics.ServerMetrics), inline: a method
                # call here cost a seventh of the 3 % budget metrics have on a hello
                # request. (Subscripts: cheaper than get() calls; a miss is once per label
                # set, or an invented method; a fast request is counted only once.)
                version = self.scope["http_version"]
                status = self.writer.status
                try:  # (by the method's bytes: no scope look-up; a list slot per status)
                    metrics.requests[version][self.method][status or 0] += 1
                except (KeyError, IndexError):  # (labels seen for the first time; >599)
                    metrics.count_new_labels(self.method, version, status)
                if duration > FASTEST_BUCKET:  # (the fastest bucket is derived: sample())
                    # (The next two bounds compared inline: a tenth of a bisect_left call.)
                    metrics.duration_buckets[
                        1
                        if duration <= SECOND_BUCKET
                        else 2
                        if duration <= THIRD_BUCKET
                        else bisect_left(DURATION_BUCKETS, duration)
                    ] += 1
                metrics.duration_sum += duration
            # (With metrics off, the clock runs only when the access log is on; with them
            # on, the attribute spares a call while the access log is off.)
            if metrics is None or (state.access_log and state.access_log_enabled()):
                log_access(
                    state,
                    self.scope,
                    self.writer.status,
                    self.writer.body_bytes,
                    duration,
                    aborted=aborted,
                )

    async def wait_done(self) -> None:
        """Return once the response is complete (see :attr:`done`)."""
        if not self.done:
            if self._done_event is None:
                self._done_event = trio.Event()
            await self._done_event.wait()

    # -- send -----------------------------------------------------------------------------

    async def send(self, message: Any) -> None:
        """The app's ``send``: validate, then write (the head leaves with the first body)."""
        try:
            message_type = message["type"]
        except (TypeError, KeyError, IndexError):
            raise AppProtocolError(
                f"ASGI message must be a dict with a 'type', got {message!r}"
            ) from None
        stream = self.channel.stream
        if stream.peer_gone or stream.broken or self.body_error is not None:
            # (After an invalid request body the app was told http.disconnect; run() then
            # answers with the 4xx itself.)
            raise ClientDisconnected(f"{stream.peer} disconnected")
        if self.done:
            raise AppProtocolError(f"{message_type!r} sent after the response completed")
        if message_type == "http.response.body":
            if self._writing or self._continue_write is not None:
                await self._take_write_turn(message_type)
            pieces = self.writer.body_pieces(message)
            if pieces and not self.writer.complete:
                size = sum(map(len, pieces))
                if (
                    self._buffered + size < COALESCE_BYTES
                    and len(self._buffer) + len(pieces) <= MAX_WRITE_PIECES
                ):
                    # Coalesce: an app streaming chunks back to back gets them written
                    # together. Whenever this app task waits for anything else, the
                    # connection task (woken here) writes what is buffered, so an app that
                    # pauses between chunks sees no delay. Still a cancellation point, as
                    # a write is.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    if not self._buffer:
                        if self.attention is None:
                            self.attention = trio.Event()
                        self.attention.set()
                    self._buffer += pieces
                    self._buffered += size
                    return
            if self._buffer:
                pieces = self._buffer + pieces
                self._buffer = []
                self._buffered = 0
            if pieces:
                self._writing = True
                try:
                    last = self.writer.complete
                    await stream.write(pieces[0] if len(pieces) == 1 else pieces, last=last)
                except ClientDisconnected:
                    self._finish(aborted=True)
                    raise
                finally:
                    self._writing = False
                    if self._write_turn is not None:
                        self._write_turn.set()
                        self._write_turn = None
            if self.writer.complete:
                self._finish(aborted=False)
        elif message_type == "http.response.start":
            # Answering before asking for an expected body: tell the client this connection
            # ends, so it need not send the body (RFC 9110 §10.1.1).
            if self.writer.start(message, close=self.channel.closing or self.expect_100):
                # (Trailers announced: does the client take them? RFC 9110 §10.1.4)
                self.writer.accept_trailers(accepts_trailers(self.scope["headers"]))
        elif message_type == "http.response.pathsend":
            await self._take_write_turn(message_type)
            await self._send_path(message)
        elif message_type == "http.response.early_hint":
            await self._take_write_turn(message_type)
            continue_: Any = b""
            if self.expect_100:
                # Any 1xx ends the parser's wait for 100-continue, but the client still
                # waits for its 100 before sending the body: it goes first.
                self.expect_100 = False
                continue_ = self.channel.continue_bytes()
            hint: Any = self.writer.early_hint(message)
            # (bytes, or a parser's list of pieces; b"" when there is nothing to send)
            pieces = [
                piece
                for part in (continue_, hint)
                for piece in (part if isinstance(part, list) else [part])
                if piece
            ]
            if pieces:
                await self._write_in_turn(pieces)
        elif message_type == "http.response.trailers":
            await self._take_write_turn(message_type)
            await self._write_in_turn(self.writer.trailer_pieces(message))
            if self.writer.complete:
                self._finish(aborted=False)
        else:
            raise AppProtocolError(f"unexpected ASGI message type {message_type!r} for http")

    # -- the response extensions (protocol.response_extensions) ---------------------------

    async def _take_write_turn(self, message_type: str) -> None:
        """Wait for the write turn (see :meth:`send`), then check the response is still on."""
        if self._writing or self._continue_write is not None:
            await self._wait_write_turn()
            stream = self.channel.stream
            if stream.peer_gone or stream.broken:
                raise ClientDisconnected(f"{stream.peer} disconnected")
            if self.done:
                raise AppProtocolError(f"{message_type!r} sent after the response completed")

    async def _write_in_turn(self, pieces: list[Any], *, file: bool = False) -> None:
        """Write the buffered chunks, then ``pieces`` (``file``: some are file regions),
        holding the write turn the caller took (:meth:`_take_write_turn`)."""
        if self._buffer:
            pieces = [*self._buffer, *pieces]
            self._buffer = []
            self._buffered = 0
        if not pieces:
            return
        stream = self.channel.stream
        self._writing = True
        try:
            if file:
                await stream.write_file(pieces)
            else:
                await stream.write(pieces)
        except ClientDisconnected:
            self._finish(aborted=True)
            raise
        finally:
            self._writing = False
            if self._write_turn is not None:
                self._write_turn.set()
                self._write_turn = None

    async def _send_path(self, message: Mapping[str, object]) -> None:
        """``http.response.pathsend``: open the file, send it as the rest of the body
        (``ResponseEncoder.file_pieces``, ``ResponseStream.write_file``), close it.

        A path that cannot be opened, or is not a regular file, is the app's error (500 if
        nothing was sent yet, as for any app error). The file is opened non-blocking (a
        FIFO must not hang the connection) and closed whatever happens.
        """
        path = pathsend_path(message)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise AppProtocolError(
                f"'http.response.pathsend' cannot open {path!r}: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise AppProtocolError(f"'http.response.pathsend' path {path!r} is not a file")
            pieces = self.writer.file_pieces(FileRegion(fd, 0, info.st_size, path))
            await self._write_in_turn(pieces, file=True)
        finally:
            os.close(fd)
        if self.writer.complete:
            self._finish(aborted=False)

    async def flush_until_done(self) -> None:
        """The connection task's wait for response completion.

        Meanwhile it writes the streamed chunks the app left buffered (see :meth:`send`)
        once the app task waits for anything else. It takes its write turn like any task
        of the app would, so bytes never interleave and there is one writer at a time.
        """
        while not self.done:
            if self.attention is None:
                self.attention = trio.Event()
            await self.attention.wait()
            if self.done:
                return
            self.attention = None  # (made again by the next wait or signal)
            try:
                await self._write_buffered()
            except ClientDisconnected:
                self._finish(aborted=True)
                return

    async def _write_buffered(self) -> None:
        """Write the buffered chunks, taking a write turn (see :meth:`send`)."""
        if self._writing or self._continue_write is not None:
            await self._wait_write_turn()
        if not self._buffer or self.done:
            return
        pieces = self._buffer
        self._buffer = []
        self._buffered = 0
        self._writing = True
        try:
            await self.channel.stream.write(pieces)
        finally:
            self._writing = False
            if self._write_turn is not None:
                self._write_turn.set()
                self._write_turn = None

    async def _wait_write_turn(self) -> None:
        """Wait until no other task of this app (nor the 100 Continue) is writing."""
        while self._writing or self._continue_write is not None:
            if self._continue_write is not None:
                await self._continue_write.wait()
            else:
                if self._write_turn is None:
                    self._write_turn = trio.Event()
                await self._write_turn.wait()

    # -- receive --------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        """The app's ``receive``: request body pieces, then ``http.disconnect``."""
        channel = self.channel
        if self.disconnected or self.done or channel.stream.peer_gone:
            return DISCONNECT
        if self.expect_100:
            self.expect_100 = False
            if not self.writer.started:
                # RFC 9110 §10.1.1: send 100 only once the app asks for the body.
                continue_ = channel.continue_bytes()
                if continue_:
                    self._continue_write = trio.Event()
                    try:
                        await channel.stream.write(continue_)
                    except ClientDisconnected:
                        self.disconnected = True
                        return DISCONNECT
                    finally:
                        self._continue_write.set()
                        self._continue_write = None
        message = await channel.receive_body(self)
        if message is DISCONNECT:
            self.disconnected = True
            self.body_error = channel.body_error
        return message


class UntilFirstWait:
    """``await UntilFirstWait(coro, context, on_wait)``: run ``coro`` in the calling task,
    in ``context``; call ``on_wait()`` the first time it yields to trio (it is about to wait
    or checkpoint); return whether it did. Every trap and every value trio sends back
    (outcomes, so cancellation too) passes through unchanged. So an app call runs inline in
    the connection's task until its first wait, then the serving moves to a sibling task.
    (Not a ``types.coroutine`` generator: mypyc makes that an object interpreted code cannot
    await. Its first step is ``next()`` with a default: an app that never waits ends with
    no StopIteration, which compiled code catches at the cost of a traceback entry.)"""

    __slots__ = ("_context", "_coro", "_on_wait")

    def __init__(
        self,
        coro: Coroutine[Any, Any, None],
        context: contextvars.Context,
        on_wait: Callable[[], None],
    ) -> None:
        self._coro = coro
        self._context = context
        self._on_wait = on_wait

    def __await__(self) -> Generator[Any, Any, bool]:
        steps, context, waited = self._coro.__await__(), self._context, False
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is not None:
                    trap = context.run(steps.throw, error)
                elif waited:
                    trap = context.run(steps.send, value)
                else:
                    trap = context.run(_next, steps, _RETURNED)
            except StopIteration:
                return waited
            if trap is _RETURNED:
                return waited
            error = None
            if not waited:
                waited = True
                self._on_wait()
            try:
                value = yield trap
            except BaseException as exc:  # what trio throws in (it passes outcomes by send)
                error = exc
