"""Request bodies on an HTTP/1.1 connection: read for the app, or discarded (layer 4).

:class:`HTTP1Body` is the body half of ``connection.http1.HTTPConnection`` (its base
class): what the request cycle's ``receive()`` reaches through ``RequestChannel``
(:meth:`HTTP1Body.receive_body`), and the discarding of what an app left unread, so that a
keep-alive connection can be reused. The connection's stream and parser are its own; the
body state belongs to the request being served (reset by the connection between requests).

Reading is on demand: the app's ``receive()`` reads from the socket only when it asks
(backpressure for free). Body bytes usually arrive right behind the head and are taken
without waiting; a wait for more is bounded by ``--timeout-request-body``. What crosses
``--limit-request-body`` never reaches the app. A bad, too large or stalled body ends the
request for the app (``http.disconnect``; ``body_error`` holds the status to answer with)
and the connection closes after the answer, lingering.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import h11
import trio

from ..protocol.http1_parser import HTTPParser, data_of
from .request_cycle import DISCONNECT, CycleView
from .state import ServerState
from .stream import ConnectionStream

logger = logging.getLogger(__name__)

# Bytes of pipelined requests buffered while a response is in progress; beyond this we
# stop reading (the client's TCP window then pushes back).
MAX_PIPELINE_BUFFER: Final = 256 * 1024
# An unread request body is drained (so the connection can be reused) up to this size.
MAX_DISCARD_BODY: Final = 1024 * 1024
# (Bound once: compiled, ``h11.X`` and ``trio.lowlevel.X`` are module attribute look-ups
# per use.)
_NEED_DATA: Final = h11.NEED_DATA
_DATA: Final = h11.Data
_END: Final = h11.EndOfMessage
_PEER_ERROR: Final = h11.RemoteProtocolError
_SEND_BODY: Final = h11.SEND_BODY
_DONE: Final = h11.DONE
_checkpoint_if_cancelled: Final = trio.lowlevel.checkpoint_if_cancelled


class HTTP1Body:
    """The request-body half of an HTTP/1.1 connection (see the module docstring).

    Attributes:
        reading: the cancel scope of the app task reading the socket in ``receive()``
            (the connection cancels it to take the reader role back), or None.
        body_done: the current request's body has been handed to the app whole.
        body_error: the status a failed request body calls for (400, 408, 413), or None.
        closing: the connection ends after the current response (drain, or a failed body).
    """

    __slots__ = (
        "_body_received",
        "_pending",
        "_reader_idle",
        "body_done",
        "body_error",
        "closing",
        "parser",
        "reading",
        "state",
        "stream",
    )

    def __init__(self, stream: ConnectionStream, state: ServerState, parser: HTTPParser) -> None:
        self.stream = stream
        self.state = state
        self.parser = parser
        self.closing = False  # drain requested: finish the current response, then close
        self.reading: trio.CancelScope | None = None
        self._reader_idle: trio.Event | None = None  # set when `reading` stops (per read)
        self._pending: Any = None  # an event peeked at after a body piece
        self._body_received = 0  # body bytes handed to the app (for --limit-request-body)
        self.body_done = False
        self.body_error: int | None = None

    def _next_body(self) -> None:
        """Forget the last request's body (the connection goes on to the next request)."""
        self._pending = None
        self._body_received = 0
        self.body_done = False

    def continue_bytes(self) -> bytes:
        """``100 Continue``, or b"" when the client no longer waits for it."""
        parser = self.parser
        if not parser.they_are_waiting_for_100_continue:
            return b""
        continue_ = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        return parser.send(continue_) or b""

    async def wait_reader_idle(self) -> None:
        """Wait until the read in progress in receive() (``reading``) has stopped."""
        if self.reading is not None and self._reader_idle is not None:
            await self._reader_idle.wait()

    async def _read(self, timeout: float = 0.0) -> bytes | None:
        """Read as the app's reader (nothing has arrived: callers tried receive_nowait
        first); None when the response completed meanwhile, or when nothing arrived within
        ``timeout`` seconds (0: no limit)."""
        idle = self._reader_idle = trio.Event()
        deadline = trio.current_time() + timeout if timeout else math.inf
        with trio.CancelScope(deadline=deadline) as scope:
            self.reading = scope
            try:
                return await self.stream.receive(wait_first=True)
            finally:
                self.reading = None
                idle.set()
        return None

    async def receive_body(self, cycle: CycleView) -> dict[str, Any]:
        """The request cycle's ``receive()`` past its own checks (``RequestChannel``)."""
        while self.reading is not None:
            # Another task of this app is already reading: wait for it, then report.
            await self.wait_reader_idle()
            if cycle.disconnected or cycle.done or self.stream.peer_gone:
                return DISCONNECT
        if self.body_done:
            return await self._wait_for_disconnect(cycle)
        stream = self.stream
        parser = self.parser
        while True:
            event = self._pending
            self._pending = None
            if event is None:
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError as exc:
                    return self._peer_error(exc)
            if isinstance(event, _PEER_ERROR):
                return self._peer_error(event)
            if event is _NEED_DATA:
                # Body bytes usually have arrived already (sent right behind the head):
                # read them without the cancel scope and Event a waiting read needs.
                await _checkpoint_if_cancelled()
                data = stream.receive_nowait()
                waited = data is None
                if data is None:
                    # --timeout-request-body bounds each wait for more of the body, as
                    # nginx's client_body_timeout does: a body trickling in, or shorter
                    # than its Content-Length, cannot hold the app and the connection.
                    timeout = self.state.config.timeout_request_body
                    data = await self._read(timeout)
                    if data is None and not cycle.done:
                        return self._peer_error(
                            h11.RemoteProtocolError(
                                f"nothing received for {timeout:g} s", error_status_hint=408
                            ),
                            "request body timed out",
                        )
                if not data:  # peer gone, EOF, or the response completed meanwhile
                    return DISCONNECT
                parser.receive_data(data)  # (fed before any yield: bytes stay in order)
                if not waited:
                    await stream.read_fairly(len(data))
                    if cycle.done:  # the connection task reads now
                        return DISCONNECT
                continue
            if type(event) is _DATA:
                body = data_of(event)
                limit = self.state.config.limit_request_body
                if limit:
                    # What crosses --limit-request-body never reaches the app. (A chunked
                    # body is counted here; a larger Content-Length got 413 before the app
                    # was called, from check_request.)
                    self._body_received += len(body)
                    if self._body_received > limit:
                        return self._peer_error(
                            h11.RemoteProtocolError(
                                f"over the {limit}-byte --limit-request-body",
                                error_status_hint=413,
                            ),
                            "request body too large",
                        )
                # Peek so a body that is complete in the buffer ends with more_body=False.
                following: object
                try:
                    following = parser.next_event()
                except h11.RemoteProtocolError as exc:
                    following = exc
                if type(following) is _END:
                    self.body_done = True
                    return {"type": "http.request", "body": body, "more_body": False}
                if following is not _NEED_DATA:
                    self._pending = following
                return {"type": "http.request", "body": body, "more_body": True}
            if type(event) is _END:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # ConnectionClosed / PAUSED cannot precede EndOfMessage; treat as a disconnect.
            return DISCONNECT

    def _peer_error(
        self, exc: h11.RemoteProtocolError, what: str = "invalid request body"
    ) -> dict[str, Any]:
        """Give up on the request body because of the peer (``what`` it did, for the log).

        The app gets ``http.disconnect`` and its ``send()`` raises ``ClientDisconnected``;
        once it returns, its cycle answers ``exc.error_status_hint`` if no response head
        has been sent, and the connection closes (lingering: the body may still come).
        """
        logger.info("%s - %s: %s (%d)", self.stream.peer, what, exc, exc.error_status_hint)
        self.body_error = exc.error_status_hint
        self.stream.linger_on_close()
        self.closing = True
        return DISCONNECT

    async def _wait_for_disconnect(self, cycle: CycleView) -> dict[str, Any]:
        """Body fully received: block until the client leaves or the response completes."""
        parser = self.parser
        stream = self.stream
        while not cycle.done:
            if len(parser.trailing_data[0]) > MAX_PIPELINE_BUFFER:
                await cycle.wait_done()
                break
            # First without waiting: a receive() in an already-cancelled scope (Starlette's
            # Request.is_disconnected() polls that way) still learns of a closed peer.
            data = stream.receive_nowait()
            if data is None:
                data = await self._read()
                if data is None:
                    break
            if not data:
                break
            parser.receive_data(data)  # pipelined bytes: kept for the next cycle
        return DISCONNECT

    # -- what the app left unread -----------------------------------------------------------

    def _body_in_flight(self) -> bool:
        """Whether request body bytes may still come (what h11 buffers is consumed)."""
        conn = self.parser
        if conn.their_state is h11.ERROR:  # a malformed body: the rest is still coming
            return True
        try:
            while conn.their_state is _SEND_BODY:
                if conn.next_event() is _NEED_DATA:
                    return True
        except h11.RemoteProtocolError:
            return True
        return False

    def _discard_buffered_body(self) -> int:
        """Consume the request body bytes the parser has: how many (-1: too many, or a
        malformed body)."""
        conn = self.parser
        discarded = 0
        while conn.their_state is _SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return -1
            if event is _NEED_DATA:
                break
            if type(event) is _DATA:
                discarded += len(data_of(event))
                if discarded > MAX_DISCARD_BODY:
                    return -1
        return discarded

    async def _discard_body_in_flight(self, discarded: int) -> bool:
        """Read and drop the rest of an unread request body, within the keep-alive timeout
        and ``MAX_DISCARD_BODY`` bytes in all; True if it ended (the connection is reusable)."""
        conn = self.parser
        with trio.move_on_after(self.state.config.timeout_keep_alive):
            while conn.their_state is _SEND_BODY and discarded <= MAX_DISCARD_BODY:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return False
                if event is _NEED_DATA:
                    data = await self.stream.receive()
                    if not data:
                        return False
                    conn.receive_data(data)
                elif type(event) is _DATA:
                    discarded += len(data_of(event))
        return conn.our_state is _DONE and conn.their_state is _DONE
