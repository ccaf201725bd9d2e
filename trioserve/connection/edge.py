"""Between accept() and HTTP: PROXY header, TLS handshake, who the client is (layer 4).

For each accepted stream :func:`prepare_connection` runs once, in the connection's own
task, and decides everything that holds for the connection's whole life, so nothing of it
is repeated per request:

1. ``--proxy-protocol``: read the PROXY v1/v2 header (never more bytes than it may hold
   plus what already arrived with it) and take the client address from it. A connection
   without a valid header is closed.
2. TLS: wrap the stream in :class:`trio.SSLStream` and complete the handshake. Handshake
   failures, plain HTTP sent to a TLS port and silence are logged at INFO in one line and
   cost only that connection.
3. The TLS extension for the scope (ASGI TLS extension) and whether the direct peer is a
   trusted proxy (``--forwarded-allow-ips``), written down once in the connection's frozen
   ``protocol.scope.ConnectionFacts``; the per-request work then is one attribute check,
   plus header parsing only for trusted peers.
4. ``--http2``: which HTTP the connection speaks. Over TLS the client chose with ALPN
   (``h2``); on cleartext the first bytes tell (:func:`~trioserve.protocol.http2.preface_state`:
   HTTP/2 prior knowledge starts with ``PRI * HTTP/2.0``). They are read once per
   connection, never per request, and handed on as ``leftover``. (``Upgrade: h2c`` is
   an HTTP/1.1 request, so ``connection.http1`` honours it.)

The result, :class:`Prepared`, is handed to ``connection.http1.HTTPConnection`` (or
``connection.http2.HTTP2Connection`` when ``http2`` is set), which feeds ``leftover`` to
its own parser. trio's resource errors are caught here too (the PROXY
header read, the handshake): everything after goes through ``connection.stream``.

Steps 1 and 2 together must finish within ``--timeout-request-header``. With
``--proxy-protocol`` the trust decision is made on the address the PROXY header reports,
because the balancer in front does not touch the HTTP headers.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import Any, Final, NamedTuple

import trio

from ..config import Config
from ..message_trace import peer_name
from ..metrics import ServerMetrics
from ..protocol.http2 import preface_state
from ..protocol.proxy_headers import TrustedHosts
from ..protocol.proxy_protocol import ProxyProtocolError, parse_proxy_header
from ..protocol.scope import ConnectionFacts
from ..tls import TLSSettings, load_tls, tls_extension

logger = logging.getLogger(__name__)

PROXY_HEADER_READ_SIZE: Final = 4096
PREFACE_READ_SIZE: Final = 64 * 1024  # (the preface and what follows it: the first frames)

Client = tuple[str, int] | None
ServerAddress = tuple[str, int | None] | None


class EdgeSettings:
    """Per-server settings of the connection set-up (built once by ``serve()``).

    Raises:
        ConfigError: TLS files or password are wrong (see :func:`trioserve.tls.load_tls`).
    """

    __slots__ = (
        "http2",
        "idle_timeout",
        "metrics",
        "proxy_protocol",
        "root_path",
        "scratch",
        "timeout",
        "tls",
        "trusted",
    )

    def __init__(self, config: Config, metrics: ServerMetrics | None, scratch: memoryview) -> None:
        self.tls: TLSSettings | None = load_tls(config)
        self.trusted: TrustedHosts | None = (
            TrustedHosts(config.forwarded_allow_ips) if config.proxy_headers else None
        )
        self.proxy_protocol = config.proxy_protocol
        self.timeout = config.timeout_request_header
        self.root_path = config.root_path
        self.http2 = config.http2
        self.idle_timeout = config.timeout_keep_alive  # (for the first bytes, as HTTP/1.1)
        self.metrics = metrics  # (counts TLS handshake failures)
        # The server's read buffer (ServerState.read_buffer): the first read of a plain
        # socket goes through it, as connection.stream's reads do.
        self.scratch = scratch


class Prepared(NamedTuple):
    """A connection ready for HTTP: what :func:`prepare_connection` returns."""

    stream: trio.abc.Stream  # the accepted stream, or the SSLStream around it
    facts: ConnectionFacts
    leftover: bytes  # bytes read past the PROXY header (plain HTTP only): the head's start
    http2: bool = False  # the client speaks HTTP/2 (ALPN h2, or the prior-knowledge preface)


class _SetUp:
    """What the set-up steps find out, as they go."""

    __slots__ = ("client", "leftover", "server", "stream", "tls")

    def __init__(self, stream: trio.abc.Stream, client: Client, server: ServerAddress) -> None:
        self.stream = stream
        self.client = client
        self.server = server
        self.tls: dict[str, Any] | None = None
        self.leftover = b""


async def prepare_connection(
    stream: trio.abc.Stream, client: Client, server: ServerAddress, edge: EdgeSettings
) -> Prepared | None:
    """Run the connection set-up; None when the connection was closed here.

    Resource handling: on failure (and on cancellation) the stream is closed here;
    otherwise the returned stream (maybe an ``SSLStream`` around it) belongs to the caller.
    """
    leftover = b""
    tls = None
    http2 = False
    if edge.proxy_protocol or edge.tls is not None:
        prepared = _SetUp(stream, client, server)
        ok = False
        try:
            with trio.move_on_after(edge.timeout) as timeout:
                ok = await _set_up(prepared, edge)
            if timeout.cancelled_caught:
                handshaking = prepared.stream is not stream
                if handshaking and edge.metrics is not None:
                    edge.metrics.tls_handshake_failures += 1
                logger.info(
                    "%s - connection set-up (%s) timed out, closing",
                    peer_name(client),
                    "TLS handshake" if handshaking else "PROXY header",
                )
        finally:
            if not ok:
                await trio.aclose_forcefully(prepared.stream)
        if not ok:
            return None
        stream, client, server = prepared.stream, prepared.client, prepared.server
        leftover, tls = prepared.leftover, prepared.tls
        if tls is not None:
            http2 = tls_alpn(stream) == "h2"
    if edge.http2 and tls is None:
        try:
            sniffed = await _sniff_preface(stream, leftover, client, edge)
        except BaseException:  # (a hard stop while the client is silent: close it here)
            await trio.aclose_forcefully(stream)
            raise
        if sniffed is None:
            await trio.aclose_forcefully(stream)
            return None
        leftover, http2 = sniffed
    trusted = edge.trusted
    if trusted is not None:
        host = client[0] if client is not None else None
        if not trusted.trusts_peer(host):
            trusted = None
    facts = ConnectionFacts(
        client,
        server,
        "https" if tls is not None else "http",
        edge.root_path,
        tls,
        trusted,
    )
    return Prepared(stream, facts, leftover, http2)


def tls_alpn(stream: trio.abc.Stream) -> str | None:
    """The protocol the client chose by ALPN on a TLS stream (None: none, or not TLS)."""
    if isinstance(stream, trio.SSLStream):
        return stream.selected_alpn_protocol()  # type: ignore[no-any-return]
    return None


async def _sniff_preface(
    stream: trio.abc.Stream, received: bytes, client: Client, edge: EdgeSettings
) -> tuple[bytes, bool] | None:
    """Read until the first bytes tell HTTP/2 prior knowledge from HTTP/1.1.

    Returns what was read (with ``received``, the bytes after a PROXY header) and whether
    it is HTTP/2, or None when the client left or stayed silent first. The wait for the
    first byte is the keep-alive timeout (what HTTP/1.1 gives a fresh connection); a
    preface begun must be completed within ``--timeout-request-header``. Usually one read,
    which HTTP/1.1 would have made anyway.
    """
    data = received
    # A plain socket is read straight from its descriptor, as connection.stream reads it:
    # first without waiting. When the request arrived with the connection, as it usually
    # has, this is the one read HTTP/1.1 would have made, and no scheduler round is spent
    # on it (SocketStream.receive_some always yields once).
    fd = stream.socket.fileno() if type(stream) is trio.SocketStream else -1
    if not data and fd >= 0:
        read = _read_plain(fd, edge.scratch)
        if read == b"":
            return None  # (closed before a request: HTTP/1.1 would have said nothing)
        data = read or b""
    if data:
        decided = preface_state(data)
        if decided != "undecided":
            return data, decided == "h2"
    # The first byte within the keep-alive timeout; a preface begun, whole within the
    # request-head timeout.
    with trio.move_on_after(edge.timeout if data else edge.idle_timeout) as scope:
        while True:
            try:
                if fd >= 0:
                    await trio.lowlevel.wait_readable(fd)
                    more = _read_plain(fd, edge.scratch)
                    if more is None:
                        continue
                else:
                    more = bytes(await stream.receive_some(PREFACE_READ_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                more = b""
            if not more:
                # Closed before a request: HTTP/1.1 would have said nothing either.
                return None
            if not data:
                scope.deadline = trio.current_time() + edge.timeout
            data += more
            decided = preface_state(data)
            if decided != "undecided":
                return data, decided == "h2"
    logger.debug("%s - no request received in time, closing", peer_name(client))
    return None


def _read_plain(fd: int, scratch: memoryview) -> bytes | None:
    """One non-blocking read of a plain socket through the server's read buffer: the bytes,
    b"" when the peer closed (or the socket failed), None when nothing has arrived."""
    try:
        size = os.readv(fd, (scratch,))
    except BlockingIOError:
        return None
    except OSError:
        return b""
    return bytes(scratch[:size])


async def _set_up(prepared: _SetUp, edge: EdgeSettings) -> bool:
    if edge.proxy_protocol and not await _read_proxy_header(prepared):
        return False
    tls = edge.tls
    if tls is None:
        return True
    transport: trio.abc.Stream = prepared.stream
    if prepared.leftover:
        transport = _PrefixedStream(transport, prepared.leftover)
        prepared.leftover = b""
    ssl_stream = trio.SSLStream(transport, tls.context, server_side=True, https_compatible=True)
    prepared.stream = ssl_stream
    try:
        await ssl_stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        _log_handshake_failure(prepared.client, exc)
        if edge.metrics is not None:
            edge.metrics.tls_handshake_failures += 1
        return False
    prepared.tls = tls_extension(ssl_stream, tls)
    return True


async def _read_proxy_header(prepared: _SetUp) -> bool:
    buffer = b""
    while True:
        try:
            header = parse_proxy_header(buffer)
        except ProxyProtocolError as exc:
            logger.info("%s - %s, closing", peer_name(prepared.client), exc)
            return False
        if header is not None:
            break
        try:
            data = await prepared.stream.receive_some(PROXY_HEADER_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            logger.debug("%s - closed before sending a PROXY header", peer_name(prepared.client))
            return False
        buffer += data
    prepared.leftover = buffer[header.length :]
    if header.client is not None:
        prepared.client = header.client
        prepared.server = header.server
    return True


def _log_handshake_failure(client: Client, exc: BaseException) -> None:
    cause = exc.__cause__
    peer = peer_name(client)
    if isinstance(cause, ssl.SSLError):
        if cause.reason == "HTTP_REQUEST":
            logger.info("%s - plain HTTP request sent to a TLS port, closing", peer)
            return
        logger.info("%s - TLS handshake failed: %s", peer, cause.reason or cause)
    else:
        logger.info("%s - connection closed during the TLS handshake", peer)


class _PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read (those that followed a PROXY header
    in the same segment) to the TLS layer, then reads from the real stream."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
