"""A WebSocket connection's outgoing bytes: one writer at a time, without locks (layer 4).

Several parties produce bytes on a WebSocket connection: the app (messages, close, denial
responses), the reader (pongs, close replies), the keepalive task (pings) and the server
(drain: close 1012). All of them produce bytes *synchronously* (wsproto, or h11 for plain
HTTP answers) and hand them to :meth:`Outbox.send`, which writes them to the socket without
waiting when nothing is queued, and otherwise appends them to the buffer that only
:meth:`Outbox.run` (a task of the session) writes. Consequences:

* bytes leave in exactly the order they were produced, which permessage-deflate's shared
  compressor and the close handshake both depend on;
* wsproto's state never changes across an ``await``, so it stays truthful;
* a cancelled app never leaves a frame half-written: its writes never wait;
* backpressure is explicit: the app's ``send()`` waits (:meth:`Outbox.wait_below`) while
  more than :data:`OUTBOX_HIGH_WATER` bytes are unsent, and the reader pauses while more
  than ``ws_reader.READER_PAUSE_OUTBOX`` are (a peer that floods pings but never reads
  cannot make us buffer pongs without bound).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from ..errors import ClientDisconnected
from .stream import ByteStream

logger = logging.getLogger(__name__)

# The app's send() returns once at most this many bytes are still unsent.
OUTBOX_HIGH_WATER: Final = 64 * 1024


class Outbox:
    """The outgoing bytes of one WebSocket connection (see the module docstring).

    Args:
        stream: the connection's stream.
        on_lost: called once when a write finds the peer gone (after :attr:`gone` is set).

    Attributes:
        gone: the transport is unusable (the peer left, or the session gave up on it):
            nothing more is written.
    """

    def __init__(self, stream: ByteStream, on_lost: Callable[[], None]) -> None:
        self._stream = stream
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._in_flight = 0
        self._has_output = trio.Event()
        self._written = trio.Event()  # replaced after every completed (or failed) write
        self.gone = False

    def send(self, data: bytes | bytearray) -> bool:
        """Write ``data`` now as far as the socket takes it without waiting; queue the rest.

        Never waits, so every producer (any task, or a synchronous caller such as a drain)
        can call it and a cancellation can never cut a frame in two.

        Returns:
            True when nothing is left unsent (False: bytes are queued, see :meth:`pending`).
        """
        if not data or self.gone:
            return not self._buffer and not self._in_flight
        if self._buffer or self._in_flight or not self._stream.fast:
            self._buffer += data
            self._has_output.set()
            return False
        try:
            sent = self._stream.write_nowait(data)
        except ClientDisconnected:
            self._lost()
            return True
        if sent < len(data):
            self._buffer += memoryview(data)[sent:]
            self._has_output.set()
            return False
        return True

    def give_up(self) -> None:
        """Write nothing more (the connection is being aborted)."""
        self.gone = True

    def _lost(self) -> None:
        logger.debug("%s - WebSocket peer gone while writing", self._stream.peer)
        self.gone = True
        self._buffer.clear()
        self._on_lost()

    def pending(self) -> int:
        """Bytes not yet written (queued, or being written)."""
        return len(self._buffer) + self._in_flight

    async def wait_below(self, limit: int = OUTBOX_HIGH_WATER) -> None:
        """Wait until at most ``limit`` bytes are unsent (or the peer is gone)."""
        while not self.gone and self.pending() > limit:
            await self._written.wait()

    async def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for everything to be written."""
        with trio.move_on_after(timeout):
            await self.wait_below(0)

    async def run(self) -> None:
        """Write what the socket did not take at once, until cancelled or the peer is gone."""
        while True:
            if not self._buffer:
                await self._has_output.wait()
                self._has_output = trio.Event()
                continue
            data = bytes(self._buffer)
            self._buffer.clear()
            self._in_flight = len(data)
            try:
                await self._stream.write(data)
            except ClientDisconnected:
                self._lost()
                return
            finally:
                self._in_flight = 0
                self._written.set()
                self._written = trio.Event()
