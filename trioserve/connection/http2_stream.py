"""One HTTP/2 stream: the request channel of a :class:`RequestCycle` (layer 4).

An HTTP/2 request runs the same ASGI request cycle as an HTTP/1.1 one
(``connection.request_cycle.RequestCycle``: validation and dispatch of the app's
messages, write turns, coalescing, ``http.disconnect``, 500 / 499, the access line, the
``--limit-concurrency`` place). What differs is what carries it, and that lives here:

* :class:`HTTP2Stream` is the cycle's ``RequestChannel`` *and* its ``ResponseStream``.
  ``receive_body`` hands out the DATA the connection's reader buffered on the stream,
  crediting it back to the client (WINDOW_UPDATE) only as the app takes it; ``write``
  queues HEADERS and DATA on the connection's ``h2`` state machine as the flow-control
  windows allow (see :meth:`HTTP2Stream.write`).
* :class:`H2ResponseEncoder` is the cycle's ``ResponseEncoder``: it validates the app's
  messages as HTTP/1.1's ``ResponseWriter`` does, but encodes nothing (``h2`` frames and
  compresses the fields, connection-wide). The "pieces" it returns only say that
  something is due on the wire; ``write`` reads the head, the trailers and whether the
  response ended from the encoder.

It never imports the connection (``connection.http2``): it needs :class:`StreamOwner`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import h2.exceptions
import trio
from h2.errors import ErrorCodes

from ..errors import AppProtocolError, ClientDisconnected
from ..protocol.h2_engine import ServerH2Connection
from ..protocol.http1_messages import REASONS
from ..protocol.http2 import SEND_BATCH_BYTES, SEND_WINDOW_TIMEOUT, response_header_list
from ..protocol.response_extensions import FileRegion, early_hint_fields, trailer_fields
from ..protocol.response_heads import (
    ResponseHeads,
    check_fields,
    declared_length,
    parse_body,
    validate_headers,
)
from .request_cycle import DISCONNECT, CycleView, RequestCycle, UntilFirstWait
from .state import ServerState
from .stream import FILE_PIECE_BYTES

logger = logging.getLogger(__name__)

# Statuses whose response has no body (RFC 9110 §6.4.1), as on HTTP/1.1.
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_DUE: Final = [b""]  # "something is due on the wire" (the head, or the end of the stream)


class StreamOwner(Protocol):
    """What a stream uses of its connection (``connection.http2.HTTP2Connection``)."""

    state: ServerState
    peer: str
    broken: bool
    draining: bool
    nursery: trio.Nursery

    @property
    def h2(self) -> ServerH2Connection: ...

    def wake_writer(self) -> None: ...
    def credit(self, stream_id: int, size: int) -> None: ...
    def reset_stream(self, stream_id: int, code: ErrorCodes) -> None: ...
    def stream_exited(self, stream: HTTP2Stream) -> None: ...
    def open_windows(self) -> None: ...
    async def wait_window_opened(self) -> None: ...
    async def wait_backlog_below(self) -> None: ...


class H2ResponseEncoder:
    """The response state machine of one stream (a ``ResponseEncoder``).

    Args:
        heads: the server's ``ResponseHeads`` (its cache of checked fields).
        method: the request method (a HEAD response carries no body).
        send_hint: queues a ``103 Early Hints`` with these fields (RFC 8297).
    """

    started = False  # the first body message came: the HEADERS frame is due
    complete = False
    status: int | None = None
    body_bytes = 0
    trailers = False  # announced in http.response.start
    headers: list[tuple[bytes, bytes]] = []  # (the app's, once start() checked them)
    trailer_fields: list[tuple[bytes, bytes]] | None = None
    declared: int | None = None  # the app's Content-Length: the body must match it
    _body_ended = False  # the body's last message came (trailers may follow)

    def __init__(
        self,
        heads: ResponseHeads,
        method: bytes,
        send_hint: Callable[[list[tuple[bytes, bytes]]], None],
    ) -> None:
        self._heads = heads
        self._send_hint = send_hint
        self._no_body = method == b"HEAD"

    def note_status(self, status: int) -> None:
        """Record the status of the server's own answer (error, 499), for the access log."""
        self.status = status

    def accept_trailers(self, accepted: bool) -> None:
        """HTTP/2 always carries trailers (a HEADERS frame ending the stream)."""

    def start(self, message: Mapping[str, object], *, close: bool = False) -> None:
        """Validate and hold ``http.response.start`` (``close`` means nothing on HTTP/2:
        a draining connection says so with GOAWAY)."""
        if self.status is not None:
            raise AppProtocolError("'http.response.start' sent twice")
        status = message.get("status")
        if type(status) is not int or not 200 <= status <= 999:
            raise AppProtocolError(f"'status' must be a final status 200-999, got {status!r}")
        headers = validate_headers(message.get("headers"))
        check_fields(headers, self._heads.checked)
        trailers = message.get("trailers", False)
        if type(trailers) is not bool:
            raise AppProtocolError(f"'trailers' must be a bool, got {trailers!r}")
        if status in _NO_BODY_STATUSES:
            self._no_body = True
        self.status = status
        self.headers = headers
        self.trailers = trailers
        self.declared = None if self._no_body else declared_length(headers)

    def body_pieces(self, message: Mapping[str, object]) -> list[bytes]:
        """Apply ``http.response.body``: ``[body]``, or :data:`_DUE` when only the head or
        the end of the stream is due, or ``[]`` when nothing is."""
        if self.status is None:
            raise AppProtocolError("'http.response.body' sent before 'http.response.start'")
        if self.complete or self._body_ended:
            raise AppProtocolError("'http.response.body' sent after the response completed")
        body, more_body = parse_body(message)
        if self._no_body:
            body = b""
        self.body_bytes += len(body)
        self._check_length(more_body)  # (before the head is due: a refusal is still a 500)
        first = not self.started
        self.started = True
        if not more_body:
            if self.trailers:
                self._body_ended = True
            else:
                self.complete = True
        if body:
            return [body]
        return _DUE if first or self.complete else []

    def early_hint(self, message: Mapping[str, object]) -> bytes:
        """``http.response.early_hint``: the ``103 Early Hints`` HEADERS frame is queued
        at once (``send_hint``); no bytes for the cycle to write."""
        if self.status is not None:
            raise AppProtocolError("'http.response.early_hint' sent after 'http.response.start'")
        self._send_hint(early_hint_fields(message, self._heads.checked))
        return b""

    def file_pieces(self, region: FileRegion) -> list[bytes | FileRegion]:
        """``http.response.pathsend``: the file as the rest of the body (read by
        :meth:`HTTP2Stream.write_file`)."""
        if self.status is None:
            raise AppProtocolError("'http.response.pathsend' sent before 'http.response.start'")
        if self.complete or self._body_ended:
            raise AppProtocolError("'http.response.pathsend' sent after the response completed")
        if not self._no_body:
            self.body_bytes += region.count
            self._check_length(False)  # (a file that does not match: 500, as on HTTP/1.1)
        self.started = True
        if self.trailers:
            self._body_ended = True
        else:
            self.complete = True
        return [b""] if self._no_body else [region]

    def _check_length(self, more_body: bool) -> None:
        """Refuse a body longer than the declared Content-Length, or one that ends short
        of it (RFC 9113 §8.1.1: such a response is malformed), as HTTP/1.1's writer does."""
        declared = self.declared
        if declared is None:
            return
        if self.body_bytes > declared or (not more_body and self.body_bytes < declared):
            raise AppProtocolError(
                f"response body of {self.body_bytes} bytes"
                f"{'' if more_body else ' ended'}, its Content-Length is {declared}"
            )

    def trailer_pieces(self, message: Mapping[str, object]) -> list[bytes]:
        """Apply ``http.response.trailers``: :data:`_DUE` once the last one came (the
        trailing HEADERS frame ends the stream), else ``[]``."""
        if not self.trailers:
            raise AppProtocolError(
                "'http.response.trailers' sent without 'trailers': True in 'http.response.start'"
            )
        if not self._body_ended or self.complete:
            raise AppProtocolError(
                "'http.response.trailers' sent before the body's last message"
                if not self.complete
                else "'http.response.trailers' sent after the response completed"
            )
        fields, more = trailer_fields(message, self._heads.checked)
        self.trailer_fields = [
            *(self.trailer_fields or ()),
            *((name.lower(), value) for name, value in fields),
        ]
        if more:
            return []
        self.complete = True
        return _DUE


class HTTP2Stream:
    """One request on an HTTP/2 connection (see the module docstring).

    Args:
        conn: the connection.
        stream_id: the stream's id.
        method: the request method.
        scope: the request's ``http`` scope.
    """

    closing = False  # (RequestChannel: HTTP/2 has no Connection: close)
    body_error: int | None = None
    # (What most streams never change stays a class attribute: a stream is made per request.)
    reset = False  # the client reset the stream, or the connection ended
    _changed: trio.Event | None = None  # made when a task waits (wait_changed)
    _told_end = False  # receive_body() has returned more_body=False
    _head_sent = False
    _ended = False  # our side of the stream is closed (END_STREAM sent)
    _more_file = False  # write_file() has more of the file to come
    _received = 0  # request body bytes handed to the app

    def __init__(
        self,
        conn: StreamOwner,
        stream_id: int,
        method: bytes,
        scope: dict[str, Any],
        *,
        body_ended: bool = False,
    ) -> None:
        self.conn = conn
        self.state = conn.state
        self.stream_id = stream_id
        self.method = method
        self.scope = scope
        self.encoder = H2ResponseEncoder(conn.state.response_heads, method, self._send_hint)
        self._body: list[bytes] = []
        self.body_ended = body_ended  # (the request's HEADERS frame ended the stream)

    # -- ResponseStream (the cycle writes through these) -----------------------------------

    @property
    def stream(self) -> HTTP2Stream:
        return self

    @property
    def peer_gone(self) -> bool:
        return self.reset

    @property
    def broken(self) -> bool:
        return self.conn.broken

    @property
    def peer(self) -> str:
        return self.conn.peer

    async def write(self, data: bytes | list[bytes], *, last: bool = False) -> None:
        """Queue the response so far on ``h2``: HEADERS first, then DATA as the windows
        allow, then the end of the stream (with the trailers) once the encoder says the
        response is complete (``last`` is not needed). ClientDisconnected on a reset."""
        encoder = self.encoder
        body = data if isinstance(data, bytes) or len(data) > 1 else data[0]
        end = encoder.complete and not self._more_file
        trailers = encoder.trailer_fields if end else None
        try:
            head_ends = not self._head_sent and end and not body and not trailers
            data_follows = bool(body) or (
                end and not trailers and not self._ended and not head_ends
            )
            if not self._head_sent:
                # (The head leaves with the DATA that follows: _send_data wakes the writer.)
                status = encoder.status or 500
                self._send_head(status, encoder.headers, head_ends, wake=not data_follows)
            if data_follows:
                await self._send_data(body, end_stream=end and not trailers)
            if trailers:
                self.conn.h2.send_headers(self.stream_id, trailers, end_stream=True)
                self._ended = True
                self.conn.wake_writer()
        except h2.exceptions.ProtocolError as exc:
            raise self._closed_error(exc) from None
        if end:
            self._signal()  # (a receive_body() waiting for the end of the response)
            # The writer sends it once this task waits; a response that ends here need
            # not wait for that (as on HTTP/1.1: no trip through the scheduler, so an app
            # that answers at once costs no second task, UntilFirstWait). Still a
            # cancellation point, as a write is.
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await self.conn.wait_backlog_below()

    async def write_file(self, pieces: list[bytes | FileRegion]) -> None:
        """Write ``pieces``, reading file regions (``http.response.pathsend``) in pieces
        of at most :data:`FILE_PIECE_BYTES` (``FileRegion.pieces``); the stream ends
        with the last one, if the response is complete."""
        chunks = (
            chunk
            for piece in pieces
            for chunk in (
                piece.pieces(FILE_PIECE_BYTES) if isinstance(piece, FileRegion) else [piece]
            )
        )
        last = b""
        self._more_file = True
        try:
            for chunk in chunks:
                if last:
                    await self.write(last)
                last = chunk
        finally:
            self._more_file = False
        await self.write(last)

    def _send_hint(self, fields: list[tuple[bytes, bytes]]) -> None:
        if self.reset or self.conn.broken:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.conn.h2.send_headers(self.stream_id, [(b":status", b"103"), *fields])
            self.conn.wake_writer()

    def _send_head(
        self, status: int, headers: list[tuple[bytes, bytes]], end: bool, *, wake: bool = True
    ) -> None:
        fields = response_header_list(status, [*self.state.response_headers(), *headers])
        self.conn.h2.send_headers(self.stream_id, fields, end_stream=end)
        self._head_sent = True
        self._ended = end
        if wake:
            self.conn.wake_writer()

    async def _send_data(self, body: bytes | list[bytes], *, end_stream: bool) -> None:
        """Queue ``body`` (bytes, or pieces sent back to back) as DATA frames as the
        stream's and the connection's windows allow, waiting for WINDOW_UPDATE or SETTINGS
        when they are closed. A client that never opens them gets the stream reset after
        ``SEND_WINDOW_TIMEOUT``.

        Frames are queued in batches of up to :data:`SEND_BATCH_BYTES` (as many frames
        of the client's ``SETTINGS_MAX_FRAME_SIZE`` as the windows allow) before the
        writer is woken and this task yields: one write of the socket per batch, not
        per 16 KiB frame. Between batches the outbound backlog bound applies, so what
        one stream adds past it is at most one batch. Pieces of a frame's size or more
        (a streamed body the request cycle coalesced) are framed where they lie, not
        joined into a copy first.
        """
        conn = self.conn
        h2_conn = conn.h2
        stream_id = self.stream_id
        frame_size = h2_conn.max_outbound_frame_size
        # (h2 copies a memoryview into the frame; a whole bytes object it takes as it is.)
        views: list[bytes | memoryview]
        if isinstance(body, bytes):
            views = [body]
        else:
            body = [piece for piece in body if piece]
            if len(body) > 1 and min(map(len, body)) >= frame_size:
                views = list(reversed(body))  # (popped from the end)
            else:  # (small pieces: one frame for several)
                views = [body[0] if len(body) == 1 else b"".join(body)]
        view = views.pop()  # (views: the pieces after this one, last first)
        while True:
            if self.reset or conn.broken:
                raise ClientDisconnected(f"{conn.peer} reset stream {stream_id}")
            queued = 0
            while True:
                window = h2_conn.local_flow_control_window(stream_id)
                size = min(window, h2_conn.max_outbound_frame_size, len(view))
                if size <= 0 and view:
                    break  # (no window left)
                last = size == len(view) and not views
                if size == len(view):
                    chunk, view = view, b""
                else:  # (a slice of a memoryview: no copy of our own)
                    view = view if isinstance(view, memoryview) else memoryview(view)
                    chunk, view = view[:size], view[size:]
                h2_conn.send_data(stream_id, chunk, end_stream=end_stream and last)
                self._ended = end_stream and last
                queued += size
                if not view and views:
                    view = views.pop()
                if not view or queued >= SEND_BATCH_BYTES:
                    break
            if queued or not view:
                conn.wake_writer()
                if not view:
                    return
                await conn.wait_backlog_below()
                continue
            conn.wake_writer()  # (what was queued before, the head perhaps, leaves now)
            with trio.move_on_after(SEND_WINDOW_TIMEOUT) as waited:
                await conn.wait_window_opened()
            if waited.cancelled_caught:
                logger.info(
                    "%s - stream %d: no flow-control window for %.0fs, resetting",
                    conn.peer,
                    self.stream_id,
                    SEND_WINDOW_TIMEOUT,
                )
                conn.reset_stream(self.stream_id, ErrorCodes.CANCEL)
                raise ClientDisconnected(f"{conn.peer} never opened its window")

    # -- RequestChannel ---------------------------------------------------------------------

    def continue_bytes(self) -> bytes:
        return b""  # (the cycle is made with expect_100=False: HTTP/2 clients send anyway)

    async def receive_body(self, cycle: CycleView) -> dict[str, Any]:
        """The next ``http.request`` (credited back to the client as taken), then, after
        the last piece, wait for a reset or the end of the response.

        As on HTTP/1.1, ``--timeout-request-body`` bounds each wait for more of the body
        (408) and ``--limit-request-body`` its size (413): the app gets
        ``http.disconnect`` and the cycle answers with ``body_error``.
        """
        config = self.state.config
        while True:
            if self.reset or cycle.done:
                return DISCONNECT
            if self._body:
                body = b"".join(self._body) if len(self._body) > 1 else self._body[0]
                self._body = []
                self.conn.credit(self.stream_id, len(body))
                self._received += len(body)
                limit = config.limit_request_body
                if limit and self._received > limit:
                    reason = f"over the {limit}-byte --limit-request-body"
                    return self._body_failed(413, reason)
                more = not self.body_ended
                self._told_end = not more
                return {"type": "http.request", "body": body, "more_body": more}
            if self.body_ended and not self._told_end:
                self._told_end = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.body_ended:
                await self.wait_changed()
                continue
            timeout = config.timeout_request_body or math.inf
            with trio.move_on_after(timeout) as waited:
                await self.wait_changed()
            if waited.cancelled_caught and not cycle.done:
                return self._body_failed(408, f"nothing received for {timeout:g} s")

    def _body_failed(self, status: int, reason: str) -> dict[str, Any]:
        """The request body failed (the peer's fault): log it, tell the app to stop."""
        logger.info(
            "%s - stream %d: request body: %s (%d)", self.peer, self.stream_id, reason, status
        )
        self.body_error = status
        return DISCONNECT

    async def answer_and_close(self, status: int, *, method: bytes = b"GET") -> bool:
        """The server's own answer on this stream (500 after an app error, 503)."""
        await trio.lowlevel.checkpoint()
        return self.answer(status)

    def answer(self, status: int) -> bool:
        """Queue a plain-text ``status`` response ending the stream; whether it could be."""
        if self._head_sent or self.reset or self.conn.broken:
            return False
        body = REASONS.get(status, b"Error") + b"\n"
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        if self.method == b"HEAD":
            body = b""
        try:
            self._send_head(status, headers, end=not body)
            if body:
                self.conn.h2.send_data(self.stream_id, body, end_stream=True)
                self._ended = True
        except h2.exceptions.ProtocolError:  # (no window for these few bytes: rare)
            return False
        self.encoder.body_bytes = len(body)
        self._signal()
        return True

    # -- a tunnel's bytes (RFC 8441: connection.http2_websocket.StreamBytes) -----------------

    @property
    def ended_here(self) -> bool:
        """Our side of the stream is closed (END_STREAM sent)."""
        return self._ended

    def take_data(self) -> bytes:
        """The DATA received and not taken yet (b"" if none), credited back to the client."""
        body = self._body
        if not body:
            return b""
        data = b"".join(body) if len(body) > 1 else body[0]
        self._body = []
        self.conn.credit(self.stream_id, len(data))
        return data

    def send_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Queue response HEADERS with ``headers`` as given (the server's default fields
        are the caller's to add), not ending the stream."""
        self.conn.h2.send_headers(self.stream_id, response_header_list(status, headers))
        self._head_sent = True
        self.conn.wake_writer()

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Send ``data`` as DATA frames as the windows allow (``end_stream``: then close our
        side). Raises ClientDisconnected when the stream was reset or already closed."""
        try:
            await self._send_data(data, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise self._closed_error(exc) from None

    def _closed_error(self, exc: h2.exceptions.ProtocolError) -> Exception:
        """ClientDisconnected for a send h2 refused on a closed stream or connection."""
        if isinstance(exc, h2.exceptions.StreamClosedError) or self.reset or self.conn.h2.closed:
            return ClientDisconnected(f"{self.conn.peer} closed stream {self.stream_id}")
        return exc  # (our bug)

    # -- the reader's side ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._body.append(data)
        self._signal()

    def ended(self) -> None:
        self.body_ended = True
        self._signal()

    def was_reset(self) -> None:
        """The client reset the stream (or the connection ended): the app's ``receive()``
        answers ``http.disconnect`` at once and its ``send()`` raises ClientDisconnected."""
        self.reset = True
        self._signal()
        self.conn.open_windows()  # (a write waiting for window sees the reset)

    def _signal(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_changed(self) -> None:
        """Wait until body arrives, the stream ends or is reset, or the response is done."""
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    # -- the stream's task ------------------------------------------------------------------

    async def run(self, on_first_wait: Callable[[], None]) -> None:
        """Run the request cycle (admitted by the connection; the cycle releases it).

        The connection's reader calls this: the app runs in the reader's task until it
        first waits, when ``on_first_wait()`` moves the reader to a new task; this task then
        stays with the app. As on HTTP/1.1, streamed chunks the app sends back to back are
        coalesced: once the app waits for anything, another task writes what it left
        buffered (``RequestCycle.flush_until_done``). A response the cycle aborted after
        its head left is reset (INTERNAL_ERROR): the client must not take it as complete.
        """
        cycle = RequestCycle(self, self.scope, self.encoder, self.method, False)
        try:

            def first_wait() -> None:
                on_first_wait()
                self.conn.nursery.start_soon(cycle.flush_until_done)

            await UntilFirstWait(cycle.run(), contextvars.copy_context(), first_wait)
            if not self.reset:
                if cycle.aborted and self._head_sent and not self._ended:
                    self.conn.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
                elif self.body_error is not None and not self.body_ended:
                    # Answered (408, 413) before the body ended: the client may stop
                    # sending it (RFC 9113 §8.1).
                    self.conn.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
        finally:
            if self._body:
                # Body the app never took still counts on the connection's window: give
                # it back, or every such stream would shrink that window for good.
                self.conn.credit(self.stream_id, sum(map(len, self._body)))
                self._body = []
            self.conn.stream_exited(self)

    def abandon(self) -> None:
        """The connection closed before the app was called: free the stream's places."""
        self.state.release()  # (admitted by the connection; a cycle would have released it)
        self.conn.stream_exited(self)
