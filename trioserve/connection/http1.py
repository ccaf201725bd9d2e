"""The task that serves one accepted connection over HTTP/1.1 (layer 3).

One :class:`HTTPConnection` per accepted stream owns that stream and its HTTP/1.1 parser
(``http_parser.HTTPParser``: h11's, or its httptools twin for ``--http httptools``). Its
task reads request heads and calls the app of each request
(:class:`RequestCycle`) itself. An app that answers without waiting for anything (the
common case) costs no task spawn and no hand-off. The first time an app waits, the
connection moves on to a new task, a sibling in the server's connection nursery, which
waits for *response complete*, not for the app to return, so the next pipelined or
keep-alive request is read while Starlette's ``BackgroundTasks`` still run; the old task
is then only the app call's. The connection is closed once the serving has ended and
every app call has returned, by whichever of these tasks finishes last. (No nursery per
connection, nothing kept from the last request: an idle keep-alive connection costs
~2.3 KiB less than it did with them, less than uvicorn's.)

Ownership of the stream (one reader, one writer, no locks):

* between requests the connection task is the only reader and writer;
* while a response is in progress the app call is the only writer, and its ``receive()``
  reads from the socket on demand (backpressure for free; EOF becomes
  ``http.disconnect``). When the response completes, a read still pending in
  ``receive()`` is cancelled (a cancelled ``receive_some`` had no effect) before the
  connection task reads again.

Timeouts use one cancel scope per connection whose deadline is moved: keep-alive while
idle, ``--timeout-request-header`` once a head has begun, infinity while the app responds.
trio's resource errors are translated in :meth:`HTTPConnection.receive_bytes` and
:meth:`HTTPConnection.write` only.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import sys
import time
import types
from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import Any, Final

import h11
import trio

from ..access_format import CLIENT_CLOSED_REQUEST
from ..app.call import call_app
from ..errors import AppProtocolError, ClientDisconnected
from ..message_trace import TRACE_LOG_LEVEL, peer_name
from ..protocol.http1_messages import (
    ResponseWriter,
    build_http_scope,
    check_request,
    error_response,
    head_has_obs_fold,
    header_list,
    is_websocket_upgrade,
)
from ..protocol.http1_parser import refusal
from ..protocol.proxy_headers import TrustedHosts, apply_proxy_headers
from .state import ServerState, log_access

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 64 * 1024  # per read from a TLS or other wrapped stream
# write() (and a body read) yields to the scheduler after this many bytes moved without
# waiting: a large upload or download lets the other connections run, while a request of
# a few dozen KiB completes without a trip through the scheduler (it yields once anyway).
WRITE_YIELD_BYTES: Final = 256 * 1024
# Bytes of pipelined requests buffered while a response is in progress; beyond this we
# stop reading (the client's TCP window then pushes back).
MAX_PIPELINE_BUFFER: Final = 256 * 1024
# Streamed body chunks the app hands over back to back (without awaiting anything in
# between) are written together, up to this many bytes: one syscall instead of several.
COALESCE_BYTES: Final = 256 * 1024
# ... and at most this many pieces per vectored write (the kernel's IOV_MAX is 1024).
MAX_WRITE_PIECES: Final = 512
# An unread request body is drained (so the connection can be reused) up to this size.
MAX_DISCARD_BODY: Final = 1024 * 1024
# Lingering close: after an error response, read and discard for at most this long so
# the kernel does not reset the connection under the client's feet (RFC 9112 §9.6).
LINGER_TIMEOUT: Final = 1.0
# Draining: a keep-alive connection idle for less than this may have its next request on
# the way, so it is closed only once it has been idle this long (its next request, if it
# comes sooner, is answered with Connection: close). See HTTPConnection.drain().
DRAIN_IDLE_GRACE: Final = 1.0

_DISCONNECT: Final = {"type": "http.disconnect"}
_CONTINUE_TASK_NAME: Final = "trioserve.connection.http1.HTTPConnection.continue_serving"


class HTTPConnection:
    """One client connection speaking HTTP/1.1.

    Args:
        stream: the accepted stream; this object closes it.
        state: the per-server shared state.
        client: the peer address for the scope, or None (UNIX sockets).
        server: the local address for the scope.
        scheme: ``"http"`` or ``"https"``.
    """

    # (Slots: an idle keep-alive connection then costs no instance __dict__.)
    __slots__ = (
        "_fd",
        "_holders",
        "_read_since_yield",
        "_timeout_scope",
        "_upgraded_to",
        "_written_since_yield",
        "broken",
        "client",
        "closing",
        "completes_scope",
        "idle",
        "linger",
        "parser",
        "peer_gone",
        "scheme",
        "server",
        "state",
        "stream",
        "tls_extension",
        "trusted_proxies",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        state: ServerState,
        *,
        client: tuple[str, int] | None,
        server: tuple[str, int | None] | None,
        scheme: str = "http",
    ) -> None:
        self.stream = stream
        self.state = state
        self.client = client
        self.server = server
        self.scheme = scheme
        self.parser = state.new_parser()
        # The socket's descriptor for write()'s non-blocking fast path; -1 for other streams
        # (TLS, PROXY-protocol wrappers), which always go through send_all.
        self._fd = stream.socket.fileno() if type(stream) is trio.SocketStream else -1
        self._written_since_yield = 0
        self._read_since_yield = 0
        self.peer_gone = False
        self.broken = False  # a write was interrupted: never reuse, never linger
        self.linger = False  # close with a lingering read (we may have unread input)
        self.closing = False  # drain requested: finish the current response, then close
        self.idle = False
        self._timeout_scope: trio.CancelScope | None = None
        self._upgraded_to: Any = None
        # Tasks that still need the connection: the one serving it, and each app call that
        # waited (see run()). The last one to finish closes it.
        self._holders = 0
        # Per-connection scope facts, set by transport.PreparedConnection.attach().
        self.tls_extension: dict[str, Any] | None = None
        self.trusted_proxies: TrustedHosts | None = None
        self.completes_scope = False

    @property
    def peer(self) -> str:
        """The client for log lines: ``host:port``, or ``unix``.

        (Made when needed: a string kept per connection would cost every idle connection.)
        """
        return peer_name(self.client)

    # -- stream boundary: trio resource errors are translated here only ----------------

    async def receive_bytes(self, *, wait_first: bool = False) -> bytes:
        """Read some bytes; b"" when the peer closed or the connection broke.

        ``wait_first``: the caller expects nothing to have arrived yet (a WebSocket that
        just delivered a message, whose peer usually waits for the reply): wait until readable
        before reading, sparing the read that would fail (raising BlockingIOError is the
        dearer half of it).
        """
        data: bytes
        try:
            if self._fd < 0:
                # trio's streams return bytes; the abstract signature also allows bytearray.
                data = await self.stream.receive_some(RECEIVE_SIZE)  # type: ignore[assignment]
            else:
                # What SocketStream.receive_some does (try, else wait until readable; always
                # a checkpoint), minus its wrappers: an idle keep-alive connection then
                # parks fewer frames (memory per connection) and a read costs less. As with
                # receive_some, a read in a cancelled scope raises before consuming anything.
                if wait_first:
                    await trio.lowlevel.wait_readable(self._fd)  # the checkpoint
                else:
                    await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    read: bytes | None = self._read_now()
                except BlockingIOError:
                    read = None
                # (Waiting outside the except clause: a task parked inside it would keep the
                # exception and its traceback alive for the whole idle period, ~0.5 KiB.)
                if read is None:
                    while read is None:
                        await trio.lowlevel.wait_readable(self._fd)
                        try:
                            read = self._read_now()
                        except BlockingIOError:
                            pass
                elif not wait_first:
                    await trio.lowlevel.cancel_shielded_checkpoint()
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

        Reads up to 256 KiB through the server's scratch buffer, so a request with a body
        of that size usually arrives in one read (the app then gets it in one message) while
        a small read still costs a small allocation (``os.read(fd, 256 KiB)`` would map and
        unmap a large block every time).
        """
        scratch = self.state.read_buffer
        return bytes(scratch[: os.readv(self._fd, (scratch,))])

    def receive_nowait(self) -> bytes | None:
        """Read what has already arrived, without waiting; None when nothing has.

        b"" when the peer closed. Always None for streams other than a plain socket (TLS,
        PROXY-protocol wrappers): those are only read by :meth:`receive_bytes`.
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
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise self._write_failed() from exc

    def _write_failed(self) -> ClientDisconnected:
        """Record that a write found the peer gone; the error for the caller to raise."""
        self.peer_gone = True
        self.broken = True
        self.parser.send_failed()
        return ClientDisconnected(f"{self.peer} disconnected")

    async def read_fairly(self, size: int) -> None:
        """After a read that did not wait: yield once per ``WRITE_YIELD_BYTES`` read, so a
        fast upload cannot keep the other connections from running."""
        self._read_since_yield += size
        if self._read_since_yield >= WRITE_YIELD_BYTES:
            self._read_since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def write(self, data: bytes | list[bytes]) -> None:
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
                await self.stream.send_all(data if isinstance(data, bytes) else b"".join(data))
                return
            # The fast path below may not wait at all, so honour a pending cancellation
            # first: an app streaming forever to a fast reader must still stop promptly
            # on a hard stop (nothing has been written yet, so this is a clean cancel).
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                if isinstance(data, bytes):
                    total = len(data)
                    sent = os.write(self._fd, data)
                else:  # one vectored write: the pieces (a large body) are not copied
                    total = sum(map(len, data))
                    sent = os.writev(self._fd, data[:MAX_WRITE_PIECES])
            except BlockingIOError:
                sent = 0
            if sent < total:
                await self._write_rest(data, sent)  # waits: a checkpoint
                self._written_since_yield = 0
            else:
                # Fairness: a response streamed faster than the peer reads still lets the
                # other connections run, once per WRITE_YIELD_BYTES (not once per chunk).
                self._written_since_yield += sent
                if self._written_since_yield >= WRITE_YIELD_BYTES:
                    self._written_since_yield = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._write_failed() from exc
        except BaseException:
            # Cancelled mid-write: part of the data may be on the wire (the parser must know).
            self.broken = True
            self.parser.send_failed()
            raise

    async def _write_rest(self, data: bytes | list[bytes], sent: int) -> None:
        """Write what a first non-blocking write left, waiting until the socket takes more.

        The pieces stay pieces (a large body is never joined into a copy).
        """
        fd = self._fd
        pieces = _after(data if isinstance(data, list) else [data], sent)
        while pieces:
            await trio.lowlevel.wait_writable(fd)
            try:
                sent = os.writev(fd, pieces[:MAX_WRITE_PIECES])
            except BlockingIOError:
                continue
            pieces = _after(pieces, sent)

    # -- lifecycle ------------------------------------------------------------------------

    def drain(self) -> None:
        """Graceful shutdown: answer at most one more request, with ``Connection: close``.

        Closing a kept-alive connection races its client: its next request may already be
        on the wire (under load it usually is), and a request that meets a close instead of
        a response has failed (wrk retries nothing; careful clients retry only a request
        they know was not sent, RFC 9112 §9.3.1). So the connection ends where the client
        learns of it from a response, or where nothing is likely to be in flight:

        * while a response is in progress: its head says ``Connection: close`` if it has not
          left yet; if it has promised keep-alive, the next request is still read and is
          answered with ``Connection: close`` (as below);
        * idle after a response: the next request is answered with ``Connection: close``;
          the connection is closed once it has been idle for :data:`DRAIN_IDLE_GRACE`
          seconds (at once if it already has). That a request leaves at the very instant of
          the close is the race any server has with an idle connection; a close with no
          response pending is the one clients retry;
        * accepted, no request yet: its first request is likely on the way; it is answered
          (with ``Connection: close``) within the usual keep-alive / request-head timeouts.

        The graceful-shutdown deadline bounds all of it.
        """
        if self.closing:
            return
        self.closing = True
        if self._upgraded_to is not None:
            self._upgraded_to.drain()
        elif self.idle and not self._fresh and self._timeout_scope is not None:
            # Its deadline is the start of the idle period + the keep-alive timeout (see
            # _serve_requests); a deadline already past closes it at once.
            shorten = self.state.config.timeout_keep_alive - DRAIN_IDLE_GRACE
            if shorten > 0:
                self._timeout_scope.deadline -= shorten

    @property
    def _fresh(self) -> bool:
        """No request has been received on this connection yet."""
        return self.parser.their_http_version is None

    def complete_scope(self, scope: dict[str, Any]) -> None:
        """Add this connection's edge facts to a new ``http`` or ``websocket`` scope.

        The TLS extension (computed once per connection, shared by its scopes) and, only
        when the direct peer is a trusted proxy, client and scheme from its forwarding
        headers. Callers skip the call when ``completes_scope`` is False (plain HTTP from
        an untrusted peer, or ``--no-proxy-headers``).
        """
        if self.tls_extension is not None:
            scope["extensions"]["tls"] = self.tls_extension
        if self.trusted_proxies is not None:
            apply_proxy_headers(scope, self.trusted_proxies)

    async def run(self, tasks: trio.Nursery) -> None:
        """Serve requests until the connection ends, or until an app call waits.

        ``tasks`` is the nursery of the server's connection tasks (this one among them). An
        app call that waits for anything hands the serving over to a new task there (see
        :meth:`_handle_request`); this call then returns once its app call has returned.
        The connection is closed when the serving has ended and every app call has returned,
        by whichever task finishes last; forcefully on cancellation. (No nursery per
        connection: an idle keep-alive connection costs ~1.3 KiB less without one.)
        """
        self.state.connections.add(self)
        self._holders = 1
        with self._bugs_logged():
            try:
                await self._serve_requests(tasks)
            finally:
                await self._release()

    @contextlib.contextmanager
    def _bugs_logged(self) -> Iterator[None]:
        """A bug in a task serving this connection is logged and costs only this connection
        (trioserve's own code: the app's exceptions are handled in ``call_app``)."""
        try:
            yield
        except Exception:
            logger.exception("%s - internal error in connection task", self.peer)
        except BaseExceptionGroup as group:
            bugs, rest = group.split(Exception)
            if bugs is not None:
                logger.error("%s - internal error in connection task", self.peer, exc_info=bugs)
            if rest is not None:
                raise rest from None

    async def _release(self) -> None:
        """This task is done with the connection: close it if no other task needs it."""
        self._holders -= 1
        if self._holders == 0:
            self.state.connections.discard(self)
            if self.state.trace:
                logger.log(TRACE_LOG_LEVEL, "%s - HTTP connection lost", self.peer)
            await self._close()

    async def _close(self) -> None:
        if self._fd >= 0 and not self.linger:
            # What aclose_forcefully does for a plain socket (notify trio, close the fd),
            # minus its cancel scope and the closing checkpoint: a Connection: close request
            # would pay a scheduler round for nothing.
            self.stream.socket.close()  # type: ignore[attr-defined]
            return
        try:
            if self.linger and not self.broken and trio.current_effective_deadline() != -math.inf:
                with trio.move_on_after(LINGER_TIMEOUT):
                    try:
                        if isinstance(self.stream, trio.abc.HalfCloseableStream):
                            await self.stream.send_eof()  # (TLS streams cannot half-close)
                        discarded = 0
                        while discarded < MAX_DISCARD_BODY:
                            data = await self.stream.receive_some(RECEIVE_SIZE)
                            if not data:
                                break
                            discarded += len(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            # Also when a hard stop cancels the lingering read: the socket must not leak.
            await trio.aclose_forcefully(self.stream)

    # -- the request loop -----------------------------------------------------------------

    async def _serve_requests(self, tasks: trio.Nursery) -> None:
        # (A task serving a connection checkpoints before each read, here or at the end of
        # each request: a hard stop never lets it start another app call.)
        await trio.lowlevel.checkpoint_if_cancelled()
        config = self.state.config
        conn = self.parser
        with trio.CancelScope() as timeout:
            self._timeout_scope = timeout
            received = b""  # what the keep-alive wait read: the start of the next head
            while True:
                head = await self._read_head(timeout, config.timeout_request_header, received)
                if head is None:
                    if not self.idle:
                        return
                    # The keep-alive wait is here rather than in _read_head: an idle
                    # connection then parks one coroutine frame less (~0.3 KiB).
                    keep_alive = config.timeout_keep_alive
                    if self.closing and not self._fresh:
                        keep_alive = min(keep_alive, DRAIN_IDLE_GRACE)  # see drain()
                    timeout.deadline = trio.current_time() + keep_alive
                    received = await self.receive_bytes(wait_first=True)
                    conn.receive_data(received)
                    self.idle = False
                    continue
                received = b""
                if timeout.deadline != math.inf:
                    timeout.deadline = math.inf
                reusable = await self._handle_request(*head, tasks)
                # (Not kept while the connection waits for its next request: the last
                # request's event and header list, ~0.6 KiB per idle connection.)
                del head
                if not reusable:
                    return
                conn.start_next_cycle()
        # Reached only when the timeout scope fired (keep-alive, slow head or drain).
        if self.idle:
            logger.debug("%s - closing idle keep-alive connection", self.peer)
        else:
            logger.info("%s - request head not received in time, closing", self.peer)

    async def _read_head(
        self, timeout: trio.CancelScope, header_timeout: float, received: bytes
    ) -> tuple[h11.Request, list[tuple[bytes, bytes]]] | None:
        """Return the next request and its header list, or None when the connection should
        end, or None with ``idle`` set when nothing has arrived yet: the caller then waits
        for the next request under the keep-alive timeout.

        ``received``: what the caller's keep-alive wait read and fed to the parser (b"" if
        nothing), which begins this head."""
        conn = self.parser
        # Deadlines are armed only right before a read that has to wait: a pipelined head
        # already in the buffer, or a head that has already arrived whole (the common case
        # under load), moves none (each move costs a deadline-heap update).
        head_deadline: float | None = None  # set once the first bytes of the head arrived
        # obs-fold is screened in the head only (never in body bytes), before h11 parses
        # (and silently unfolds) it: what is buffered once, then only each new read plus
        # 3 bytes of context (enough to see a fold or the head's end across the boundary),
        # so a head trickling in byte by byte costs linear, not quadratic, time.
        # (The parser's unparsed bytes: pipelined input. h11 also keeps ``received`` there
        # until it has a whole head; httptools parses as bytes arrive.)
        unscreened = received or conn.trailing_data[0]
        # (h11 only: the head as received, to judge a Transfer-Encoding h11 refused; see
        # http_parser.refusal.)
        seen: bytes | bytearray = b"" if conn.rejects_obs_fold else unscreened
        while True:
            if unscreened and not conn.rejects_obs_fold and head_has_obs_fold(unscreened):
                await self._reject(400, "obs-fold in request head")
                return None
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reject(*refusal(exc, seen))
                return None
            if event is h11.NEED_DATA:
                # (All that is buffered now is one incomplete head.)
                if head_deadline is None and unscreened:
                    head_deadline = trio.current_time() + header_timeout
                if head_deadline is None:
                    # Under load the next keep-alive request has usually arrived by the
                    # time this task runs again: take it without arming the keep-alive
                    # deadline and without yielding. (No checkpoint here: this task
                    # has passed one since it last read, in _handle_request or on
                    # entering _serve_requests, and cannot have been cancelled since.)
                    # Draining too: a request that has arrived is answered (drain()).
                    data = self.receive_nowait()
                    if data is None:
                        self.idle = True
                        return None
                else:
                    if timeout.deadline != head_deadline:
                        timeout.deadline = head_deadline
                    data = await self.receive_bytes()
                conn.receive_data(data)
                if conn.rejects_obs_fold:
                    unscreened = data
                else:
                    unscreened = unscreened[-3:] + data
                    seen = _appended(seen, data) if seen else data
                continue
            # (type() checks: h11's events derive from an ABC, so isinstance() is dear.)
            if type(event) is h11.Request:
                headers = header_list(event)  # one pass over h11's Headers per request
                config = self.state.config
                problem = check_request(
                    event,
                    max_head_size=config.h11_max_incomplete_event_size,
                    headers=headers,
                    max_body_size=config.limit_request_body,
                )
                if problem is not None:
                    await self._reject(*problem, method=event.method)
                    return None
                return event, headers
            # ConnectionClosed (clean EOF between requests) or PAUSED after an error.
            return None

    async def _reject(self, status: int, reason: str, *, method: bytes = b"GET") -> None:
        """Answer a malformed request head with ``status`` and close (peer's fault)."""
        logger.info("%s - invalid HTTP request: %s (%d)", self.peer, reason, status)
        await self.answer_and_close(status, method=method)

    async def answer_and_close(
        self,
        status: int,
        *,
        method: bytes = b"GET",
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> bool:
        """Send trioserve's own plain error response; the connection then closes.

        The close lingers (the client may still be sending). The write is bounded by the
        head timeout, as the connection's deadline may not be armed at this point.

        Returns:
            Whether the whole response was written.
        """
        headers = self.state.response_headers()
        data = error_response(self.parser, status, extra_headers + headers, method=method)
        self.linger = True
        if not data or self.peer_gone:
            return False
        with trio.move_on_after(self.state.config.timeout_request_header):
            try:
                await self.write(data)
            except ClientDisconnected:
                return False
            return True
        return False

    async def _handle_request(
        self,
        request: h11.Request,
        headers: list[tuple[bytes, bytes]],
        tasks: trio.Nursery,
    ) -> bool:
        """Run one request to response completion; True if the connection can be reused."""
        state = self.state
        config = state.config
        limit = config.limit_concurrency
        # A WebSocket session is one app call like a request: --limit-concurrency answers
        # its upgrade with 503 too, and --limit-max-requests counts its handshake.
        if limit is not None and state.active_requests >= limit:
            logger.warning("%s - concurrency limit %d reached, answering 503", self.peer, limit)
            await self.answer_and_close(503, method=request.method)
            return False
        state.count_request()
        if config.ws != "none" and is_websocket_upgrade(request, headers):
            return await self._upgrade(request)
        scope = build_http_scope(
            request,
            scheme=self.scheme,
            client=self.client,
            server=self.server,
            root_path=config.root_path,
            state=state.lifespan_state,
            headers=headers,
        )
        if self.completes_scope:
            self.complete_scope(scope)
        cycle = RequestCycle(self, request, scope)
        # Counted here, not when the task starts: requests arriving in the same scheduler
        # batch on several connections must all see each other (RequestCycle.run undoes it).
        state.active_requests += 1

        # The app is called in this task; only if it waits for anything (I/O, a lock, a
        # sleep, a write that blocks) does the connection move on to a new task (a sibling
        # in the server's connection nursery), so that the next request is read while the
        # app (BackgroundTasks...) still runs. An app that answers without waiting, the
        # common case, costs no task spawn and no hand-off.
        # (Its context is a copy, as a task of its own would get: contextvars it sets do not
        # leak into the next request.)
        def move_on() -> None:
            # This task's timeout scope now encloses only the app call: drain() must not
            # cancel it (the new task's _serve_requests sets its own).
            self._timeout_scope = None
            self._holders += 1  # (released by the new task; this one's by run())
            tasks.start_soon(self._continue_serving, cycle, tasks, name=_CONTINUE_TASK_NAME)

        detached = await _run_until_first_wait(cycle.run(), contextvars.copy_context(), move_on)
        if detached:
            return False  # this task only ran the app; the new one serves the connection
        # The request's one trip through the scheduler: other connections run before this
        # one reads its next request (fairness; a pipelining client cannot hog the loop).
        # A hard stop that came meanwhile ends the connection here, before another
        # request is read (the response is complete).
        await trio.lowlevel.checkpoint()
        return await self._after_response(cycle)

    async def _continue_serving(self, cycle: RequestCycle, tasks: trio.Nursery) -> None:
        """Serve the connection on after ``cycle`` 's app waited for something.

        A task of the server's connection nursery, the connection's only reader from now on
        (see :meth:`run`).
        """
        with self._bugs_logged():
            try:
                reusable = await self._after_response(cycle)
                del cycle  # (not kept while the connection waits for its next request)
                if reusable:
                    self.parser.start_next_cycle()
                    await self._serve_requests(tasks)
            finally:
                await self._release()

    async def _after_response(self, cycle: RequestCycle) -> bool:
        """Wait for ``cycle`` 's response to complete; True if the connection can be reused."""
        if not cycle.done:  # (an app call that returned in this task is always done)
            await cycle.flush_until_done()
        if cycle.reading is not None:
            # The app still awaits receive() on the socket: take the reader role back.
            cycle.reading.cancel()
            await cycle.wait_reader_idle()
        # Not reusable after an abort or a bad or stalled request body, nor when we never
        # sent the 100 the client waits for (it may or may not send the body, RFC 9110
        # §10.1.1). During a drain, only if the response promised keep-alive (its head left
        # before the drain began): the parser knows (a Connection: close response leaves it
        # in MUST_CLOSE), and the client's next request is then answered with Connection:
        # close rather than raced (drain()).
        reusable = not (
            cycle.aborted
            or self.peer_gone
            or self.broken
            or cycle.expect_100
            or cycle.peer_error is not None
        )
        if reusable:
            # Make the connection reusable: consume what is left of the request body. What
            # is buffered (for a bodiless GET: just its EndOfMessage) is consumed without
            # arming a timeout; only a body still in flight needs the bounded wait.
            conn = self.parser
            discarded = self._discard_buffered_body() if conn.our_state is h11.DONE else -1
            if discarded < 0:
                reusable = False
            elif conn.their_state is h11.SEND_BODY:
                reusable = await self._discard_body_in_flight(discarded)
            else:
                reusable = conn.their_state is h11.DONE
        if not reusable and self._body_in_flight():
            # Closing with request body unread: close gracefully, or the kernel resets the
            # connection and the response may be lost in flight (RFC 9112 §9.6).
            self.linger = True
        return reusable

    def _body_in_flight(self) -> bool:
        """Whether request body bytes may still come (what h11 buffers is consumed)."""
        conn = self.parser
        if conn.their_state is h11.ERROR:  # a malformed body: the rest is still coming
            return True
        try:
            while conn.their_state is h11.SEND_BODY:
                if conn.next_event() is h11.NEED_DATA:
                    return True
        except h11.RemoteProtocolError:
            return True
        return False

    def _discard_buffered_body(self) -> int:
        """Consume the request body bytes the parser has: how many (-1: too many, or a
        malformed body)."""
        conn = self.parser
        discarded = 0
        while conn.their_state is h11.SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return -1
            if event is h11.NEED_DATA:
                break
            if type(event) is h11.Data:
                discarded += len(event.data)
                if discarded > MAX_DISCARD_BODY:
                    return -1
        return discarded

    async def _discard_body_in_flight(self, discarded: int) -> bool:
        """Read and drop the rest of an unread request body, within the keep-alive timeout
        and ``MAX_DISCARD_BODY`` bytes in all; True if it ended (the connection is reusable)."""
        conn = self.parser
        with trio.move_on_after(self.state.config.timeout_keep_alive):
            while conn.their_state is h11.SEND_BODY and discarded <= MAX_DISCARD_BODY:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return False
                if event is h11.NEED_DATA:
                    data = await self.receive_bytes()
                    if not data:
                        return False
                    conn.receive_data(data)
                elif type(event) is h11.Data:
                    discarded += len(event.data)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _upgrade(self, request: h11.Request) -> bool:
        from .websocket import WebSocketConnection  # only when a client asks

        ws = WebSocketConnection(self, request)
        self._upgraded_to = ws
        self.state.active_requests += 1  # the session, app call included
        try:
            await ws.run()
        finally:
            self.state.active_requests -= 1
        return False


class RequestCycle:
    """One request/response: the app-call task with its ``receive`` and ``send``.

    The app call runs in the connection's task until it first waits (see the module
    docstring), then the connection moves on. It may outlive its response (Starlette's
    BackgroundTasks); once the response is complete its ``receive()`` answers
    ``http.disconnect`` and further ``send()`` calls raise :class:`AppProtocolError`.
    """

    # (No __slots__: what most requests never change stays a class attribute, so making a
    # cycle sets 7 attributes instead of 21.)
    # The response completed (or was aborted); _done_event only exists while something
    # waits for that (rare: an app that will not read while pipelined bytes pile up).
    done = False
    _done_event: trio.Event | None = None
    # Set when the response completes or when streamed chunks were left buffered; made
    # only when someone waits or signals (most responses complete without either).
    attention: trio.Event | None = None
    _buffered = 0
    aborted = False
    body_done = False
    disconnected = False
    # The app task reading the socket in receive(), and an Event set when it stops
    # (made by each waiting read).
    reading: trio.CancelScope | None = None
    _reader_idle: trio.Event | None = None
    peer_error: h11.RemoteProtocolError | None = None
    _body_received = 0  # request body bytes handed to the app (for --limit-request-body)
    _pending: Any = None
    _continue_write: trio.Event | None = None
    # send() from several tasks of one app: writes take turns, so their bytes never
    # interleave on the wire (and trio never sees two senders on the stream).
    _writing = False
    _write_turn: trio.Event | None = None

    def __init__(self, conn: HTTPConnection, request: h11.Request, scope: dict[str, Any]) -> None:
        self.conn = conn
        self.request = request
        self.scope = scope
        state = conn.state
        self.writer = ResponseWriter(
            conn.parser, request.method, state.response_headers(), state.response_heads
        )
        self._buffer: list[bytes] = []
        # The client waits for 100 before sending its body; True until the app reads.
        self.expect_100 = conn.parser.they_are_waiting_for_100_continue
        self._start_time = time.perf_counter() if state.access_log_enabled() else 0.0

    # -- the app call task -----------------------------------------------------------------

    async def run(self) -> None:
        """Call the app, then make sure the response ends one way or another."""
        conn = self.conn
        state = conn.state
        try:  # state.active_requests was incremented by HTTPConnection._handle_request
            exc = await call_app(state.app, self.scope, self.receive, self.send)
            if exc is not None:
                state.report_app_error(exc)
            if self.done:
                return
            writer = self.writer
            if not writer.started:
                if conn.peer_gone and self.peer_error is None:
                    # The client left before anything was answered (an abandoned upload):
                    # nothing was sent and the server did not fail. Logged as nginx's 499,
                    # never as a 5xx. (An app error on the way is logged by call_app.)
                    writer.status = CLIENT_CLOSED_REQUEST
                    self._finish(aborted=True)
                    return
                if exc is None and self.peer_error is None:
                    logger.error("ASGI callable returned without starting response")
                await self._send_error(
                    self.peer_error.error_status_hint if self.peer_error else 500
                )
            else:
                # (Not the app's fault when the request body failed: it was told to stop.)
                if exc is None and not conn.peer_gone and self.peer_error is None:
                    logger.error("ASGI callable returned without completing response")
                if self._buffer and not (conn.peer_gone or conn.broken):
                    # What the app did send still reaches the client before the close.
                    with contextlib.suppress(ClientDisconnected):
                        await self._write_buffered()
                self._finish(aborted=True)
        finally:
            state.active_requests -= 1
            if not self.done:
                self._finish(aborted=True)

    async def _send_error(self, status: int) -> None:
        self.writer.status = status
        written = await self.conn.answer_and_close(status, method=self.request.method)
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
            log_access(
                self.conn.state,
                self.scope,
                self.writer.status,
                self.writer.body_bytes,
                time.perf_counter() - self._start_time,
                aborted=aborted,
            )

    # -- send -----------------------------------------------------------------------------

    async def send(self, message: Any) -> None:
        """The app's ``send``: validate, then write (the head leaves with the first body)."""
        try:
            message_type = message["type"]
        except (TypeError, KeyError, IndexError):
            raise AppProtocolError(
                f"ASGI message must be a dict with a 'type', got {message!r}"
            ) from None
        conn = self.conn
        if conn.peer_gone or conn.broken or self.peer_error is not None:
            # (After an invalid request body the app was told http.disconnect; run() then
            # answers with the 4xx itself.)
            raise ClientDisconnected(f"{conn.peer} disconnected")
        if self.done:
            raise AppProtocolError(f"{message_type!r} sent after the response completed")
        if message_type == "http.response.body":
            if self._writing or self._continue_write is not None:
                await self._wait_write_turn()
                if conn.peer_gone or conn.broken:
                    raise ClientDisconnected(f"{conn.peer} disconnected")
                if self.done:
                    raise AppProtocolError(f"{message_type!r} sent after the response completed")
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
                    await conn.write(pieces[0] if len(pieces) == 1 else pieces)
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
            self.writer.start(message, close=conn.closing or self.expect_100)
        else:
            raise AppProtocolError(f"unexpected ASGI message type {message_type!r} for http")

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
            await self.conn.write(pieces)
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
        if self.disconnected or self.done or self.conn.peer_gone:
            return _DISCONNECT
        if self.reading is not None:
            # Another task of this app is already reading: wait for it, then report.
            await self.wait_reader_idle()
            return _DISCONNECT if self.disconnected or self.done else await self.receive()
        if not self.body_done:
            return await self._receive_body()
        return await self._wait_for_disconnect()

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
                return await self.conn.receive_bytes(wait_first=True)
            finally:
                self.reading = None
                idle.set()
        return None

    async def _receive_body(self) -> dict[str, Any]:
        conn = self.conn
        parser = conn.parser
        if self.expect_100:
            self.expect_100 = False
            if not self.writer.started and parser.they_are_waiting_for_100_continue:
                # RFC 9110 §10.1.1: send 100 only once the app asks for the body.
                self._continue_write = trio.Event()
                try:
                    continue_ = h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue"
                    )
                    await conn.write(parser.send(continue_) or b"")
                except ClientDisconnected:
                    self.disconnected = True
                    return _DISCONNECT
                finally:
                    self._continue_write.set()
                    self._continue_write = None
        while True:
            event = self._pending
            self._pending = None
            if event is None:
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError as exc:
                    return self._peer_error(exc)
            if isinstance(event, h11.RemoteProtocolError):
                return self._peer_error(event)
            if event is h11.NEED_DATA:
                # Body bytes usually have arrived already (sent right behind the head):
                # read them without the cancel scope and Event a waiting read needs.
                await trio.lowlevel.checkpoint_if_cancelled()
                data = conn.receive_nowait()
                waited = data is None
                if data is None:
                    # --timeout-request-body bounds each wait for more of the body, as
                    # nginx's client_body_timeout does: a body trickling in, or shorter
                    # than its Content-Length, cannot hold the app and the connection.
                    data = await self._read(conn.state.config.timeout_request_body)
                    if data is None and not self.done:
                        return self._peer_error(
                            h11.RemoteProtocolError(
                                "nothing received for "
                                f"{conn.state.config.timeout_request_body:g} s",
                                error_status_hint=408,
                            ),
                            "request body timed out",
                        )
                if not data:  # peer gone, EOF, or the response completed meanwhile
                    self.disconnected = True
                    return _DISCONNECT
                parser.receive_data(data)  # (fed before any yield: bytes stay in order)
                if not waited:
                    await conn.read_fairly(len(data))
                    if self.done:  # the connection task reads now
                        self.disconnected = True
                        return _DISCONNECT
                continue
            if type(event) is h11.Data:
                limit = conn.state.config.limit_request_body
                if limit:
                    # What crosses --limit-request-body never reaches the app. (A chunked
                    # body is counted here; a larger Content-Length got 413 before the app
                    # was called, from check_request.)
                    self._body_received += len(event.data)
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
                if type(following) is h11.EndOfMessage:
                    self.body_done = True
                    return {"type": "http.request", "body": event.data, "more_body": False}
                if following is not h11.NEED_DATA:
                    self._pending = following
                return {"type": "http.request", "body": event.data, "more_body": True}
            if type(event) is h11.EndOfMessage:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # ConnectionClosed / PAUSED cannot precede EndOfMessage; treat as a disconnect.
            self.disconnected = True
            return _DISCONNECT

    def _peer_error(
        self, exc: h11.RemoteProtocolError, what: str = "invalid request body"
    ) -> dict[str, Any]:
        """Give up on the request body because of the peer (``what`` it did, for the log).

        The app gets ``http.disconnect`` and its ``send()`` raises ``ClientDisconnected``;
        once it returns, :meth:`run` answers ``exc.error_status_hint`` if no response head
        has been sent, and the connection closes.
        """
        logger.info("%s - %s: %s (%d)", self.conn.peer, what, exc, exc.error_status_hint)
        self.peer_error = exc
        self.disconnected = True
        self.conn.linger = True
        self.conn.closing = True
        return _DISCONNECT

    async def _wait_for_disconnect(self) -> dict[str, Any]:
        """Body fully received: block until the client leaves or the response completes."""
        parser = self.conn.parser
        while not self.done:
            if len(parser.trailing_data[0]) > MAX_PIPELINE_BUFFER:
                if self._done_event is None:
                    self._done_event = trio.Event()
                await self._done_event.wait()
                break
            # First without waiting: a receive() in an already-cancelled scope (Starlette's
            # Request.is_disconnected() polls that way) still learns of a closed peer.
            data = self.conn.receive_nowait()
            if data is None:
                data = await self._read()
                if data is None:
                    break
            if not data:
                self.disconnected = True
                break
            parser.receive_data(data)  # pipelined bytes: kept for the next cycle
        return _DISCONNECT


def _appended(buffer: bytes | bytearray, data: bytes) -> bytes | bytearray:
    """``buffer + data``, in place once ``buffer`` is a bytearray: linear when called
    for each read of a head that trickles in."""
    if type(buffer) is bytes:
        buffer = bytearray(buffer)
    buffer += data
    return buffer


def _after(pieces: list[bytes], count: int) -> list[bytes]:
    """``pieces`` without their first ``count`` bytes (a partly sent piece is sliced)."""
    index = 0
    while count and count >= len(pieces[index]):
        count -= len(pieces[index])
        index += 1
    rest = pieces[index:]
    if count:
        rest[0] = memoryview(rest[0])[count:]  # type: ignore[call-overload]
    return rest


@types.coroutine
def _run_until_first_wait(
    coro: Coroutine[Any, Any, None], context: contextvars.Context, on_wait: Callable[[], None]
) -> Generator[Any, Any, bool]:
    """Run ``coro`` in the calling task, in ``context``; call ``on_wait()`` the first time
    it yields to trio (it is about to wait or checkpoint). Every trap and every value trio
    sends back (outcomes, so cancellation too) passes through unchanged.

    Returns:
        Whether ``on_wait`` was called.
    """
    waited = False
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            if error is None:
                trap = context.run(coro.send, value)
            else:
                trap = context.run(coro.throw, error)
        except StopIteration:
            return waited
        error = None
        if not waited:
            waited = True
            on_wait()
        try:
            value = yield trap
        except BaseException as exc:  # what trio throws in (it passes outcomes by send)
            error = exc
