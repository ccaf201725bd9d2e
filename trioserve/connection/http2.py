"""One HTTP/2 connection: a reader, a writer and a task per stream (layer 4).

Shape (issue 18): the connection task owns the ``h2`` state machine and runs the
**reader**, which feeds received bytes to ``h2`` and turns its events into state changes
of the streams, and never awaits an app. A **writer** task sends whatever ``h2`` has
queued, woken by :meth:`HTTP2Connection.wake_writer`. Each request is an
:class:`HTTP2Stream` whose app call runs as a task in the connection's nursery; closing
the connection cancels them all, so nothing outlives it.

Flow control, both ways and per stream:

* **Inbound.** DATA is buffered on its stream and credited back to the client
  (WINDOW_UPDATE) only as the app takes it through ``receive()``. A stream's buffer is
  thus bounded by its window (``--h2-initial-window-size``); a client sending past it
  breaks flow control and ``h2`` ends the connection with FLOW_CONTROL_ERROR. An app that
  does not read stalls only its own stream: the reader goes on with PINGs, SETTINGS and
  the other streams.
* **Outbound.** ``send()`` of a body waits for its stream's and the connection's window,
  woken by WINDOW_UPDATE and SETTINGS; a client that never opens it gets the stream reset
  after ``SEND_WINDOW_TIMEOUT``. Queued bytes are bounded too: a sender waits while more
  than ``MAX_OUTBOUND_BACKLOG`` bytes are unsent, and so does the reader (a PING or
  SETTINGS flood from a client that does not read the answers).

Defences (numbers in ``protocol/http2.py``): resets from either side spend a
:class:`~trioserve.protocol.http2.ResetBudget` (rapid reset, MadeYouReset); a reset
stream keeps its place among the concurrent streams until its task has exited (the Go
fix for CVE-2023-39325); streams past the limit are refused with REFUSED_STREAM.

Peer errors (``h2.exceptions.ProtocolError``) are answered by ``h2``'s own GOAWAY with
the RFC 9113 code and logged at INFO in one line, never with a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Final

import h2.connection
import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from ..app.call import call_app
from ..errors import AppProtocolError, ClientDisconnected
from ..protocol.http2 import (
    MAX_OUTBOUND_BACKLOG,
    SEND_WINDOW_TIMEOUT,
    RequestHead,
    ResetBudget,
    StreamError,
    connection_window_increment,
    h2_connection,
    request_head,
    response_header_list,
)
from ..protocol.response_heads import check_fields, parse_body, validate_headers
from ..protocol.scope import ConnectionFacts, http_scope
from .state import ServerState, log_access

logger = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 64 * 1024
_DISCONNECT: Final = {"type": "http.disconnect"}
_LAST_STREAM_ID: Final = 2**31 - 1
# After the last GOAWAY: how long, and how many bytes, to read and drop before the close.
LINGER_TIMEOUT: Final = 1.0
MAX_LINGER_BYTES: Final = 1024 * 1024


class HTTP2Stream:
    """One request on an HTTP/2 connection: the app call with its ``receive``/``send``."""

    def __init__(self, conn: HTTP2Connection, stream_id: int, scope: dict[str, Any]) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.scope = scope
        self._body: list[bytes] = []
        self.body_ended = False
        self.reset = False  # the client reset the stream, or the connection ended
        self.done = False  # the response ended (or was aborted)
        self.changed = trio.Event()  # body arrived, stream ended or reset
        self.status: int | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers = False
        self.started = False  # the HEADERS frame is queued
        self._told_end = False  # receive() has returned more_body=False
        self.body_bytes = 0
        self._start_time = time.perf_counter() if conn.state.access_log_enabled() else 0.0

    # -- the reader's side ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._body.append(data)
        self._signal()

    def ended(self) -> None:
        self.body_ended = True
        self._signal()

    def was_reset(self) -> None:
        self.reset = True
        self._signal()
        self.conn.open_windows()  # (a send() waiting for window sees the reset)

    def _signal(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- the app task -------------------------------------------------------------------------

    async def run(self) -> None:
        """Call the app, then end the response one way or another (500 or RST_STREAM)."""
        conn = self.conn
        state = conn.state
        try:
            exc = await call_app(state.app, self.scope, self.receive, self.send)
            if exc is not None:
                state.report_app_error(exc)
            if self.done or self.reset:
                return
            if not self.started:
                if exc is None:
                    logger.error("ASGI callable returned without starting response")
                self._answer(500, b"Internal Server Error")
            else:
                if exc is None:
                    logger.error("ASGI callable returned without completing response")
                conn.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
        finally:
            state.active_requests -= 1
            if not self.done:
                self._finish(aborted=True)
            conn.stream_exited(self)

    def _answer(self, status: int, body: bytes) -> None:
        """Answer on this stream before the app started a response (an error)."""
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        headers.append((b"content-length", str(len(body)).encode()))
        self.status = status
        fields = response_header_list(status, [*self.conn.state.response_headers(), *headers])
        conn = self.conn
        with contextlib.suppress(h2.exceptions.ProtocolError):
            conn.h2.send_headers(self.stream_id, fields)
            conn.h2.send_data(self.stream_id, body, end_stream=True)
            self.body_bytes = len(body)
            conn.wake_writer()
        self._finish(aborted=False)

    def _finish(self, *, aborted: bool) -> None:
        self.done = True
        if self._start_time:
            log_access(
                self.conn.state,
                self.scope,
                self.status,
                self.body_bytes,
                time.perf_counter() - self._start_time,
                aborted=aborted,
            )

    async def receive(self) -> dict[str, Any]:
        """The app's ``receive``: body pieces (credited back as taken), then disconnect."""
        while True:
            if self.reset or self.done:
                return _DISCONNECT
            if self._body:
                body = b"".join(self._body) if len(self._body) > 1 else self._body[0]
                self._body = []
                self.conn.credit(self.stream_id, len(body))
                return {"type": "http.request", "body": body, "more_body": not self.body_ended}
            if self.body_ended and not self._told_end:
                self._told_end = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await self.changed.wait()  # (after the body: until the reset or the response end)

    async def send(self, message: Any) -> None:
        """The app's ``send``: validate, then queue HEADERS / DATA on ``h2``."""
        try:
            message_type = message["type"]
        except (TypeError, KeyError, IndexError):
            raise AppProtocolError(
                f"ASGI message must be a dict with a 'type', got {message!r}"
            ) from None
        if self.reset:
            raise ClientDisconnected(f"{self.conn.peer} reset stream {self.stream_id}")
        if self.done:
            raise AppProtocolError(f"{message_type!r} sent after the response completed")
        if message_type == "http.response.start":
            if self.status is not None:
                raise AppProtocolError("'http.response.start' sent twice")
            status = message.get("status")
            if type(status) is not int or not 100 <= status <= 999:
                raise AppProtocolError(f"'status' must be an int in 100..999, got {status!r}")
            headers = validate_headers(message.get("headers"))
            check_fields(headers, self.conn.state.response_heads.checked)
            self.status = status
            self._headers = headers
            self._trailers = bool(message.get("trailers", False))
        elif message_type == "http.response.body":
            if self.status is None:
                raise AppProtocolError("'http.response.body' sent before 'http.response.start'")
            body, more_body = parse_body(message)
            end = not more_body and not self._trailers
            if not self.started:
                self._send_headers(end_stream=end and not body)
            if body:
                await self._send_data(body, end_stream=end)
            if not more_body and not self._trailers:
                self._finish(aborted=False)
        elif message_type == "http.response.trailers":
            if not self._trailers or not self.started:
                raise AppProtocolError("'http.response.trailers' without 'trailers': True")
            trailers = validate_headers(message.get("headers"))
            check_fields(trailers, self.conn.state.response_heads.checked)
            if not message.get("more_trailers", False):
                fields = [(name.lower(), value) for name, value in trailers]
                self.conn.h2.send_headers(self.stream_id, fields, end_stream=True)
                self.conn.wake_writer()
                self._finish(aborted=False)
        else:
            raise AppProtocolError(f"unexpected ASGI message type {message_type!r} for http")

    def _send_headers(self, *, end_stream: bool) -> None:
        assert self.status is not None
        fields = response_header_list(
            self.status, [*self.conn.state.response_headers(), *self._headers]
        )
        self.conn.h2.send_headers(self.stream_id, fields, end_stream=end_stream)
        self.started = True
        self.conn.wake_writer()

    async def _send_data(self, body: bytes, *, end_stream: bool) -> None:
        """Queue ``body`` as DATA frames as the windows allow (see the module docstring)."""
        conn = self.conn
        view = memoryview(body)
        while True:
            if self.reset:
                raise ClientDisconnected(f"{conn.peer} reset stream {self.stream_id}")
            window = conn.h2.local_flow_control_window(self.stream_id)
            size = min(window, conn.h2.max_outbound_frame_size, len(view))
            if size > 0 or not view:
                conn.h2.send_data(
                    self.stream_id,
                    view[:size].tobytes(),
                    end_stream=end_stream and size == len(view),
                )
                self.body_bytes += size
                view = view[size:]
                conn.wake_writer()
                if not view:
                    break
                await conn.wait_backlog_below()
                continue
            with trio.move_on_after(SEND_WINDOW_TIMEOUT) as waited:
                await conn.window_opened.wait()
            if waited.cancelled_caught:
                logger.info(
                    "%s - stream %d: no flow-control window for %.0fs, resetting",
                    conn.peer,
                    self.stream_id,
                    SEND_WINDOW_TIMEOUT,
                )
                conn.reset_stream(self.stream_id, ErrorCodes.CANCEL)
                raise ClientDisconnected(f"{conn.peer} never opened its window")
        await conn.wait_backlog_below()


class HTTP2Connection:
    """An HTTP/2 connection from its preface to its close (see the module docstring).

    Args:
        stream: the transport (TCP, TLS, UNIX or the testing module's memory stream).
        state: the server's shared state.
        facts: the connection's facts for the scopes (``connection.edge`` made them).
        received: bytes already read (the preface and what followed it).
        upgrade_settings: the ``HTTP2-Settings`` of an ``Upgrade: h2c`` request; with
            ``upgrade_head`` the request that is then answered as stream 1.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        state: ServerState,
        facts: ConnectionFacts,
        *,
        received: bytes = b"",
        upgrade_settings: bytes | None = None,
        upgrade_head: RequestHead | None = None,
    ) -> None:
        self.stream = stream
        self.state = state
        self.facts = facts
        self.peer = facts.peer
        self._received = received
        self._upgrade_settings = upgrade_settings
        self._upgrade_head = upgrade_head
        self.h2: h2.connection.H2Connection = h2_connection(state.config)
        self.streams: dict[int, HTTP2Stream] = {}
        # Streams whose task still runs, reset or not: what counts against the limit.
        self.running = 0
        self.window_opened = trio.Event()
        self._writer_wake = trio.Event()
        self._backlog_low = trio.Event()
        self._unsent = 0
        self._extra: list[bytes] = []  # frames h2 cannot send while it stays usable (GOAWAY)
        self._budget = ResetBudget()
        self._closing = False
        self.draining = False
        self._last_stream_id = 0
        self._idle = trio.Event()
        self._broken = False
        self._read_scope: trio.CancelScope | None = None
        self._stopped = False
        self._writer_done = trio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends. Returns only then; closes the stream.

        Cancellation: cancelling this cancels every stream task (they live in its nursery).
        """
        self.state.connections.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self._start(nursery)
                nursery.start_soon(self._write_loop)
                try:
                    await self._read_loop()
                finally:
                    await self._flush_and_stop(nursery)
        except Exception:
            logger.exception("%s - internal error in HTTP/2 connection task", self.peer)
        finally:
            self.state.connections.discard(self)
            await trio.aclose_forcefully(self.stream)

    def _start(self, nursery: trio.Nursery) -> None:
        conn = self.h2
        if self._upgrade_settings is not None:
            conn.initiate_upgrade_connection(self._upgrade_settings)
        else:
            conn.initiate_connection()
        conn.increment_flow_control_window(connection_window_increment(self.state.config))
        self.wake_writer()
        self._nursery = nursery
        if self._upgrade_head is not None:
            self._open_stream(1, self._upgrade_head, ended=True)

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY now, stop once the streams in flight have finished.

        RFC 9113 §6.8: first a GOAWAY naming the largest stream id (requests already on
        their way are still served), then after the streams ended the one naming the last
        stream accepted.
        """
        if self.draining:
            return
        self.draining = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = _LAST_STREAM_ID
        frame.error_code = ErrorCodes.NO_ERROR
        self._extra.append(frame.serialize())
        self.wake_writer()
        self._stop_reading_if_done()

    def _stop_reading_if_done(self) -> None:
        """Draining and no stream left in flight: the reader stops waiting for bytes."""
        if self.draining and not self.running and self._read_scope is not None:
            self._read_scope.cancel()

    async def _flush_and_stop(self, nursery: trio.Nursery) -> None:
        """After reading ended: wait for the streams (draining), send GOAWAY, stop."""
        if self.draining and not self._broken and self.running:
            grace = self.state.config.timeout_graceful_shutdown
            with trio.move_on_after(math.inf if grace is None else grace):
                while self.running:
                    await self._idle.wait()
                    self._idle = trio.Event()
        if not self._broken:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                if self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
                    self.h2.close_connection(last_stream_id=self._last_stream_id)
            self.wake_writer()
            with trio.move_on_after(LINGER_TIMEOUT):
                # The writer sends what is queued (the GOAWAY), then ends: send_eof is ours.
                self._stopped = True
                self.wake_writer()
                await self._writer_done.wait()
                await self._linger()
        for stream in self.streams.values():
            stream.was_reset()
        nursery.cancel_scope.cancel()

    async def _linger(self) -> None:
        """Let the GOAWAY arrive: a close with unread bytes would reset the connection
        (RFC 9113 §6.8 asks the sender of a GOAWAY to keep the connection open a while)."""
        try:
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            discarded = 0
            while discarded < MAX_LINGER_BYTES:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                discarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    # -- reading ------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        config = self.state.config
        data: bytes | bytearray = self._received
        while True:
            if data and not self._receive(data):
                return
            if self.draining and not self.running:
                return
            await self.wait_backlog_below()
            timeout = config.timeout_keep_alive if not self.running else math.inf
            data = b""
            with trio.move_on_after(timeout) as waited:
                self._read_scope = waited
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                finally:
                    self._read_scope = None
            if waited.cancelled_caught:
                if not self.running:
                    logger.debug("%s - idle HTTP/2 connection, sending GOAWAY", self.peer)
                    return
                continue
            if not data:
                self._broken = True
                return

    def _receive(self, data: bytes | bytearray) -> bool:
        """Feed ``data`` to h2 and act on its events; False when the connection ends."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the RFC 9113 code; the peer is at fault.
            logger.info("%s - HTTP/2 protocol error: %s, closing", self.peer, exc)
            self.wake_writer()
            self._closing = True
            return False
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and not stream.reset:
                    stream.data_received(event.data)
                else:  # (a stream already gone: its bytes still count on the connection)
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.ended()
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.was_reset()
                if not self._spend_reset():
                    return False
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self.open_windows()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._closing = True
                return False
        self.wake_writer()
        return True

    def _spend_reset(self) -> bool:
        if self._budget.spend(trio.current_time()):
            return True
        logger.info("%s - too many HTTP/2 stream resets, closing (rapid reset)", self.peer)
        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=self._last_stream_id)
        self.wake_writer()
        self._closing = True
        return False

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        config = self.state.config
        if self.draining or self.running >= config.h2_max_concurrent_streams:
            # (A reset stream counts until its task has exited: CVE-2023-39325.)
            self.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        try:
            head = request_head(list(event.headers or ()))
        except StreamError as exc:
            logger.info("%s - stream %d: malformed request: %s", self.peer, stream_id, exc)
            self.reset_stream(stream_id, exc.code)
            return
        self._open_stream(stream_id, head, ended=event.stream_ended is not None)

    def _open_stream(self, stream_id: int, head: RequestHead, *, ended: bool) -> None:
        self._last_stream_id = max(self._last_stream_id, stream_id)
        state = self.state
        stream = HTTP2Stream(self, stream_id, self._scope(head))
        if ended:
            stream.body_ended = True
        limit = state.config.limit_concurrency
        state.count_request()
        state.active_requests += 1
        self.running += 1
        if limit is not None and state.active_requests > limit:
            stream._answer(503, b"Service Unavailable")
            state.active_requests -= 1
            self.running -= 1
            return
        self.streams[stream_id] = stream
        self._nursery.start_soon(stream.run, name=f"h2 stream {stream_id}")

    def _scope(self, head: RequestHead) -> dict[str, Any]:
        """The ``http`` scope of a stream: HTTP/1.1's, with ``http_version`` "2"."""
        scope = http_scope(
            head.method, head.target, b"2", head.headers, self.facts, self.state.lifespan_state
        )
        scope["http_version"] = "2"
        scope["extensions"]["http.response.trailers"] = {}
        return scope

    # -- what the streams call -------------------------------------------------------------

    def credit(self, stream_id: int, size: int) -> None:
        """The app took ``size`` bytes of the stream's body: open the windows again."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.acknowledge_received_data(size, stream_id)
            self.wake_writer()

    def reset_stream(self, stream_id: int, code: ErrorCodes) -> None:
        """Reset a stream from our side (counted in the reset budget: MadeYouReset)."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.was_reset()
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)
        self.wake_writer()
        if not self._closing and not self._budget.spend(trio.current_time()):
            logger.info("%s - too many HTTP/2 stream resets, closing", self.peer)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self._closing = True
            self.wake_writer()

    def stream_exited(self, stream: HTTP2Stream) -> None:
        """A stream task ended: free its concurrency slot (only now: CVE-2023-39325)."""
        self.running -= 1
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self._idle.set()
        self._stop_reading_if_done()

    def wake_writer(self) -> None:
        self._writer_wake.set()

    def open_windows(self) -> None:
        """Wake every send() waiting for flow-control window (they re-check theirs)."""
        self.window_opened.set()
        self.window_opened = trio.Event()

    async def wait_backlog_below(self, bound: int = MAX_OUTBOUND_BACKLOG) -> None:
        """Wait while more than ``bound`` bytes wait to be sent (bounded memory)."""
        while self._unsent > bound and not self._broken:
            await self._backlog_low.wait()
        await trio.lowlevel.checkpoint()

    # -- writing -------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """The one writer: send what h2 (and drain) queued. Returns when the peer is gone."""
        try:
            await self._write_until_stopped()
        finally:
            self._writer_done.set()

    async def _write_until_stopped(self) -> None:
        while True:
            if not self._stopped:
                await self._writer_wake.wait()
            self._writer_wake = trio.Event()
            data = self.h2.data_to_send()
            if self._extra:
                data = b"".join(self._extra) + data
                self._extra = []
            if not data:
                if self._stopped:
                    return
                continue
            self._unsent = len(data)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken = True
                for stream in self.streams.values():
                    stream.was_reset()
                return
            finally:
                self._unsent = 0
                self._backlog_low.set()
                self._backlog_low = trio.Event()
