"""Run a WSGI application (PEP 3333) as an ASGI app, in worker threads (layer 3).

``--interface wsgi`` wraps the loaded app in :class:`WSGIMiddleware`; the class is also
public, to mount a Flask or Django app inside an ASGI framework on trio, where a2wsgi's
``WSGIMiddleware`` cannot run (it drives asyncio directly)::

    from trioserve.wsgi import WSGIMiddleware

    app.mount("/v1", WSGIMiddleware(flask_app))

Theory of operation::

    ASGI app call (a task)                          worker thread
    ──────────────────────────────────────────      ─────────────────────────────────────
    task group
    ├── to_thread.run_sync(abandon_on_cancel) ────► app(environ, start_response)
    └── _serve_calls: for each call ◄───────────────  wsgi.input.read(), each chunk of the
            await receive() / send(message)            response, write(): one call at a
            reply ─────────────────────────────────►   time, the thread blocks for its reply

* **Streaming both ways.** ``wsgi.input`` pulls request body messages from ``receive()``
  only when the app reads (so ``100 Continue`` is sent only to an app that reads), and
  every chunk the app's iterable yields (or passes to ``write()``) is sent as it is
  produced; the thread waits until ``send()`` took it, which is the backpressure.
* **The request's own task tree does the I/O.** The thread never runs async code itself:
  its calls are served by a task of the same app call, so ``receive()`` and ``send()`` run
  where trio's cancellation and the graceful-shutdown deadline reach them. (With
  ``from_thread.run``, a call from a thread whose ``to_thread`` was abandoned would run as
  a system task, outside any request.)
* **A stuck app cannot hold the server.** The thread runs with ``abandon_on_cancel``: when
  the app call is cancelled (shutdown deadline, hard stop) it ends at once and the thread
  is left to finish on its own; its next call fails with :class:`ClientDisconnected`. On
  trio, worker threads are daemonic and keep their limiter token until they return, so
  at most ``threads`` app calls run at any time.
* anyio, not trio, is used for the threads and the task group: the middleware is a bridge
  to apps (STYLE.md §1.1 principle 6), so it also runs under ``--app-loop asyncio`` and
  inside a FastAPI app on either loop.

WebSocket scopes are refused (``websocket.close``: a 403 to the client) and lifespan is
acknowledged, as WSGI has neither.
"""

from __future__ import annotations

import logging
import queue
import re
import sys
from collections.abc import Callable, Iterable, MutableMapping
from types import TracebackType
from typing import Any, Final, Protocol

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .asgi_types import ASGIReceive, ASGISend, Message
from .errors import ClientDisconnected

logger = logging.getLogger(__name__)

# anyio's default thread limiter: enough for blocking views, bounded so that a flood of
# slow requests queues instead of starting thousands of threads.
DEFAULT_THREADS: Final = 40
# PEP 3333: "a string containing ... a status code and a reason phrase ... separated by a
# single space"; the code is three digits.
_STATUS: Final = re.compile(r"([1-9][0-9]{2}) ")
_INPUT_LINE_END: Final = b"\n"

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
Environ = dict[str, Any]
WriteCallable = Callable[[bytes], None]


class StartResponse(Protocol):
    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /
    ) -> WriteCallable: ...


WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
# What the thread asks of the app call's task: ``None`` for ``receive()``, else a message
# to ``send()``; with the queue on which the thread waits for the answer.
_Reply = tuple[BaseException | None, Message | None]
_Call = tuple[Message | None, "queue.SimpleQueue[_Reply]"]


class WSGIMiddleware:
    """An ASGI app that runs a WSGI app in worker threads.

    Args:
        app: the WSGI application, ``app(environ, start_response) -> iterable of bytes``.
        threads: at most this many requests run the app at once; more wait for a thread.

    The limiter is per instance: ``--interface wsgi`` makes one per ``serve()``.
    """

    __slots__ = ("_limiter", "app")

    def __init__(self, app: WSGIApp, threads: int = DEFAULT_THREADS) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.app = app
        self._limiter = anyio.CapacityLimiter(threads)

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: ASGIReceive, send: ASGISend
    ) -> None:
        """Answer one ASGI call: run the WSGI app for an ``http`` scope.

        Raises:
            Exception: whatever the WSGI app (or its iterable) raised, as it raised it.
        """
        if scope["type"] == "lifespan":
            await _acknowledge_lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1000})
            return
        calls_in, calls_out = anyio.create_memory_object_stream[_Call](1)
        responder = _Responder(scope, _ThreadCalls(calls_in))
        error: Exception | None = None
        # Closed when the call ends: an abandoned thread's next call finds it closed.
        with calls_in:
            async with anyio.create_task_group() as calls:
                calls.start_soon(_serve_calls, calls_out, receive, send)
                try:
                    await anyio.to_thread.run_sync(
                        responder.run, self.app, abandon_on_cancel=True, limiter=self._limiter
                    )
                except Exception as exc:  # re-raised below, not wrapped in the group
                    error = exc
                finally:
                    calls.cancel_scope.cancel()
        if error is not None:
            raise error


async def _acknowledge_lifespan(receive: ASGIReceive, send: ASGISend) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _serve_calls(
    calls: MemoryObjectReceiveStream[_Call], receive: ASGIReceive, send: ASGISend
) -> None:
    """Do the thread's ``receive()``/``send()`` calls, one at a time, until cancelled.

    Every call gets a reply, also those the cancellation leaves behind (the thread would
    otherwise wait forever): calls after this task has ended find the stream closed.
    """
    with calls:
        try:
            async for message, reply in calls:
                try:
                    if message is None:
                        reply.put((None, await receive()))
                    else:
                        await send(message)
                        reply.put((None, None))
                except Exception as exc:  # the app's to handle: raised in its thread
                    reply.put((exc, None))
                except BaseException:
                    reply.put((_request_over(), None))
                    raise
        finally:
            while True:
                try:
                    _, reply = calls.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
                reply.put((_request_over(), None))


def _request_over() -> ClientDisconnected:
    return ClientDisconnected("the request is over (client gone or server shutting down)")


class _ThreadCalls:
    """The thread's side of :func:`_serve_calls`: one blocking call at a time."""

    __slots__ = ("_calls", "_replies")

    def __init__(self, calls: MemoryObjectSendStream[_Call]) -> None:
        self._calls = calls
        self._replies: queue.SimpleQueue[_Reply] = queue.SimpleQueue()

    def receive(self) -> Message:
        message = self._call(None)
        assert message is not None
        return message

    def send(self, message: Message) -> None:
        self._call(message)

    def _call(self, message: Message | None) -> Message | None:
        try:
            anyio.from_thread.run_sync(self._calls.send_nowait, (message, self._replies))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.RunFinishedError):
            # The app call has ended (this thread was abandoned) or the loop is gone.
            raise _request_over() from None
        error, result = self._replies.get()
        if error is not None:
            raise error
        return result


class _Input:
    """``wsgi.input``: the request body, read from ``receive()`` as the app asks for it."""

    __slots__ = ("_buffer", "_calls", "_more")

    def __init__(self, calls: _ThreadCalls) -> None:
        self._calls = calls
        self._buffer = bytearray()
        self._more = True

    def _fill(self) -> bool:
        """Append the next body message to the buffer; False once the body has ended.

        Raises:
            ClientDisconnected: the client left before the body was complete.
        """
        if not self._more:
            return False
        message = self._calls.receive()
        if message["type"] == "http.disconnect":
            self._more = False
            raise ClientDisconnected("the client disconnected while the body was being read")
        self._buffer += message.get("body", b"")
        self._more = bool(message.get("more_body", False))
        return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(len(self._buffer))
        while len(self._buffer) < size and self._fill():
            pass
        return self._take(size)

    def readline(self, size: int | None = -1) -> bytes:
        limit = sys.maxsize if size is None or size < 0 else size
        searched = 0
        while True:
            end = self._buffer.find(_INPUT_LINE_END, searched)
            if end >= 0:
                return self._take(min(end + 1, limit))
            searched = len(self._buffer)  # (no line end in what is already there)
            if searched >= limit or not self._fill():
                return self._take(limit)

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> _Input:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class _Responder:
    """One request in its worker thread: environ, ``start_response``, the response body."""

    __slots__ = ("_calls", "_head", "_started", "scope")

    def __init__(self, scope: MutableMapping[str, Any], calls: _ThreadCalls) -> None:
        self.scope = scope
        self._calls = calls
        self._head: Message | None = None  # the http.response.start message, once known
        self._started = False  # whether it has been sent

    def run(self, app: WSGIApp) -> None:
        """Call the app and send its response; always close its iterable (PEP 3333)."""
        result = app(build_environ(self.scope, _Input(self._calls)), self.start_response)
        try:
            # PEP 3333: a one-element sequence is the whole body; sending it as the last
            # message lets the server frame it with a Content-Length.
            if isinstance(result, (list, tuple)) and len(result) == 1:
                self._send_body(result[0], more_body=False)
                return
            for chunk in result:
                self._send_body(chunk, more_body=True)
            self._send_body(b"", more_body=False)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> WriteCallable:
        """PEP 3333's ``start_response``: record the head; it is sent with the first byte.

        Raises:
            BaseException: ``exc_info``'s exception, when the head has been sent already.
            RuntimeError: a second call without ``exc_info``.
            ValueError, TypeError: a malformed status or header.
        """
        if exc_info is not None:
            if self._started:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self._head is not None:
            raise RuntimeError("start_response() called again without exc_info")
        if not isinstance(status, str) or not (match := _STATUS.match(status)):
            raise ValueError(f"WSGI status must be like '200 OK', got {status!r}")
        encoded = []
        for name, value in headers:
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"WSGI header must be a pair of str, got {(name, value)!r}")
            encoded.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        self._head = {"type": "http.response.start", "status": int(match[1]), "headers": encoded}
        return self._write

    def _write(self, data: bytes) -> None:
        """The ``write()`` callable of PEP 3333 (for old apps): send ``data`` now."""
        self._send_body(data, more_body=True)

    def _send_body(self, chunk: bytes, *, more_body: bool) -> None:
        if not isinstance(chunk, bytes):
            raise TypeError(f"WSGI response body must be bytes, got {type(chunk).__name__}")
        if not self._started:
            # PEP 3333: the head waits for the first non-empty chunk (or the end), so an
            # app may still replace it through start_response(..., exc_info).
            if not chunk and more_body:
                return
            if self._head is None:
                raise RuntimeError("the WSGI app did not call start_response()")
            self._started = True
            self._calls.send(self._head)
        elif not chunk and more_body:
            return
        self._calls.send({"type": "http.response.body", "body": chunk, "more_body": more_body})


def _latin1(text: str) -> str:
    """A str as WSGI carries it: its UTF-8 bytes, one character per byte (PEP 3333)."""
    return text.encode("utf-8").decode("latin-1")


def build_environ(scope: MutableMapping[str, Any], body: Any) -> Environ:
    """The PEP 3333 environ of an ASGI ``http`` scope, with ``body`` as ``wsgi.input``.

    ``SCRIPT_NAME`` is the scope's ``root_path`` and ``PATH_INFO`` the rest of its ``path``
    (which, per ASGI, includes ``root_path``). Header names with ``_`` are dropped: CGI
    turns ``-`` into ``_``, so ``X_Forwarded_For`` would pose as ``X-Forwarded-For`` (nginx
    and gunicorn drop them too).
    """
    root_path: str = scope.get("root_path", "")
    path: str = scope["path"]
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        path = path[len(root_path) :]
    scheme = scope.get("scheme", "http")
    environ: Environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": _latin1(root_path),
        "PATH_INFO": _latin1(path),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": body,
        # Reads end at the end of the body, also a chunked one (no CONTENT_LENGTH): the
        # convention of gunicorn and werkzeug, without which Flask sees no chunked body.
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,  # unknowable from inside a mounted app: the safe answer
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        if "_" in name:
            logger.debug("WSGI environ: header %r dropped (underscore)", name)
            continue
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    server = scope.get("server")
    if server is not None and server[1] is not None:
        environ["SERVER_NAME"], environ["SERVER_PORT"] = server[0], str(server[1])
    else:  # a UNIX socket (or none): what the client asked for, as CGI would
        host = environ.get("HTTP_HOST", "localhost")
        environ["SERVER_NAME"] = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        environ["SERVER_PORT"] = "443" if scheme == "https" else "80"
    client = scope.get("client")
    if client is not None:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    return environ
