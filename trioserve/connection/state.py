"""Per-server shared state, created by ``serve()`` and passed down (layer 4, bottom).

There are no module globals in trioserve: everything several connections share (the
config, the app, lifespan state, the set of live connections, counters for
``--limit-concurrency`` / ``--limit-max-requests``, the cached ``Date`` header) lives in
one :class:`ServerState` per ``serve()`` call (and the scratch buffer socket reads go
through).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from email.utils import formatdate
from time import time
from typing import Any, Protocol

from ..access_format import (
    CLIENT_CLOSED_REQUEST,
    access_fields,
    compile_access_format,
    status_phrase,
)
from ..asgi_types import ASGIApp
from ..config import Config, http_implementation, ws_implementation
from ..errors import ClientDisconnected
from ..message_trace import tracing_enabled
from ..metrics import ServerMetrics
from ..protocol.http1_parser import H11Connection, HTTPParser
from ..protocol.response_heads import ResponseHeads
from ..protocol.ws_engine import EngineFactory, WsprotoEngine
from .edge import EdgeSettings
from .stream import READ_BUFFER_SIZE

access_logger = logging.getLogger("trioserve.access")


def log_access(
    state: ServerState,
    scope: dict[str, Any],
    status: int | None,
    body_bytes: int,
    duration: float,
    *,
    aborted: bool = False,
) -> None:
    """Emit the access line of one request on ``trioserve.access`` (http and websocket).

    The line follows ``--access-log-format`` (rendered here, so any handler or formatter
    from ``--log-config`` shows it); the record also carries the raw facts as attributes
    (``asgi_scope``, ``status_code``, ``body_bytes``, ``duration``, ``aborted``) for the
    JSON formatter. Call only when ``state.access_log_enabled()``.
    """
    extra = {
        "asgi_scope": scope,
        "status_code": status,
        "body_bytes": body_bytes,
        "duration": duration,
        "aborted": aborted,
    }
    template = state.access_template
    if template is not None:
        fields = access_fields(scope, status, body_bytes, duration)
        access_logger.info("%s", template.render(fields, scope["headers"]), extra=extra)
        return
    client = scope.get("client")
    query = scope.get("query_string")
    target = scope.get("raw_path", b"").decode("latin-1")
    if query:
        target += "?" + query.decode("latin-1")
    # uvicorn's line (see access_format): '127.0.0.1:50312 - "GET / HTTP/1.1" 200 OK'.
    phrase = status_phrase(status)
    if aborted and status != CLIENT_CLOSED_REQUEST:
        phrase += " (aborted)"  # the response was cut short (499 says it all)
    access_logger.info(
        '%s - "%s %s HTTP/%s" %s %s',
        f"{client[0]}:{client[1]}" if client else "-",
        scope.get("method", "GET"),
        target,
        scope.get("http_version", "1.1"),
        status if status is not None else "-",
        phrase,
        extra=extra,
    )


class Drainable(Protocol):
    """A live connection that can be asked to finish up (HTTP or WebSocket)."""

    def drain(self) -> None: ...


class ServerState:
    """What the connections of one server share.

    Attributes:
        config: the validated configuration.
        app: the ASGI 3 application.
        lifespan_state: the dict lifespan startup filled in (copied into every scope).
        connections: live connections, so a drain can reach the idle ones at once.
        draining: set once a graceful shutdown has begun.
        active_requests: app calls currently running, WebSocket sessions included
            (``--limit-concurrency``).
        total_requests: requests and WebSocket handshakes accepted so far
            (``--limit-max-requests``).
        response_heads: what the server's response writers learned of the heads its apps
            send (checked, encoded fields; ``protocol.response_heads.ResponseHeads``).
        new_parser: makes each connection's HTTP/1.1 state machine: ``h11.Connection``, or
            its httptools-parsed equivalent for ``--http httptools`` (one interface,
            ``protocol.http1_parser.HTTPParser``).
        new_ws_engine: makes each WebSocket's engine, ``new_ws_engine(max_size, deflate)``:
            wsproto, or websockets for ``--ws websockets`` (``protocol.ws_engine``).
        trace: ``--log-level trace`` is on (decided when the server starts): log
            connection open and close (``message_trace``).
        metrics: the server's counters for ``/metrics`` (``trioserve.metrics``), or None
            when it does not count (``Config.collects_metrics``): every hook in the
            connection code is one ``if metrics is not None``.
        date_clock: the wall clock as :meth:`response_headers` last read it for the Date
            header: on HTTP/1.1, the start of the request being set up
            (``connection.request_cycle.RequestCycle`` takes it, instead of a clock read
            of its own, for the duration histogram).
    """

    __slots__ = (
        "_date_headers",
        "_date_second",
        "_date_value",
        "access_log",
        "access_template",
        "active_requests",
        "app",
        "config",
        "connections",
        "date_clock",
        "default_headers",
        "draining",
        "edge",
        "lifespan_state",
        "max_requests",
        "metrics",
        "new_parser",
        "new_ws_engine",
        "on_app_error",
        "on_max_requests",
        "read_buffer",
        "response_heads",
        "total_requests",
        "trace",
    )

    def __init__(
        self,
        config: Config,
        app: ASGIApp,
        *,
        max_requests: int | None = None,
        on_max_requests: Callable[[], None] | None = None,
        on_app_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self.app = app
        self.lifespan_state: dict[str, Any] | None = None
        self.connections: set[Drainable] = set()
        self.draining = False
        self.active_requests = 0
        self.total_requests = 0
        self.max_requests = max_requests
        self.on_max_requests = on_max_requests
        self.on_app_error = on_app_error
        self.default_headers = config.default_headers
        # Scratch space for the connections' socket reads (each read is copied out at once,
        # before any other task runs); a view made once, so a read slices it directly.
        self.read_buffer = memoryview(bytearray(READ_BUFFER_SIZE))
        self.response_heads = ResponseHeads()
        self.new_parser = _parser_factory(self)
        self.new_ws_engine = _ws_engine_factory(config)
        self._date_second = -1
        self._date_value = b""
        self._date_headers: tuple[tuple[bytes, bytes], ...] = ()
        self.date_clock = 0.0
        self.access_log = config.access_log
        # --log-level trace, decided once (message_trace): the connection code checks only
        # this, once per connection.
        self.trace = tracing_enabled()
        self.metrics = (
            ServerMetrics(
                self.connections, lambda: self.active_requests, lambda: self.total_requests
            )
            if config.collects_metrics
            else None
        )
        # TLS context, trusted proxies, PROXY protocol (reads the TLS files: ConfigError).
        self.edge = EdgeSettings(config, self.metrics, self.read_buffer)
        self.access_template = (
            compile_access_format(config.access_log_format)
            if config.access_log_format is not None
            else None
        )

    def response_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Default headers for a response starting now (Date cached once a second)."""
        if not self.config.date_header:
            return self.default_headers
        now = self.date_clock = time()  # (an HTTP/1.1 request's start: RequestCycle)
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date_value = formatdate(now, usegmt=True).encode("ascii")
            self._date_headers = ((b"date", self._date_value), *self.default_headers)
        return self._date_headers

    def access_log_enabled(self) -> bool:
        return self.access_log and access_logger.isEnabledFor(logging.INFO)

    def admit(self) -> bool:
        """Start an app call (a request, or a WebSocket session): False when
        ``--limit-concurrency`` calls are running already (the caller answers 503).

        An admitted call is counted (past ``--limit-max-requests`` the server is asked to
        drain) and holds its place in the limit until :meth:`release`. Counted when the
        request is read, not when its task starts: requests arriving in the same scheduler
        batch on several connections must all see each other.
        """
        limit = self.config.limit_concurrency
        if limit is not None and self.active_requests >= limit:
            return False
        self.active_requests += 1
        self.total_requests += 1
        if self.total_requests == self.max_requests and self.on_max_requests is not None:
            self.on_max_requests()  # (--limit-max-requests reached: drain)
        return True

    def release(self) -> None:
        """An admitted app call has returned (see :meth:`admit`)."""
        self.active_requests -= 1

    def start_serving(
        self,
        app: ASGIApp,
        lifespan_state: dict[str, Any] | None,
        on_max_requests: Callable[[], None],
    ) -> None:
        """Lifespan startup is done: ``app`` is the app as the connections call it (through
        the asyncio bridge, if any), ``lifespan_state`` what startup filled in, and
        ``on_max_requests`` what to do past ``--limit-max-requests``."""
        self.app = app
        self.lifespan_state = lifespan_state
        self.on_max_requests = on_max_requests

    def begin_drain(self) -> None:
        """A graceful shutdown has begun: ``draining`` from now on."""
        self.draining = True

    def report_app_error(self, exc: BaseException) -> None:
        """Hand an app call's exception to ``on_app_error``; ClientDisconnected is not one
        (the peer left, the app did nothing wrong)."""
        if self.on_app_error is not None and not isinstance(exc, ClientDisconnected):
            self.on_app_error(exc)


def _ws_engine_factory(config: Config) -> EngineFactory:
    """What ``--ws`` chose: the class of each WebSocket's engine (``auto`` resolved)."""
    if ws_implementation(config.ws) == "websockets":
        from ..protocol.ws_websockets import WebsocketsEngine  # only with websockets installed

        return WebsocketsEngine
    return WsprotoEngine


def _parser_factory(state: ServerState) -> Callable[[], HTTPParser]:
    """What ``--http`` chose: a maker of per-connection parsers (``auto`` resolved)."""
    config = state.config
    limit = config.h11_max_incomplete_event_size
    if http_implementation(config.http) == "httptools":
        # (Imported only with the optional extra; the class looked up by name, which a
        # compiled build would otherwise bind for good: tests substitute it.)
        parser_module = importlib.import_module("trioserve.protocol.httptools_parser")
        parser_class = parser_module.HttptoolsConnection
        return lambda: parser_class(max_incomplete_event_size=limit)
    return lambda: H11Connection(max_incomplete_event_size=limit)
