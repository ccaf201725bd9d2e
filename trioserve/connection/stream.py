"""One connection's byte stream: reads, writes, fairness, linger, close (layer 4).

:class:`ConnectionStream` wraps the accepted stream (a ``trio.SocketStream``, or the
``SSLStream`` / PROXY-protocol wrapper ``connection.edge`` put around it) for whichever
protocol serves the connection: HTTP/1.1 (``connection.http1``), the request cycle
(``connection.request_cycle``) and, after an upgrade, WebSocket (``connection.websocket``).
It is the one place where trio's resource errors are translated: a read of a closed or
broken stream returns ``b""`` (and sets :attr:`~ConnectionStream.peer_gone`), a failed write
raises :class:`~trioserve.errors.ClientDisconnected`. (``connection.edge`` catches them
too, for the PROXY header and the TLS handshake, which run before a connection stream
exists.)

On a plain TCP socket it skips trio's stream wrappers: reads and writes go straight to
the descriptor, first without waiting (asyncio's transports do the same), and wait through
trio's I/O primitives only when the socket is not ready. A request that arrives whole and
a response the kernel takes at once then cost one syscall each and no trip through the
scheduler. Any other stream always goes through ``receive_some`` / ``send_all``.

Fairness: moving data without waiting never lets a fast peer hog the scheduler: reads and
writes yield once per :data:`FAIR_SHARE_BYTES` (one constant for every protocol).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Final, Protocol

import trio

from ..errors import AppProtocolError, ClientDisconnected
from ..metrics import ServerMetrics
from ..protocol.response_extensions import FileRegion
from ..protocol.scope import ConnectionFacts

# Bytes per socket read on plain TCP connections (the server's scratch buffer, see
# ServerState.read_buffer): a request with a body of this size usually arrives in one read.
READ_BUFFER_SIZE: Final = 256 * 1024
RECEIVE_SIZE: Final = 64 * 1024  # per read from a TLS or other wrapped stream
# Reads and writes yield to the scheduler after this many bytes moved without waiting: a
# large upload or download lets the other connections run, while a request of a few dozen
# KiB completes without a trip through the scheduler (it yields once anyway).
FAIR_SHARE_BYTES: Final = 256 * 1024
# At most this many pieces per vectored write (the kernel's IOV_MAX is 1024).
MAX_WRITE_PIECES: Final = 512
# Two pieces to write (a head and its body) up to this size together are joined first.
JOIN_BYTES: Final = 2048
# Files (http.response.pathsend): a region up to this size is read and written together
# with the bytes around it (one pread and one writev beat a writev and a sendfile, and
# the head and a small file leave in one segment); a larger one is sent by os.sendfile.
SMALL_FILE_BYTES: Final = 64 * 1024
# Bytes per read of a file sent through a wrapped stream (TLS, memory streams).
FILE_PIECE_BYTES: Final = 256 * 1024
# Lingering close: after an error response, read and discard for at most this long (and
# this many bytes) so the kernel does not reset the connection under the client's feet
# (RFC 9112 §9.6).
LINGER_TIMEOUT: Final = 1.0
LINGER_MAX_BYTES: Final = 1024 * 1024

# (Bound once: compiled, each ``trio.lowlevel.X`` or ``os.X`` would be two or one module
# attribute look-ups per use, and a builtin passed as a value one more. Not os.writev:
# tests count its calls.)
_checkpoint_if_cancelled: Final = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint: Final = trio.lowlevel.cancel_shielded_checkpoint
_wait_readable: Final = trio.lowlevel.wait_readable
_wait_writable: Final = trio.lowlevel.wait_writable
_readv: Final = os.readv
_write: Final = os.write
_len: Final = len
_map: Final = map
_sum: Final = sum


class ByteStream(Protocol):
    """What a WebSocket session uses of the bytes its frames travel in
    (``connection.ws_reader``, ``connection.ws_outbox``, ``connection.websocket``).

    :class:`ConnectionStream` is one (an upgraded HTTP/1.1 connection);
    ``connection.http2_websocket.StreamBytes`` is another (an HTTP/2 stream's DATA frames,
    RFC 8441). The semantics are :class:`ConnectionStream`'s: a read returns b"" once the
    peer has gone (EOF, reset), a failed write raises ``ClientDisconnected``, and the
    ``*_nowait`` methods are used only when :attr:`fast` is true.
    """

    @property
    def peer(self) -> str: ...
    @property
    def fast(self) -> bool: ...
    async def receive(self, *, wait_first: bool = False) -> bytes: ...
    def receive_nowait(self) -> bytes | None: ...
    def interrupt_read(self) -> None: ...
    def write_nowait(self, data: bytes | bytearray | memoryview) -> int: ...
    async def write(self, data: bytes | list[bytes], *, last: bool = False) -> None: ...
    def owes_yield(self, size: int) -> bool: ...
    def linger_on_close(self) -> None: ...
    def abort_on_close(self) -> None: ...
    async def abort(self) -> None: ...


class ConnectionStream:
    """The byte stream of one accepted connection.

    Args:
        stream: the accepted stream (after ``connection.edge``); this object closes it.
        scratch: the server's read buffer (``ServerState.read_buffer``): each read is
            copied out of it at once, before any other task runs.
        facts: the connection's facts (its peer names log lines and errors).
        on_broken: called when a write fails or is cancelled midway (part of the data may
            be on the wire): the protocol's state machine must learn that its output is
            unusable (``h11.Connection.send_failed``).
        metrics: the server's counters (``ServerState.metrics``): every read and write
            adds to ``received_bytes`` / ``sent_bytes``. None: nothing is counted.

    Attributes:
        peer_gone: the peer closed its side or is gone (EOF, a failed read or write).
        broken: a write was interrupted: never reuse the connection, never linger.
        fast: a plain TCP socket, read and written through its descriptor.
    """

    # (Slots: every idle keep-alive connection holds one.)
    __slots__ = (
        "_fd",
        "_linger",
        "_on_broken",
        "_read_since_yield",
        "_scratch",
        "_written_since_yield",
        "broken",
        "facts",
        "fast",
        "metrics",
        "peer_gone",
        "stream",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        scratch: memoryview,
        facts: ConnectionFacts,
        on_broken: Callable[[], None],
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.stream = stream
        self.facts = facts
        self.metrics = metrics
        self._scratch = scratch
        self._on_broken = on_broken
        # The socket's descriptor for the non-blocking fast paths; -1 for other streams
        # (TLS, PROXY-protocol wrappers), which always go through receive_some / send_all.
        self._fd = stream.socket.fileno() if type(stream) is trio.SocketStream else -1
        self.fast = self._fd >= 0
        self._written_since_yield = 0
        self._read_since_yield = 0
        self.peer_gone = False
        self.broken = False
        self._linger = False  # close with a lingering read (we may have unread input)

    @property
    def peer(self) -> str:
        """The client for log lines: ``host:port``, or ``unix``."""
        return self.facts.peer

    # -- reading --------------------------------------------------------------------------

    async def receive(self, *, wait_first: bool = False) -> bytes:
        """Read some bytes; b"" when the peer closed or the connection broke.

        ``wait_first``: the caller expects nothing to have arrived yet (a WebSocket that
        just delivered a message, whose peer usually waits for the reply): wait until readable
        before reading, sparing the read that would fail (raising BlockingIOError is the
        dearer half of it).
        """
        data: bytes
        try:
            if self._fd < 0:
                # TLS and memory streams may return a bytearray (bytes() of bytes is the
                # same object, no copy).
                data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
                if self.metrics is not None:  # (a socket's reads count in _read_now)
                    self.metrics.received_bytes += len(data)
            else:
                # What SocketStream.receive_some does (try, else wait until readable; always
                # a checkpoint), minus its wrappers: an idle keep-alive connection then
                # parks fewer frames (memory per connection) and a read costs less. As with
                # receive_some, a read in a cancelled scope raises before consuming anything.
                if wait_first:
                    await _wait_readable(self._fd)  # the checkpoint
                else:
                    await _checkpoint_if_cancelled()
                try:
                    read: bytes | None = self._read_now()
                except BlockingIOError:
                    read = None
                # (Waiting outside the except clause: a task parked inside it would keep the
                # exception and its traceback alive for the whole idle period, ~0.5 KiB.)
                if read is None:
                    while read is None:
                        await _wait_readable(self._fd)
                        try:
                            read = self._read_now()
                        except BlockingIOError:
                            pass
                elif not wait_first:
                    await _cancel_shielded_checkpoint()
                data = read
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            # EOF counts as "client gone", as in uvicorn: a half-closed client gets
            # http.disconnect and no further responses.
            self.peer_gone = True
        return data

    def _read_now(self) -> bytes:
        """One non-blocking read from the socket (BlockingIOError: nothing has arrived).

        Reads up to :data:`READ_BUFFER_SIZE` through the server's scratch buffer, so a
        request with a body of that size usually arrives in one read (the app then gets it
        in one message) while a small read still costs a small allocation
        (``os.read(fd, 256 KiB)`` would map and unmap a large block every time).
        """
        scratch = self._scratch
        # (The size in a variable of its own: mypyc evaluates a call inside a slice bound
        # twice, which here would be two reads.)
        size = _readv(self._fd, (scratch,))
        if self.metrics is not None:  # (counted here, where the size is known: no len())
            self.metrics.received_bytes += size
        return bytes(scratch[:size])

    def receive_nowait(self) -> bytes | None:
        """Read what has already arrived, without waiting; None when nothing has.

        b"" when the peer closed. Always None for streams other than a plain socket (TLS,
        PROXY-protocol wrappers): those are only read by :meth:`receive`.
        """
        if self._fd < 0:
            return None
        try:
            data = self._read_now()
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.peer_gone = True
        return data

    async def read_fairly(self, size: int) -> None:
        """After a read that did not wait: yield once per :data:`FAIR_SHARE_BYTES` read, so
        a fast upload cannot keep the other connections from running."""
        self._read_since_yield += size
        if self._read_since_yield >= FAIR_SHARE_BYTES:
            self._read_since_yield = 0
            await _cancel_shielded_checkpoint()

    def interrupt_read(self) -> None:
        """Wake a task waiting in :meth:`receive` on a plain socket, as if the socket had
        closed (it then sees EOF): for a read that has no cancel scope of its own (one per
        read would cost more than the read). A no-op on other streams."""
        if self._fd >= 0:
            trio.lowlevel.notify_closing(self._fd)

    # -- writing --------------------------------------------------------------------------

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes now, without waiting; return how many bytes it took.

        Always 0 for streams other than a plain socket (TLS, PROXY-protocol wrappers): those
        are only written by :meth:`write`.

        Raises:
            ClientDisconnected: the peer is gone (the connection will be closed).
        """
        if self._fd < 0:
            return 0
        try:
            sent = _write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise self._write_failed() from exc
        if self.metrics is not None:
            self.metrics.sent_bytes += sent
        return sent

    def _write_failed(self) -> ClientDisconnected:
        """Record that a write found the peer gone; the error for the caller to raise."""
        self.peer_gone = True
        self.broken = True
        self._on_broken()
        return ClientDisconnected(f"{self.peer} disconnected")

    async def write(self, data: bytes | list[bytes], *, last: bool = False) -> None:
        """Write ``data`` (bytes, or pieces written back to back) completely.

        On a plain TCP socket the bytes are first offered to the kernel without waiting
        (asyncio's transports do the same): when they all fit, which is the common case,
        the write costs one syscall and no trip through trio's scheduler. A 1 MiB response
        streamed in 16 KiB chunks then costs 64 syscalls instead of 64 scheduler rounds
        across every busy connection. What does not fit goes through ``send_all``, which
        waits for the socket (and is where cancellation and backpressure apply).

        Raises:
            ClientDisconnected: the peer is gone (the connection will be closed).
        """
        try:
            if self._fd < 0:
                joined = data if isinstance(data, bytes) else b"".join(data)
                await self.stream.send_all(joined)
                if self.metrics is not None:
                    self.metrics.sent_bytes += len(joined)
                return
            # The fast path below may not wait at all, so honour a pending cancellation
            # first: an app streaming forever to a fast reader must still stop promptly
            # on a hard stop (nothing has been written yet, so this is a clean cancel).
            # Not for the ``last`` bytes of a response: the connection checkpoints right
            # after those (its end of each request), and a response that goes out whole
            # is no worse a way to stop than none (a call to trio's check and its
            # coroutine cost ~2 k instructions, 2 % of a hello request).
            if not last:
                await _checkpoint_if_cancelled()
            try:
                if isinstance(data, bytes):
                    total = len(data)
                    sent = _write(self._fd, data)
                elif len(data) == 2 and len(data[0]) + len(data[1]) <= JOIN_BYTES:
                    # A head and a small body, the common response: joined, one plain
                    # write (copying ~100 bytes costs less than writev's set-up per piece
                    # and the size sum below, ~0.17 us).
                    data = data[0] + data[1]
                    total = len(data)
                    sent = _write(self._fd, data)
                else:  # one vectored write: the pieces (a large body) are not copied
                    total = _sum(_map(_len, data))
                    sent = os.writev(self._fd, data[:MAX_WRITE_PIECES])
            except BlockingIOError:
                sent = 0
            if sent < total:
                await self._write_rest(data, sent)  # waits: a checkpoint
                self._written_since_yield = 0
            else:
                # Fairness: a response streamed faster than the peer reads still lets the
                # other connections run, once per FAIR_SHARE_BYTES (not once per chunk).
                self._written_since_yield += sent
                if self._written_since_yield >= FAIR_SHARE_BYTES:
                    self._written_since_yield = 0
                    await _cancel_shielded_checkpoint()
            if self.metrics is not None:
                self.metrics.sent_bytes += total
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._write_failed() from exc
        except BaseException:
            # Cancelled mid-write: part of the data may be on the wire (the protocol's state
            # machine must know).
            self.broken = True
            self._on_broken()
            raise

    async def _write_rest(self, data: bytes | list[bytes], sent: int) -> None:
        """Write what a first non-blocking write left, waiting until the socket takes more.

        The pieces stay pieces (a large body is never joined into a copy).
        """
        fd = self._fd
        pieces = _after(data if isinstance(data, list) else [data], sent)
        while pieces:
            await _wait_writable(fd)
            try:
                sent = os.writev(fd, pieces[:MAX_WRITE_PIECES])
            except BlockingIOError:
                continue
            pieces = _after(pieces, sent)

    async def write_file(self, pieces: list[bytes | FileRegion]) -> None:
        """Write ``pieces`` completely, where some are file regions
        (``http.response.pathsend``, see ``protocol.response_extensions``).

        On a plain TCP socket a region larger than :data:`SMALL_FILE_BYTES` goes from the
        file to the socket inside the kernel (``os.sendfile``: no copy through Python, no
        thread), as :meth:`write` goes: without waiting while the socket takes it, then
        through trio's write readiness (a slow client holds only its own task), yielding
        once per :data:`FAIR_SHARE_BYTES`. Smaller regions, and every region on any other
        stream (TLS, memory streams), are read in pieces of at most
        :data:`FILE_PIECE_BYTES` (``os.pread`` in this thread: a file in the page cache
        reads in microseconds, less than a hop to a worker thread) and written as bytes.

        Raises:
            ClientDisconnected: the peer is gone (the connection will be closed).
            AppProtocolError: the file ended before its region did (it shrank while being
                sent); the connection is broken, as after an interrupted write.
        """
        run: list[bytes] = []
        size = 0
        try:
            for piece in pieces:
                if not isinstance(piece, FileRegion):
                    run.append(piece)
                    size += len(piece)
                    continue
                if self._fd >= 0 and piece.count > SMALL_FILE_BYTES:
                    if run:
                        await self.write(run)
                        run, size = [], 0
                    await self._sendfile(piece)
                    continue
                for data in piece.pieces(FILE_PIECE_BYTES):
                    run.append(data)
                    size += len(data)
                    if size >= FILE_PIECE_BYTES or len(run) >= MAX_WRITE_PIECES:
                        await self.write(run)
                        run, size = [], 0
            if run:
                await self.write(run)
        except AppProtocolError:
            self.broken = True  # (the framing promised bytes that will never come)
            self._on_broken()
            raise

    async def _sendfile(self, region: FileRegion) -> None:
        """Send ``region`` with ``os.sendfile`` (plain TCP only); see :meth:`write_file`."""
        fd = self._fd
        offset = region.offset
        end = offset + region.count
        try:
            await _checkpoint_if_cancelled()  # (as in write())
            waited = False
            while offset < end:
                try:
                    sent = os.sendfile(fd, region.fd, offset, end - offset)
                except BlockingIOError:
                    sent = -1
                if sent == 0:
                    raise region.shrank(offset - region.offset)
                if sent > 0:
                    offset += sent
                if offset < end:  # the socket's buffer is full: wait until it drains
                    await _wait_writable(fd)
                    waited = True
            if self.metrics is not None:
                self.metrics.sent_bytes += region.count
            if waited:
                self._written_since_yield = 0
            elif self.owes_yield(region.count):
                await _cancel_shielded_checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._write_failed() from exc
        except BaseException:
            # Cancelled mid-file (or the file shrank): part of it may be on the wire.
            self.broken = True
            self._on_broken()
            raise

    def owes_yield(self, size: int) -> bool:
        """Count ``size`` bytes written without waiting (:meth:`write_nowait`); True once
        per :data:`FAIR_SHARE_BYTES`: the caller then yields to the scheduler, as
        :meth:`write` does. (Not a coroutine: most calls owe nothing.)"""
        self._written_since_yield += size
        if self._written_since_yield >= FAIR_SHARE_BYTES:
            self._written_since_yield = 0
            return True
        return False

    async def send_last(self, data: bytes, timeout: float) -> bool:
        """Write a last response (trioserve's own error answer), within ``timeout``
        seconds; the close then lingers (the client may still be sending).

        Returns:
            Whether all of ``data`` was written (False, too, when there is nothing to write
            or the peer is gone).
        """
        self._linger = True
        if not data or self.peer_gone:
            return False
        with trio.move_on_after(timeout):
            try:
                await self.write(data)
            except ClientDisconnected:
                return False
            return True
        return False

    # -- closing --------------------------------------------------------------------------

    def linger_on_close(self) -> None:
        """Close gracefully: we may have left input unread (RFC 9112 §9.6)."""
        self._linger = True

    def abort_on_close(self) -> None:
        """Close at once, without lingering (a truncated response: the peer must see an
        abort, not a clean end)."""
        self._linger = False

    async def abort(self) -> None:
        """Close the stream now, without lingering (:meth:`aclose` later does nothing)."""
        self._linger = False
        await trio.aclose_forcefully(self.stream)

    async def aclose(self) -> None:
        """Close the stream: at once on a plain socket, else with a bounded lingering read
        when asked for one (:meth:`linger_on_close`, :meth:`send_last`); forcefully when
        cancelled."""
        if self._fd >= 0 and not self._linger:
            # What aclose_forcefully does for a plain socket (notify trio, close the fd),
            # minus its cancel scope and the closing checkpoint: a Connection: close request
            # would pay a scheduler round for nothing.
            self.stream.socket.close()  # type: ignore[attr-defined]
            return
        stream = self.stream
        try:
            if self._linger and not self.broken and trio.current_effective_deadline() != -math.inf:
                with trio.move_on_after(LINGER_TIMEOUT):
                    try:
                        if isinstance(stream, trio.abc.HalfCloseableStream):
                            await stream.send_eof()  # (TLS streams cannot half-close)
                        discarded = 0
                        while discarded < LINGER_MAX_BYTES:
                            data = await stream.receive_some(RECEIVE_SIZE)
                            if not data:
                                break
                            discarded += len(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            # Also when a hard stop cancels the lingering read: the socket must not leak.
            await trio.aclose_forcefully(stream)


def _after(pieces: list[bytes] | list[bytes | memoryview], count: int) -> list[bytes | memoryview]:
    """``pieces`` without their first ``count`` bytes (a partly sent piece is sliced)."""
    index = 0
    while count and count >= len(pieces[index]):
        count -= len(pieces[index])
        index += 1
    rest: list[bytes | memoryview] = list(pieces[index:])
    if count:
        rest[0] = memoryview(rest[0])[count:]
    return rest
