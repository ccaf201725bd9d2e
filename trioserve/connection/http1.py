"""The task that serves one accepted connection over HTTP/1.1 (layer 4).

One :class:`HTTPConnection` per accepted stream owns that stream (a
``connection.stream.ConnectionStream``) and its HTTP/1.1 parser
(``protocol.http1_parser.HTTPParser``: h11's, or its httptools twin for ``--http
httptools``). Its task reads request heads and calls the app of each request
(``connection.request_cycle.RequestCycle``, to which it is the ``RequestChannel``) itself.
An app that answers without waiting for anything (the common case) costs no task spawn and
no hand-off. The first time an app waits, the connection moves on to a new task, a sibling
in the server's connection nursery, which waits for *response complete*, not for the app
to return, so the next pipelined or keep-alive request is read while Starlette's
``BackgroundTasks`` still run; the old task is then only the app call's. The connection is
closed once the serving has ended and every app call has returned, by whichever of these
tasks finishes last. (No nursery per connection, nothing kept from the last request: an
idle keep-alive connection costs ~2.3 KiB less than it did with them, less than uvicorn's.)

Ownership of the stream (one reader, one writer, no locks):

* between requests the connection task is the only reader and writer;
* while a response is in progress the app call is the only writer, and its ``receive()``
  reads from the socket on demand (``connection.http1_body``; backpressure for free; EOF
  becomes ``http.disconnect``). When the response completes, a read still pending in
  ``receive()`` is cancelled (a cancelled ``receive_some`` had no effect) before the
  connection task reads again;
* a WebSocket upgrade hands the stream to ``connection.websocket`` (a
  ``WebSocketHandoff``) for the rest of the connection; this object still closes it.

Timeouts use one cancel scope per connection whose deadline is moved: keep-alive while
idle, ``--timeout-request-header`` once a head has begun, infinity while the app responds.
trio's resource errors are translated in ``connection.stream`` only.
"""

from __future__ import annotations

import contextvars
import logging
import math
import sys
from typing import Any, Final

import h11
import trio

from ..errors import ClientDisconnected
from ..message_trace import TRACE_LOG_LEVEL
from ..protocol.http1_messages import (
    ResponseWriter,
    error_response,
    head_has_obs_fold,
    header_list,
    screen_request,
    upgrade_offered,
)
from ..protocol.http1_parser import refusal
from ..protocol.http2 import CONNECTION_SPECIFIC, H2C_SWITCHING, RequestHead, h2c_settings
from ..protocol.scope import ConnectionFacts, http_scope
from .http1_body import HTTP1Body
from .request_cycle import RequestCycle, UntilFirstWait
from .state import ServerState
from .stream import ConnectionStream

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)

# Draining: a keep-alive connection idle for less than this may have its next request on
# the way, so it is closed only once it has been idle this long (its next request, if it
# comes sooner, is answered with Connection: close). See HTTPConnection.drain().
DRAIN_IDLE_GRACE: Final = 1.0

_CONTINUE_TASK_NAME: Final = "trioserve.connection.http1.HTTPConnection.continue_serving"
# (Bound once: compiled, ``h11.X``, ``trio.X`` and ``trio.lowlevel.X`` are module
# attribute look-ups per use.)
_NEED_DATA: Final = h11.NEED_DATA
_SEND_BODY: Final = h11.SEND_BODY
_DONE: Final = h11.DONE
_checkpoint: Final = trio.lowlevel.checkpoint
_checkpoint_if_cancelled: Final = trio.lowlevel.checkpoint_if_cancelled
_current_time: Final = trio.current_time
_copy_context: Final = contextvars.copy_context


class HTTPConnection(HTTP1Body):
    """One client connection speaking HTTP/1.1; the ``RequestChannel`` of its requests.

    Args:
        stream: the accepted stream (after ``connection.edge``); this object closes it.
        state: the per-server shared state.
        facts: the connection's facts (client, server, scheme, TLS, trusted proxy).

    The bytes ``connection.edge`` already read (after a PROXY header, or to tell HTTP/1.1
    from HTTP/2) are handed to :meth:`run`: the start of the first head.
    """

    # (Slots: an idle keep-alive connection then costs no instance __dict__. The stream,
    # the parser, the state and the request body's fields are HTTP1Body's.)
    __slots__ = ("_holders", "_timeout_scope", "_upgraded_to", "facts", "idle")

    def __init__(
        self,
        stream: trio.abc.Stream,
        state: ServerState,
        facts: ConnectionFacts,
    ) -> None:
        parser = state.new_parser()
        super().__init__(
            ConnectionStream(stream, state.read_buffer, facts, parser.send_failed, state.metrics),
            state,
            parser,
        )
        self.facts = facts
        self.idle = False
        self._timeout_scope: trio.CancelScope | None = None
        self._upgraded_to: Any = None
        # Tasks that still need the connection: the one serving it, and each app call that
        # waited (see run()). The last one to finish closes it.
        self._holders = 0

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

    async def run(self, tasks: trio.Nursery, leftover: bytes = b"") -> None:
        """Serve requests until the connection ends, or until an app call waits.

        ``leftover``: bytes ``connection.edge`` read already, the start of the first head
        (its ``--timeout-request-header`` runs from now, as for bytes read here).

        ``tasks`` is the nursery of the server's connection tasks (this one among them). An
        app call that waits for anything hands the serving over to a new task there (see
        :meth:`_handle_request`); this call then returns once its app call has returned.
        The connection is closed when the serving has ended and every app call has returned,
        by whichever task finishes last; forcefully on cancellation.
        """
        self.state.connections.add(self)
        self._holders = 1
        if leftover:
            self.parser.receive_data(leftover)
            metrics = self.state.metrics
            if metrics is not None:  # (read by connection.edge, not by the stream)
                metrics.received_bytes += len(leftover)
        serving = self._serve_requests(tasks, leftover)
        leftover = b""  # (not kept while the connection lives; mypyc compiles no del here)
        try:
            try:
                await serving
            finally:
                await self._release()
        except Exception:
            self._log_bug()
        except BaseExceptionGroup as group:
            self._log_bugs_in(group)

    # A bug in a task serving this connection is logged and costs only this connection
    # (trioserve's own code: the app's exceptions are handled in ``call_app``). (Written as
    # except clauses in the two tasks rather than a context manager: a generator-based one
    # costs each connection a dozen calls.)

    def _log_bug(self) -> None:
        """Log the exception being handled (call from an except clause)."""
        logger.exception("%s - internal error in connection task", self.stream.peer)

    def _log_bugs_in(self, group: BaseExceptionGroup[BaseException]) -> None:
        """Log the bugs in ``group``; re-raise the rest (cancellation, KeyboardInterrupt)."""
        bugs, rest = group.split(Exception)
        if bugs is not None:
            logger.error("%s - internal error in connection task", self.stream.peer, exc_info=bugs)
        if rest is not None:
            raise rest from None

    async def _release(self) -> None:
        """This task is done with the connection: close it if no other task needs it."""
        self._holders -= 1
        if self._holders == 0:
            self.state.connections.discard(self)
            if self.state.trace:
                logger.log(TRACE_LOG_LEVEL, "%s - HTTP connection lost", self.stream.peer)
            await self.stream.aclose()

    # -- the request loop -----------------------------------------------------------------

    async def _serve_requests(
        self, tasks: trio.Nursery, received: bytes = b"", waited: bool = True
    ) -> None:
        # ``received``: what edge read and fed to the parser; ``waited``: the next head
        # comes after a wait (a new connection's does: the accept). (A task serving a
        # connection checkpoints before each read, here or at the end of each request: a
        # hard stop never lets it start another app call.)
        await _checkpoint_if_cancelled()
        config = self.state.config
        conn = self.parser
        metrics = self.state.metrics
        # (Counted: the connection's first request; its keep-alive reuses are derived from
        # that, ServerMetrics.sample. Once per connection, not per request.)
        first = metrics is not None and self._fresh
        with trio.CancelScope() as timeout:
            self._timeout_scope = timeout
            # (Below, what the keep-alive wait read: the start of the next head.)
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
                    timeout.deadline = _current_time() + keep_alive
                    received = await self.stream.receive(wait_first=True)
                    conn.receive_data(received)
                    self.idle = False
                    waited = True
                    continue
                received = b""
                if timeout.deadline != math.inf:
                    timeout.deadline = math.inf
                if first and metrics is not None:  # (just before it is admitted or refused)
                    metrics.first_requests += 1
                    first = False
                reusable = await self._handle_request(*head, tasks, waited)
                waited = False
                # (Not kept while the connection waits for its next request: the last
                # request's event and header list, ~0.6 KiB per idle connection.)
                del head
                if not reusable:
                    return
                conn.start_next_cycle()
        # Reached only when the timeout scope fired (keep-alive, slow head or drain).
        if self.idle:
            logger.debug("%s - closing idle keep-alive connection", self.stream.peer)
        else:
            logger.info("%s - request head not received in time, closing", self.stream.peer)

    async def _read_head(
        self, timeout: trio.CancelScope, header_timeout: float, received: bytes
    ) -> tuple[h11.Request, list[tuple[bytes, bytes]], bool] | None:
        """Return the next request, its header list and whether it has an ``Upgrade`` field
        (``protocol.http1_messages.screen_request``), or None when the connection should
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
        # http1_parser.refusal.)
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
            if event is _NEED_DATA:
                # (All that is buffered now is one incomplete head.)
                if head_deadline is None and unscreened:
                    head_deadline = _current_time() + header_timeout
                if head_deadline is None:
                    # Under load the next keep-alive request has usually arrived by the
                    # time this task runs again: take it without arming the keep-alive
                    # deadline and without yielding. (No checkpoint here: this task
                    # has passed one since it last read, in _handle_request or on
                    # entering _serve_requests, and cannot have been cancelled since.)
                    # Draining too: a request that has arrived is answered (drain()).
                    data = self.stream.receive_nowait()
                    if data is None:
                        self.idle = True
                        return None
                else:
                    if timeout.deadline != head_deadline:
                        timeout.deadline = head_deadline
                    data = await self.stream.receive()
                conn.receive_data(data)
                if conn.rejects_obs_fold:
                    unscreened = data
                else:
                    unscreened = unscreened[-3:] + data
                    seen = _appended(seen, data) if seen else data
                continue
            # (type() checks: h11's events derive from an ABC, so isinstance() is dear.)
            if type(event) is conn.request_type:
                headers = header_list(event)  # one pass over h11's Headers per request
                config = self.state.config
                screened = screen_request(
                    event,
                    max_head_size=config.h11_max_incomplete_event_size,
                    headers=headers,
                    max_body_size=config.limit_request_body,
                )
                if type(screened) is not bool:
                    await self._reject(*screened, method=event.method)
                    return None
                return event, headers, screened
            # ConnectionClosed (clean EOF between requests) or PAUSED after an error.
            return None

    async def _reject(self, status: int, reason: str, *, method: bytes = b"GET") -> None:
        """Answer a malformed request head with ``status`` and close (peer's fault)."""
        logger.info("%s - invalid HTTP request: %s (%d)", self.stream.peer, reason, status)
        if self.state.metrics is not None:
            self.state.metrics.protocol_error(status)
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
        return await self.stream.send_last(data, self.state.config.timeout_request_header)

    async def _handle_request(
        self,
        request: h11.Request,
        headers: list[tuple[bytes, bytes]],
        has_upgrade: bool,
        tasks: trio.Nursery,
        waited: bool = True,
    ) -> bool:
        """Run one request to response completion; True if the connection can be reused.

        ``has_upgrade``: the request has an ``Upgrade`` field (see :meth:`_read_head`);
        ``waited``: the connection waited for it (see below)."""
        state = self.state
        # A WebSocket session is one app call like a request: --limit-concurrency answers
        # its upgrade with 503 too, and --limit-max-requests counts its handshake. (Admitted
        # here, released when the app call returns: RequestCycle.run, or _upgrade.)
        if not state.admit():
            limit = state.config.limit_concurrency
            logger.warning(
                "%s - concurrency limit %d reached, answering 503", self.stream.peer, limit
            )
            if state.metrics is not None:
                state.metrics.concurrency_rejections += 1
            await self.answer_and_close(503, method=request.method)
            return False
        config = state.config
        upgrade = upgrade_offered(request, headers) if has_upgrade else None
        if upgrade is not None:
            if upgrade == b"websocket" and config.ws != "none":
                return await self._upgrade(request, headers)
            settings = self._h2c_settings(headers)
            if settings is not None:
                return await self._upgrade_h2c(request, headers, settings)
        method = request.method
        parser = self.parser
        scope = http_scope(
            method, request.target, request.http_version, headers, self.facts, state.lifespan_state
        )
        cycle = RequestCycle(
            self,
            scope,
            ResponseWriter(parser, method, state.response_headers(), state.response_heads),
            method,
            parser.they_are_waiting_for_100_continue,
            True,  # (the writer's Date header was just read from the clock: the start)
        )
        # Under load, reads first, apps after: a request that had arrived before its
        # connection was ready for it takes one trip through the scheduler, once made
        # ready, before its app is called. The busy connections' reads then run together
        # and their responses leave together (asyncio's I/O phase, then its callbacks): a
        # peer on the same host wakes once per burst, not per response, each wake-up a
        # cross-CPU interrupt (issue 21: 0.29 -> 0.11 per hello under wrk; 3 % less CPU in
        # all, the trip costing ~0.8 us). A request the connection waited for goes straight
        # to its app: a lone client would pay the trip (68 -> 84 us) for no burst. A hard
        # stop that came meanwhile ends the connection here, before the app is called.
        if not waited:
            try:
                await _checkpoint()
            except BaseException:
                state.release()  # (admitted above; the app call that releases it never runs)
                raise

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

        detached = await UntilFirstWait(cycle.run(), _copy_context(), move_on)
        if detached:
            return False  # this task only ran the app; the new one serves the connection
        # A trip through the scheduler: other connections run before this one reads its
        # next request (fairness: a pipelining client cannot hog the loop), which by then
        # has usually arrived. A hard stop that came meanwhile ends the connection here,
        # before another request is read (the response is complete).
        await _checkpoint()
        return await self._after_response(cycle)

    async def _continue_serving(self, cycle: RequestCycle | None, tasks: trio.Nursery) -> None:
        """Serve the connection on after ``cycle`` 's app waited for something.

        A task of the server's connection nursery, the connection's only reader from now on
        (see :meth:`run`). ``cycle`` is never None: it is typed so only to be dropped once
        the response is complete (mypyc compiles no ``del`` of a coroutine's local).
        """
        try:
            try:
                assert cycle is not None
                reusable = await self._after_response(cycle)
                cycle = None  # (not kept while the connection waits for its next request)
                if reusable:
                    self.parser.start_next_cycle()
                    await self._serve_requests(tasks, waited=False)
            finally:
                await self._release()
        except Exception:
            self._log_bug()
        except BaseExceptionGroup as group:
            self._log_bugs_in(group)

    async def _after_response(self, cycle: RequestCycle) -> bool:
        """Wait for ``cycle`` 's response to complete; True if the connection can be reused."""
        if not cycle.done:  # (an app call that returned in this task is always done)
            await cycle.flush_until_done()
        if self.reading is not None:
            # The app still awaits receive() on the socket: take the reader role back.
            self.reading.cancel()
            await self.wait_reader_idle()
        # Not reusable after an abort or a bad or stalled request body, nor when we never
        # sent the 100 the client waits for (it may or may not send the body, RFC 9110
        # §10.1.1). During a drain, only if the response promised keep-alive (its head left
        # before the drain began): the parser knows (a Connection: close response leaves it
        # in MUST_CLOSE), and the client's next request is then answered with Connection:
        # close rather than raced (drain()).
        stream = self.stream
        reusable = not (
            cycle.aborted
            or stream.peer_gone
            or stream.broken
            or cycle.expect_100
            or self.body_error is not None
        )
        if reusable:
            # The next request's body starts afresh (HTTP1Body's per-request fields).
            self._pending = None
            self._body_received = 0
            self.body_done = False
            # Make the connection reusable: consume what is left of the request body. What
            # is buffered (for a bodiless GET: just its EndOfMessage) is consumed without
            # arming a timeout; only a body still in flight needs the bounded wait.
            conn = self.parser
            discarded = self._discard_buffered_body() if conn.our_state is _DONE else -1
            if discarded < 0:
                reusable = False
            elif conn.their_state is _SEND_BODY:
                reusable = await self._discard_body_in_flight(discarded)
            else:
                reusable = conn.their_state is _DONE
        if not reusable and self._body_in_flight():
            # Closing with request body unread: close gracefully, or the kernel resets the
            # connection and the response may be lost in flight (RFC 9112 §9.6).
            stream.linger_on_close()
        return reusable

    async def _upgrade(self, request: h11.Request, headers: list[tuple[bytes, bytes]]) -> bool:
        """Serve a WebSocket session on this connection (admitted: the session, app call
        included, holds a --limit-concurrency place until it ends); never reusable after."""
        from .websocket import WebSocketConnection, WebSocketHandoff  # only when a client asks

        parser = self.parser
        received, eof = parser.trailing_data  # the first frames, if the client did not wait
        handoff = WebSocketHandoff(
            self.stream, self.facts, self.state, request, headers, bytes(received), eof, parser
        )
        ws = WebSocketConnection(handoff)
        self._upgraded_to = ws
        try:
            await ws.run()
        finally:
            self.state.release()
        return False

    def _h2c_settings(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """``HTTP2-Settings`` when this request may switch to HTTP/2 (``Upgrade: h2c``).

        Only with ``--http2``, on cleartext (over TLS ALPN decides, RFC 9113 §3.2), for a
        request without a body (its body would have to be read before the switch), and
        not while draining. Otherwise HTTP/1.1 answers it, as RFC 7540 §3.2 allows.
        """
        if not self.state.config.http2 or self.facts.tls is not None or self.closing:
            return None
        for name, value in headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return None
        return h2c_settings(headers)

    async def _upgrade_h2c(
        self, request: h11.Request, headers: list[tuple[bytes, bytes]], settings: bytes
    ) -> bool:
        """Answer ``101 Switching Protocols``, then serve the connection as HTTP/2; the
        request becomes stream 1 (RFC 7540 §3.2). Never reusable after."""
        from .http2 import HTTP2Connection  # only when a client asks

        stream = self.stream
        received, _eof = self.parser.trailing_data  # the client's preface, if it did not wait
        try:
            await stream.write(H2C_SWITCHING)
        except ClientDisconnected:
            self.state.release()
            return False
        head = RequestHead(
            request.method,
            self.facts.scheme.encode("ascii"),
            request.target,
            [(n, v) for n, v in headers if n not in CONNECTION_SPECIFIC and n != b"http2-settings"],
        )
        conn = HTTP2Connection(
            stream.stream,
            self.state,
            self.facts,
            received=bytes(received),
            upgrade_settings=settings,
            upgrade_head=head,
            upgrade_admitted=True,  # (stream 1 holds the place this request was admitted to)
        )
        self._upgraded_to = conn
        await conn.run()
        return False


def _appended(buffer: bytes | bytearray, data: bytes) -> bytes | bytearray:
    """``buffer + data``, in place once ``buffer`` is a bytearray: linear when called
    for each read of a head that trickles in."""
    if type(buffer) is bytes:
        buffer = bytearray(buffer)
    buffer += data
    return buffer
