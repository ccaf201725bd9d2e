"""One HTTP/2 connection: a reader, a writer and a task per stream (layer 4).

Shape (issue 18): the connection task owns the ``h2`` state machine and runs the
**reader**, which feeds received bytes to ``h2`` and turns its events into state changes
of the streams, and never waits for an app. A **writer** task sends whatever ``h2`` has
queued, woken by :meth:`HTTP2Connection.wake_writer`; it ends when nothing is left to send
and no stream runs, and queueing starts it again (an idle connection holds no task but
its own, and no ``trio.Event`` nobody waits on: memory per idle connection). Each request is a
``connection.http2_stream.HTTP2Stream`` running the same ``RequestCycle`` as HTTP/1.1. As
HTTP/1.1 does in its connection task, the reader calls each new stream's app itself until
the app first waits (a response made at once costs no task); then the reader goes on in a
new task of the connection's nursery and the app keeps the old one (``_start_streams``).
Closing the connection cancels that nursery, so nothing outlives it. Bytes move through a
``connection.stream.ConnectionStream``, as on HTTP/1.1.

How a connection gets here: ``connection.edge`` saw ALPN ``h2`` or the prior-knowledge
preface (``server.serve_connection``), or ``connection.http1`` answered ``Upgrade: h2c``
with 101 and hands over the request as stream 1.

Flow control, both ways and per stream:

* **Inbound.** DATA is buffered on its stream and credited back to the client
  (WINDOW_UPDATE) only as the app takes it through ``receive()``. A stream's buffer is
  thus bounded by its window (``--h2-initial-window-size``); a client sending past it
  breaks flow control and ``h2`` ends the connection with FLOW_CONTROL_ERROR. An app that
  does not read stalls only its own stream: the reader goes on with PINGs, SETTINGS and
  the other streams.
* **Outbound.** ``send()`` of a body waits for its stream's and the connection's window,
  woken by WINDOW_UPDATE and SETTINGS; a client that never opens it gets the stream reset
  after ``SEND_WINDOW_TIMEOUT``. Queued bytes are bounded too: what ``h2`` queues is
  moved to the connection's outbox at once (:meth:`HTTP2Connection.wake_writer`), so it
  is counted even while the writer is blocked; a sender waits while more than
  ``MAX_OUTBOUND_BACKLOG`` bytes are unsent, and so does the reader (a PING or SETTINGS
  flood from a client that does not read the answers).

Timeouts: an idle connection (no stream running) gets GOAWAY after
``--timeout-keep-alive``; a header block begun must end (END_HEADERS) within
``--timeout-request-header``, whether or not other streams run; a stream's request body
is bounded by ``--timeout-request-body`` and ``--limit-request-body``
(``connection.http2_stream``).

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
from typing import Any, Final

import h2.connection
import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from ..errors import ClientDisconnected
from ..protocol.h2_engine import h2_connection
from ..protocol.http2 import (
    MAX_OUTBOUND_BACKLOG,
    RequestHead,
    ResetBudget,
    StreamError,
    connection_window_increment,
    request_head,
)
from ..protocol.scope import ConnectionFacts, http_scope
from .http2_stream import HTTP2Stream
from .http2_websocket import H2WebSocket
from .state import ServerState
from .stream import LINGER_TIMEOUT, ConnectionStream

logger = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 64 * 1024
WRITER_TASK: Final = "h2 writer"  # (started again after the connection was idle)
READER_TASK: Final = "h2 reader"  # (the reader, after an app it called waited)
_LAST_STREAM_ID: Final = 2**31 - 1


class HTTP2Connection:
    """An HTTP/2 connection from its preface to its close (see the module docstring).

    Args:
        stream: the transport (TCP, TLS, UNIX or the testing module's memory stream).
        state: the server's shared state.
        facts: the connection's facts for the scopes (``connection.edge`` made them).
        received: bytes already read (the preface and what followed it).
        upgrade_settings: the ``HTTP2-Settings`` of an ``Upgrade: h2c`` request; with
            ``upgrade_head`` the request that is then answered as stream 1.
        upgrade_admitted: that request already holds its ``--limit-concurrency`` place
            (``ServerState.admit``), which stream 1 takes over.
    """

    # (Slots: every idle connection holds one; a dict of this many attributes is 1.5 KiB.)
    __slots__ = tuple(
        """_backlog_low _budget _closing _head_started _idle _last_stream_id _outbox _read_over
        _read_scope _reader_turn _received _stopped _to_start _unread _unsent _upgrade_admitted
        _upgrade_head _upgrade_settings _window_opened _writer_done _writer_exited _writer_wake
        broken draining facts h2 io nursery peer running state stream streams
        websockets""".split()  # noqa: SIM905
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        state: ServerState,
        facts: ConnectionFacts,
        *,
        received: bytes = b"",
        upgrade_settings: bytes | None = None,
        upgrade_head: RequestHead | None = None,
        upgrade_admitted: bool = False,
    ) -> None:
        self.stream = stream
        # Reads and writes go through a ConnectionStream, as on HTTP/1.1: on a plain socket
        # straight to the descriptor (no coroutine wrappers parked while idle, one
        # vectored write of what is queued instead of a join and send_all), and the bytes
        # are counted for /metrics there.
        self.io = ConnectionStream(
            stream, state.read_buffer, facts, self._write_broke, state.metrics
        )
        self.state = state
        self.facts = facts
        self.peer = facts.peer
        self._received = received
        self._upgrade_settings = upgrade_settings
        self._upgrade_head = upgrade_head
        self._upgrade_admitted = upgrade_admitted
        self.h2 = h2_connection(state.config)
        self.streams: dict[int, HTTP2Stream] = {}
        self.websockets: set[H2WebSocket] | None = None  # (drain() closes them with 1012)
        # Streams whose task still runs, reset or not: what counts against the limit.
        self.running = 0
        self._window_opened: trio.Event | None = None  # (made when a send() waits for window)
        self._writer_wake: trio.Event | None = None  # (made by the writer when it waits)
        # Events made only when a task waits on them (an idle connection holds none).
        self._backlog_low: trio.Event | None = None
        # What waits to be sent, taken from h2 as soon as it is queued (wake_writer), so
        # that it is counted while the writer is blocked: the outbound backlog.
        self._outbox: list[bytes] = []
        self._unsent = 0  # bytes in the outbox and in the write under way
        self._head_started: float | None = None  # a header block began, not yet ended
        self._budget: ResetBudget | None = None  # (made at the first reset)
        self._closing = False
        self.draining = False
        self._last_stream_id = 0
        self._idle: trio.Event | None = None  # (a stream task exited: _flush_and_stop)
        self.broken = False  # the transport failed: nothing more can be sent
        self._read_scope: trio.CancelScope | None = None
        self._stopped = False
        self._to_start: list[HTTP2Stream] = []  # opened streams whose apps the reader calls next
        self._reader_turn = 0  # counts hand-overs of the reader to a new task (_move_reader)
        self._read_over = False  # the connection ends: start what is opened, read no more
        self._unread = b""  # the rest of a large read, for h2 after a yield
        self._writer_exited = False
        self._writer_done: trio.Event | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends. Returns only then; closes the stream.

        Cancellation: cancelling this cancels every stream task (they live in its nursery).
        """
        self.state.connections.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self._start(nursery)
                nursery.start_soon(self._write_loop, name=WRITER_TASK)
                await self._read(self._received)
        except Exception:
            logger.exception("%s - internal error in HTTP/2 connection task", self.peer)
        finally:
            self.state.connections.discard(self)
            await self.io.aclose()  # (lingering after our GOAWAY, forcefully if cancelled)

    def _start(self, nursery: trio.Nursery) -> None:
        conn = self.h2
        if self._upgrade_settings is not None:
            conn.initiate_upgrade_connection(self._upgrade_settings)
        else:
            conn.initiate_connection()
        conn.increment_flow_control_window(connection_window_increment(self.state.config))
        self.wake_writer()
        self.nursery = nursery
        if self._upgrade_head is not None:
            self._open_stream(1, self._upgrade_head, ended=True, admitted=self._upgrade_admitted)

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY now, stop once the streams in flight have finished.

        RFC 9113 §6.8: first a GOAWAY naming the largest stream id (requests already on
        their way are still served), then after the streams ended the one naming the last
        stream accepted.
        """
        if self.draining:
            return
        self.draining = True
        for session in list(self.websockets or ()):
            session.drain()  # (a Close with 1012, as on HTTP/1.1)
        frame = GoAwayFrame(0)
        frame.last_stream_id = _LAST_STREAM_ID
        frame.error_code = ErrorCodes.NO_ERROR
        self.wake_writer()  # (what h2 queued before goes first)
        self._queue(frame.serialize())  # (h2 cannot send it and stay usable)
        self._stop_reading_if_done()

    def _stop_reading_if_done(self) -> None:
        """Draining and no stream left in flight: the reader stops waiting for bytes."""
        if self.draining and not self.running and self._read_scope is not None:
            self._read_scope.cancel()

    async def _flush_and_stop(self, nursery: trio.Nursery) -> None:
        """After reading ended: wait for the streams (draining), send GOAWAY, stop."""
        if self.draining and not self.broken and self.running:
            grace = self.state.config.timeout_graceful_shutdown
            with trio.move_on_after(math.inf if grace is None else grace):
                while self.running:
                    self._idle = trio.Event()
                    await self._idle.wait()
        if not self.broken:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                if not self.h2.closed:
                    self.h2.close_connection(last_stream_id=self._last_stream_id)
            self.wake_writer()
            with trio.move_on_after(LINGER_TIMEOUT):
                # The writer sends what is queued (the GOAWAY), then ends: send_eof is ours.
                self._stopped = True
                self.wake_writer()
                if not self._writer_exited:
                    self._writer_done = trio.Event()
                    await self._writer_done.wait()
                # Let the GOAWAY arrive: a close with unread bytes would reset the connection
                # (RFC 9113 §6.8: the sender of a GOAWAY keeps the connection open a while).
                self.io.linger_on_close()
        for stream in self.streams.values():
            stream.was_reset()
        nursery.cancel_scope.cancel()

    # -- reading ------------------------------------------------------------------------------

    async def _read(self, data: bytes) -> None:
        """The reader, in whichever task holds it (the connection's at first; another one
        after an app it called waited: :meth:`_move_reader`), which closes the connection."""
        turn = self._reader_turn
        try:
            await self._read_loop(data, turn)
        finally:
            if self._reader_turn == turn:  # (not handed over: reading ended in this task)
                for stream in self._to_start:  # (cancelled before their apps were called)
                    stream.abandon()
                self._to_start = []
                await self._flush_and_stop(self.nursery)

    async def _read_loop(self, data: bytes, turn: int) -> None:
        config = self.state.config
        # (/metrics: what connection.edge read first; self.io counts the rest. An h2c
        # upgrade's bytes were counted by its HTTP/1.1 stream.)
        metrics = self.state.metrics
        if metrics is not None and turn == 0 and self._upgrade_settings is None:
            metrics.received_bytes += len(data)
        while True:
            if len(data) > RECEIVE_SIZE:  # (fair: h2 takes a large read in parts, yielding)
                data, self._unread = data[:RECEIVE_SIZE], data[RECEIVE_SIZE:]
            if data and not self._receive(data):
                self._read_over = True
            if self._to_start:
                await self._start_streams(turn)
                if self._reader_turn != turn:
                    return  # (an app waited: the reader, and _unread, went on in another task)
            if self._read_over or (self.draining and not self.running):
                return
            await self.wait_backlog_below()
            if self.broken:  # (a write failed: the peer is gone, what it sent is moot)
                return
            if self._unread:
                data, self._unread = self._unread, b""
                continue
            now = trio.current_time()
            deadline = now + config.timeout_keep_alive if not self.running else math.inf
            head_deadline = self._head_deadline(now)
            deadline = min(deadline, head_deadline)
            data = b""
            with trio.move_on_at(deadline) as waited:
                self._read_scope = waited
                try:
                    data = await self.io.receive()  # (b"" once the peer is gone)
                finally:
                    self._read_scope = None
            if waited.cancelled_caught:
                if trio.current_time() >= head_deadline:
                    logger.info("%s - HTTP/2 request head not received in time, closing", self.peer)
                    return
                if not self.running:
                    logger.debug("%s - idle HTTP/2 connection, sending GOAWAY", self.peer)
                    return
                continue
            if not data:
                self.broken = True
                return

    async def _start_streams(self, turn: int) -> None:
        """Call the apps of the streams just opened, in order, in this task (the reader's),
        each until it first waits: a response made at once costs no task (as on HTTP/1.1).
        When an app waits for anything, the reader first moves on in a new task
        (:meth:`_move_reader`), so no stream ever stalls the reading of the others."""
        while self._to_start and self._reader_turn == turn:
            stream = self._to_start.pop(0)
            await stream.run(self._move_reader)

    def _move_reader(self) -> None:
        """An app the reader called is about to wait: the reader goes on in a new task."""
        self._reader_turn += 1
        self.nursery.start_soon(self._read, b"", name=READER_TASK)

    def _head_deadline(self, now: float) -> float:
        """When the header block under way must be complete (``--timeout-request-header``,
        as on HTTP/1.1), or infinity. h2 emits nothing until END_HEADERS, so the open block
        is read from its frame buffer (a HEADERS frame waiting for its CONTINUATIONs)."""
        if not getattr(self.h2.incoming_buffer, "_headers_buffer", None):
            self._head_started = None
            return math.inf
        if self._head_started is None:
            self._head_started = now
        return self._head_started + self.state.config.timeout_request_header

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
                self._peer_went_away(event)
                return False
        self.wake_writer()
        return True

    def _peer_went_away(self, event: h2.events.ConnectionTerminated) -> None:
        """The peer's GOAWAY: h2 sends nothing more, so no stream in flight can be answered.
        Apps not called yet are not called; the others see a disconnect, as on a drop."""
        logger.debug("%s - GOAWAY (%s) received", self.peer, event.error_code)
        self._closing = True
        for stream in self._to_start:
            stream.abandon()
        self._to_start = []
        for stream in list(self.streams.values()):
            stream.was_reset()

    def _spend_budget(self) -> bool:
        """Count a reset in the budget (rapid reset, MadeYouReset); False when it is spent."""
        if self._budget is None:
            self._budget = ResetBudget()
        return self._budget.spend(trio.current_time())

    def _spend_reset(self) -> bool:
        if self._spend_budget():
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
        if head.protocol is not None and config.ws == "none":
            # RFC 8441 §3: :protocol without our SETTINGS_ENABLE_CONNECT_PROTOCOL = 1.
            logger.info("%s - stream %d: extended CONNECT not enabled", self.peer, stream_id)
            self.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        self._open_stream(stream_id, head, ended=event.stream_ended is not None)

    def _open_stream(
        self, stream_id: int, head: RequestHead, *, ended: bool, admitted: bool = False
    ) -> None:
        """Start the task of a new stream, or answer 503 past ``--limit-concurrency``."""
        self._last_stream_id = max(self._last_stream_id, stream_id)
        state = self.state
        tunnel = head.protocol is not None  # an extended CONNECT (RFC 8441): a WebSocket
        scope = {} if tunnel else self._scope(head)
        stream = HTTP2Stream(self, stream_id, head.method, scope, body_ended=ended)
        if not admitted and state.metrics is not None:
            state.metrics.h2_streams += 1  # (not a keep-alive reuse: ServerMetrics.sample)
        if not admitted and not state.admit():  # (released by its RequestCycle or H2WebSocket)
            logger.warning(
                "%s - concurrency limit %s reached, answering 503 on stream %d",
                self.peer,
                state.config.limit_concurrency,
                stream_id,
            )
            if state.metrics is not None:
                state.metrics.concurrency_rejections += 1
            stream.answer(503)
            self.wake_writer()
            return
        self.running += 1
        self.streams[stream_id] = stream
        if tunnel:
            session = H2WebSocket(stream, head, self.facts)
            if self.websockets is None:
                self.websockets = set()
            self.websockets.add(session)
            self.nursery.start_soon(self._run_websocket, session, name=f"h2 websocket {stream_id}")
        else:
            self._to_start.append(stream)  # (the reader calls its app: _start_streams)

    async def _run_websocket(self, session: H2WebSocket) -> None:
        """A WebSocket stream's task (it ends the stream and frees its places itself)."""
        try:
            await session.run()
        finally:
            if self.websockets is not None:
                self.websockets.discard(session)

    def _scope(self, head: RequestHead) -> dict[str, Any]:
        """The ``http`` scope of a stream: HTTP/1.1's, with ``http_version`` "2" (and the
        same response extensions: trailers, early hints, pathsend)."""
        return http_scope(
            head.method, head.target, b"2", head.headers, self.facts, self.state.lifespan_state
        )

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
        if not self._closing and not self._spend_budget():
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
        if self._idle is not None:
            self._idle.set()
        if not self.running:
            # Let h2 forget its closed streams now (it does so only when the next one
            # opens): an idle connection keeps no finished stream.
            self.h2.forget_closed_streams()
        self._stop_reading_if_done()

    def wake_writer(self) -> None:
        """Something was queued on h2: move it to the outbox and wake the writer."""
        data = self.h2.data_to_send()
        if data:
            self._queue(data)
        else:
            self._wake()

    def _wake(self) -> None:
        if self._writer_wake is not None:
            self._writer_wake.set()

    def _queue(self, data: bytes) -> None:
        self._outbox.append(data)
        self._unsent += len(data)
        self._wake()
        if self._writer_exited and not self.broken and not self._stopped:
            # (The writer ends while the connection is idle: it costs a task's memory.)
            self._writer_exited = False
            self.nursery.start_soon(self._write_loop, name=WRITER_TASK)

    def open_windows(self) -> None:
        """Wake every send() waiting for flow-control window (they re-check theirs)."""
        if self._window_opened is not None:
            self._window_opened.set()
            self._window_opened = None

    async def wait_window_opened(self) -> None:
        """Wait for the next WINDOW_UPDATE, SETTINGS change or reset (:meth:`open_windows`)."""
        if self._window_opened is None:
            self._window_opened = trio.Event()
        await self._window_opened.wait()

    async def wait_backlog_below(self, bound: int = MAX_OUTBOUND_BACKLOG) -> None:
        """Wait while more than ``bound`` bytes wait to be sent (bounded memory)."""
        while self._unsent > bound and not self.broken:
            if self._backlog_low is None:
                self._backlog_low = trio.Event()
            await self._backlog_low.wait()
        await trio.lowlevel.checkpoint()

    # -- writing -------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """The one writer: send what h2 (and drain) queued. Returns when the peer is gone,
        or when the connection is idle (``_queue`` starts it again)."""
        try:
            await self._write_until_stopped()
        finally:
            self._writer_exited = True
            if self._writer_done is not None:
                self._writer_done.set()

    async def _write_until_stopped(self) -> None:
        io = self.io
        while True:
            if self._stopped or self._outbox:
                await trio.lowlevel.checkpoint()  # (streams may add to the batch)
            elif not self.running:
                return  # (idle: the next _queue starts the writer again)
            else:
                self._writer_wake = trio.Event()
                await self._writer_wake.wait()
                self._writer_wake = None
            pending = self.h2.data_to_send()  # (queued without a wake_writer(), if any)
            if pending:
                self._outbox.append(pending)
                self._unsent += len(pending)
            outbox = self._outbox
            if not outbox:
                if self._stopped:
                    return
                continue
            self._outbox = []
            size = self._unsent
            try:
                # (One vectored write of the pieces on a plain socket: no join.)
                await io.write(outbox if len(outbox) > 1 else outbox[0])
            except ClientDisconnected:
                self._write_broke()
                for stream in self.streams.values():
                    stream.was_reset()
                return
            finally:
                self._unsent -= size
                if self._backlog_low is not None:
                    self._backlog_low.set()
                    self._backlog_low = None

    def _write_broke(self) -> None:
        """A write failed or was interrupted midway: nothing more can be sent."""
        self.broken = True
