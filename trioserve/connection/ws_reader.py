"""Reading a WebSocket: for the app, and when the app does not (layer 4).

:class:`WebSocketReader` is the reading half of ``connection.websocket.WebSocketConnection``
(its base class): the received bytes, the engine's events (``protocol.ws_engine``: wsproto
or websockets), the inbox of messages for the app, and the watcher task that enforces the
close and failure deadlines.

A message costs one task switch
-------------------------------
As on the HTTP path, the app's ``receive()`` reads the socket on demand, in the app's own
task: it yields once (the other connections run, and meanwhile the peer's answer to what
the app just sent usually arrives), reads what is there without waiting, and waits for
the socket only when nothing is. The engine decodes at once; a read that held one whole
message and nothing else gives that message straight to the app
(``WebSocketEngine.receive_message``), without a round through the engine's events.

Reading when the app does not
-----------------------------
Pings must be answered and a peer's Close seen even while the app is busy elsewhere (an
app that only sends). ``_watch`` wakes :data:`IDLE_READ_DELAY` after the app left
``receive()``; if the app has not been back since, it becomes the reader, queueing up to
``--ws-max-queue`` messages for the app and then stopping: TCP then pushes back on the
peer instead of memory growing. Only one task ever reads: an app calling ``receive()``
while ``_watch`` reads waits for it to hand the reader role back after its next read.
Reading also pauses while more than :data:`READER_PAUSE_OUTBOX` bytes are unsent.

A frame the engine rejects (1002, 1007) or a message over ``--ws-max-size`` (1009) fails the
connection (RFC 6455 §7.1.7): the messages received before it are still delivered, and the
Close frame is sent once the app has read them (so its replies to them are not lost), or
after ``FAILURE_CLOSE_DELAY`` at the latest.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from typing import Any, Final

import trio

from ..compiled import mypyc_attr
from ..protocol.ws_engine import Closed, Event, PingReceived, PongReceived, WebSocketEngine
from ..protocol.ws_messages import (
    CLOSE_ABNORMAL,
    CLOSE_TOO_BIG,
    MessageAssembler,
    MessageTooBigError,
    connect_message,
    disconnect_message,
)
from .stream import ByteStream
from .ws_outbox import Outbox

logger = logging.getLogger(__name__)

# After a protocol failure, how long the Close frame waits for the app to read the
# messages that arrived before the bad frame.
FAILURE_CLOSE_DELAY: Final = 1.0
# The reader pauses while this many bytes are unsent.
READER_PAUSE_OUTBOX: Final = 1024 * 1024
# An app that has stayed away from receive() this long gets a reader of its own.
IDLE_READ_DELAY: Final = 0.25
_NEVER: Final = math.inf


_checkpoint: Final = trio.lowlevel.checkpoint
_checkpoint_if_cancelled: Final = trio.lowlevel.checkpoint_if_cancelled
_current_time: Final = trio.current_time


# (Compiled, a native class: http2_websocket's H2WebSocket, interpreted, subclasses it.)
@mypyc_attr(allow_interpreted_subclasses=True)
class WebSocketReader:
    """The reading half of a WebSocket session (see the module docstring).

    Args:
        stream: the connection's stream.
        outbox: the session's outgoing bytes (pongs; reading pauses while it is full).
        max_size: ``--ws-max-size``.
        max_queue: ``--ws-max-queue``: messages read ahead for an app that does not read.

    The session (the subclass) answers a peer's Close (:meth:`_on_close`), a pong
    (:meth:`_on_pong`) and sends a pending failure Close (:meth:`_send_failure`); it sets
    ``_close_deadline`` when it starts a close.
    """

    engine: WebSocketEngine  # (set by the accept: nothing is read before it)
    _accepted: bool
    _connect_delivered: bool
    _handshake_done: trio.Event

    def __init__(self, stream: ByteStream, outbox: Outbox, max_size: int, max_queue: int) -> None:
        self._stream = stream
        self._outbox = outbox
        self._assembler = MessageAssembler(max_size)
        self._unread = bytearray()  # received, not yet handed to the engine
        self._events: Iterator[Event] | None = None  # an engine's events() not yet exhausted
        self._inbox: deque[dict[str, Any]] = deque()  # messages ready for the app
        self._max_queue = max_queue
        self._eof = False  # the peer closed its side (or the read failed)
        self._read_done = False  # no more reading: close, EOF, failure, timeout or drop
        self._reading = False  # a read is in progress (the app's or _watch's)
        # Around _watch's reads, or a read on a stream other than a plain socket.
        self._read_cancel: trio.CancelScope | None = None
        self._in_receive = False  # the app waits in receive()
        self._handover: trio.Event | None = None  # the app waits for _watch to stop reading
        self._receives = 0  # messages the app has received
        self._receives_at_check = -1
        # Closing, failing, watching.
        self._disconnect: dict[str, Any] | None = None
        self._failure: tuple[int, str] | None = None
        self._close_deadline = math.inf
        self._failure_deadline = math.inf
        self._idle_check_at = math.inf
        self._watch_scope: trio.CancelScope | None = None  # _watch's sleep

    # -- the session's part -----------------------------------------------------------------

    def _on_close(self, event: Closed) -> None:
        raise NotImplementedError

    def _on_pong(self, payload: bytes) -> None:
        raise NotImplementedError

    def _send_failure(self) -> None:
        raise NotImplementedError

    # -- reading ----------------------------------------------------------------------------

    async def _finish_reading(self) -> None:
        """Read (and drop) what the peer still sends until its Close or the close deadline."""
        self._idle_check_at = math.inf  # nobody to read for any more
        with trio.CancelScope(deadline=self._close_deadline) as scope:
            while not self._read_done:
                self._inbox.clear()
                await self._fill_inbox()
        self._inbox.clear()
        if scope.cancelled_caught:
            self._stop_reading()

    def _set_disconnect(self, code: int, reason: str = "") -> None:
        if self._disconnect is None:
            self._disconnect = disconnect_message(int(code), reason or "")

    def _stop_reading(self) -> None:
        """End reading now (close timeout, peer gone or dropped); a waiting read ends too."""
        if self._read_done:
            return
        self._read_done = True
        self._set_disconnect(CLOSE_ABNORMAL)
        if not self._reading:
            return
        if self._read_cancel is not None:
            self._read_cancel.cancel()
        else:
            # The app waits in a plain read (no cancel scope: one per read would cost more
            # than the read): wake it as if the socket were closed; it then sees EOF.
            self._stream.interrupt_read()

    async def receive(self) -> dict[str, Any]:
        """The app's ``receive``: ``websocket.connect``, messages, ``websocket.disconnect``.

        The common case (nothing buffered, nobody else reading, a plain socket) is written
        out here rather than in helpers: every coroutine frame between the app and the
        scheduler is crossed twice per message.
        """
        if not self._accepted or not self._connect_delivered:
            message = await self._receive_before_accept()
            if message is not None:
                return message
        inbox = self._inbox
        if inbox or self._events is not None or self._unread or self._eof or self._read_done:
            # (Below, only reading from the socket is sure to be a checkpoint.)
            await _checkpoint_if_cancelled()
        if not inbox:
            self._in_receive = True
            try:
                while True:
                    if self._events is not None or self._unread or self._eof:
                        self._decode(1)
                        if inbox:
                            break
                    if self._read_done:
                        break
                    if self._reading:
                        await self._wait_for_handover()
                        continue
                    self._reading = True
                    try:
                        stream = self._stream
                        if stream.fast and self._outbox.pending() <= READER_PAUSE_OUTBOX:
                            # As _read does (see there), without its frame.
                            await _checkpoint()
                            if self._read_done:  # stopped meanwhile (_stop_reading):
                                data = b""  # (break, below; mypyc has no break in a try)
                            else:
                                data = stream.receive_nowait()
                                if data is None:
                                    data = await stream.receive(wait_first=True)
                        else:
                            data = await self._read()
                    finally:
                        self._reading = False
                        if self._handover is not None:
                            self._hand_over()
                    if self._read_done:
                        break
                    if data:
                        # (Nothing is left undecoded here: the engine takes it at once.)
                        engine = self.engine
                        message = engine.receive_message(data)
                        if message is not None:
                            inbox.append(message)
                            break
                        self._events = engine.events()
                    else:
                        self._eof = True
            finally:
                self._in_receive = False
                if self._idle_check_at == _NEVER and not self._read_done:
                    self._arm_idle_check()  # (also when cancelled)
            if not inbox:
                # The app has read everything: a pending failure Close may go now.
                self._send_failure()
                return self._disconnect or disconnect_message(CLOSE_ABNORMAL)
        elif self._idle_check_at == _NEVER and not self._read_done:
            self._arm_idle_check()
        self._receives += 1
        return inbox.popleft()

    async def _receive_before_accept(self) -> dict[str, Any] | None:
        """``receive()`` until the handshake is answered: ``websocket.connect`` first, then
        wait for the accept (None once accepted) or a disconnect for a refusal."""
        if not self._connect_delivered:
            self._connect_delivered = True
            return connect_message()
        if not self._accepted:
            await self._handshake_done.wait()
            if not self._accepted:
                return disconnect_message(CLOSE_ABNORMAL)
        return None

    async def _wait_for_handover(self) -> None:
        """Another task reads (_watch, or a second app task): wait until it hands the
        reader role over, after its read."""
        if self._handover is None:
            self._handover = trio.Event()
        await self._handover.wait()

    async def _fill_inbox(self) -> None:
        """Read and decode until a message is in the inbox or reading has ended."""
        inbox = self._inbox
        while True:
            self._decode(1)
            if inbox or self._read_done:
                return
            if self._reading:
                await self._wait_for_handover()
                continue
            self._reading = True
            try:
                data = await self._read()
            finally:
                self._reading = False
                self._hand_over()
            self._received(data)

    def _hand_over(self) -> None:
        handover = self._handover
        if handover is not None:
            self._handover = None
            handover.set()

    async def _read(self) -> bytes:
        """One read from the socket (b"" at EOF), once our unsent bytes have shrunk."""
        if self._outbox.pending() > READER_PAUSE_OUTBOX:
            await self._outbox.wait_below(READER_PAUSE_OUTBOX)
            if self._read_done:  # stopped meanwhile (_stop_reading)
                return b""
        # Everything received so far is handled: the peer's next frame (often a reply to
        # what the app just sent) has usually not arrived yet. Under load it has once the
        # other connections had their turn: yield first, then read without registering
        # with epoll (one epoll_ctl per wait otherwise); wait only when it has not.
        stream = self._stream
        if stream.fast:
            await _checkpoint()
            if self._read_done:  # stopped meanwhile (_stop_reading)
                return b""
            data = stream.receive_nowait()
            if data is not None:
                return data
            return await stream.receive(wait_first=True)
        if self._read_cancel is not None:
            return await stream.receive(wait_first=True)
        with trio.CancelScope(deadline=self._close_deadline) as self._read_cancel:  # not plain
            try:
                return await stream.receive(wait_first=True)
            finally:
                self._read_cancel = None
        return b""  # cancelled by _stop_reading

    def _received(self, data: bytes) -> None:
        if self._read_done:
            return
        if data:
            self._unread += data
        else:
            self._eof = True

    def _decode(self, limit: int) -> None:
        """Decode received bytes until the inbox holds ``limit`` messages or input runs out.

        The engine's events are taken one at a time (its generator stays suspended in
        ``_events``): with wsproto, a compressed frame is only inflated when the app wants
        more; with either engine, a peer's Close is answered only once the messages before
        it are read.
        """
        inbox = self._inbox
        engine = self.engine
        while len(inbox) < limit and not self._read_done:
            events = self._events
            if events is not None:
                for event in events:
                    if type(event) is dict:
                        inbox.append(event)  # a whole message (see ws_engine)
                    else:
                        self._on_event(event)
                    if len(inbox) >= limit or self._read_done:
                        return
                self._events = None
            unread = self._unread
            if unread:
                engine.receive_data(bytes(unread))
                unread.clear()
            elif self._eof:
                engine.receive_data(None)  # yields the 1006 Closed
            else:
                return
            self._events = engine.events()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, dict):
            self._inbox.append(event)  # a whole message
        elif not isinstance(event, (PingReceived, PongReceived, Closed)):
            # A message, or a fragment of one (the common case first).
            try:
                message = self._assembler.feed(event)
            except MessageTooBigError as exc:
                self._fail(CLOSE_TOO_BIG, str(exc))
                return
            if message is not None:
                self._inbox.append(message)
        elif isinstance(event, PingReceived):
            self._outbox.send(event.reply)  # (b"" once our Close is sent)
        elif isinstance(event, PongReceived):
            self._on_pong(event.payload)
        else:
            self._on_close(event)
            self._end_reading()

    def _end_reading(self) -> None:
        """The peer's bytes are done with (close, EOF or failure)."""
        self._read_done = True
        self._events = None
        self._set_disconnect(CLOSE_ABNORMAL)

    def _fail(self, code: int, reason: str) -> None:
        """A bad frame or an oversized message: fail the WebSocket (RFC 6455 §7.1.7)."""
        logger.info("%s - WebSocket protocol error: %s (%d)", self._stream.peer, reason, code)
        self._set_disconnect(code, reason)
        self._end_reading()
        self._failure = (int(code), reason)
        self._failure_deadline = _current_time() + FAILURE_CLOSE_DELAY
        self._rewatch()

    # -- the watcher ----------------------------------------------------------------------

    def _arm_idle_check(self) -> None:
        self._receives_at_check = self._receives
        self._idle_check_at = _current_time() + IDLE_READ_DELAY
        self._rewatch()

    def _rewatch(self) -> None:
        if self._watch_scope is not None:
            self._watch_scope.deadline = min(
                self._idle_check_at, self._close_deadline, self._failure_deadline
            )

    async def _watch(self) -> None:
        """Read for an app that stays away from receive(); enforce the close deadlines.

        Returns once reading has ended and no failure Close is pending.
        """
        await self._handshake_done.wait()
        if not self._accepted:
            return
        while not self._read_done or self._failure is not None:
            deadline = min(self._idle_check_at, self._close_deadline, self._failure_deadline)
            with trio.CancelScope(deadline=deadline) as self._watch_scope:
                await trio.sleep_forever()
            self._watch_scope = None
            now = _current_time()
            if now >= self._failure_deadline:
                self._send_failure()  # the app did not read the earlier messages in time
            if now >= self._close_deadline and not self._read_done:
                logger.debug("%s - WebSocket close handshake timed out", self._stream.peer)
                self._stop_reading()
            if now >= self._idle_check_at:
                self._idle_check_at = math.inf
                if self._in_receive or self._reading or self._read_done:
                    continue  # the app reads; its next message re-arms the check
                if self._receives != self._receives_at_check:
                    self._arm_idle_check()  # the app is busy but still receiving
                    continue
                await self._read_for_app()

    async def _read_for_app(self) -> None:
        """Be the reader until the app comes back to receive() or its queue is full."""
        self._reading = True
        try:
            with trio.CancelScope(deadline=self._close_deadline) as self._read_cancel:
                while self._handover is None:
                    self._decode(self._max_queue)
                    if self._read_done or len(self._inbox) >= self._max_queue:
                        break  # a full queue: stop reading, TCP pushes back on the peer
                    self._received(await self._read())
        finally:
            self._read_cancel = None
            self._reading = False
            self._hand_over()
