"""Bind or adopt listening sockets and wrap them as trio listeners (layer 3).

TCP (IPv4, IPv6 literals with or without brackets, host names), UNIX domain sockets
(``--uds``) and an inherited file descriptor (``--fd``). Binding errors are the operator's:
they surface as :class:`~trioserve.errors.BindError` (an ``OSError``) naming the address.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import trio

from ..config import Config
from ..errors import BindError

# What an in-memory connection (transport="memory" in trioserve.testing) looks like.
MEMORY_URL: Final = "http://testserver"
MEMORY_CLIENT: Final = ("testclient", 50000)
MEMORY_SERVER: Final = ("testserver", 80)
# Connections accepted at once when the listening socket becomes readable.
ACCEPT_BURST: Final = 64
# accept() errors about one connection only (trio.SocketListener skips them too).
IGNORED_ACCEPT_ERRNOS: Final = frozenset(
    getattr(errno, name) for name in ("ECONNABORTED", "EPERM", "EPROTO") if hasattr(errno, name)
)


@dataclass(frozen=True)
class BoundSocket:
    """A listening socket and how to describe it."""

    sock: socket.socket
    url: str
    address: tuple[str, int] | str


def bind_sockets(config: Config) -> list[BoundSocket]:
    """Create the listening sockets for ``config`` (blocking stdlib calls, done once).

    Raises:
        BindError: the address is in use, not available, or the fd is not a socket.
    """
    if config.fd is not None:
        return [describe(adopt_fd(config.fd, config.backlog))]
    if config.uds is not None:
        return [describe(bind_unix(config.uds, config.backlog))]
    return [describe(bind_tcp(config.bind_host, config.port, config.backlog))]


def close_sockets(bound: list[BoundSocket], config: Config) -> None:
    """Close what :func:`bind_sockets` returned and remove the ``--uds`` socket file."""
    for b in bound:
        b.sock.close()
        if config.uds is not None and isinstance(b.address, str):
            with contextlib.suppress(OSError):
                os.unlink(b.address)


def adopt_fd(fd: int, backlog: int) -> socket.socket:
    """Listen on an inherited socket (bound by a parent process or a process manager).

    Raises:
        BindError: ``fd`` is not open, not a socket, or not a stream socket.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(exc.errno, f"cannot use fd {fd}: {exc.strerror}") from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()  # not ours to close
        raise BindError(f"cannot use fd {fd}: not a stream socket")
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.detach()
        raise BindError(exc.errno, f"cannot listen on fd {fd}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen on ``host:port`` (the first address ``host`` resolves to)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(exc.errno, f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        raise BindError(exc.errno, f"cannot bind to {shown}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def bind_unix(path: str, backlog: int) -> socket.socket:
    """Bind a UNIX socket at ``path``, replacing a stale socket file (never a regular file)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(exc.errno, f"cannot bind to unix socket {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def describe(sock: socket.socket) -> BoundSocket:
    """The URL and address of a bound socket (the real port when bound to port 0)."""
    if sock.family == socket.AF_UNIX:
        path = sock.getsockname()
        if isinstance(path, bytes):
            path = path.decode()
        return BoundSocket(sock, f"unix:{path}", str(path))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
    return BoundSocket(sock, f"http://{shown}:{port}", (host, port))


def to_listener(bound: BoundSocket, *, shared: bool = False) -> SocketListener:
    """Wrap a bound socket; trio sets TCP_NODELAY on every accepted stream.

    ``shared``: other worker processes accept on the same socket: take one connection per
    wakeup, so that the load spreads over the workers.
    """
    return SocketListener(bound.sock, burst=1 if shared else ACCEPT_BURST)


class SocketListener(trio.abc.Listener[trio.SocketStream]):
    """A listening socket that takes every connection already waiting in one go.

    ``trio.SocketListener`` accepts one connection per scheduler round; under a storm of
    short connections (``Connection: close``) the backlog then drains slowly and every
    round does little work. Here, once the socket is readable, everything waiting is
    accepted at once (asyncio does the same) and handed out by :meth:`accept` without
    another wait. Accept errors (EMFILE...) surface from :meth:`accept` as from trio's.

    With ``burst=1`` (a socket shared by several worker processes) it behaves as trio's:
    one connection, then a turn for everyone else, so that no worker grabs them all.
    """

    def __init__(self, sock: socket.socket, *, burst: int = ACCEPT_BURST) -> None:
        self.socket = trio.socket.from_stdlib_socket(sock)  # (also makes it non-blocking)
        self._sock = sock
        self._burst = burst
        self._inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        # Accepted sockets with the peer address accept(2) reported for each.
        self._waiting: deque[tuple[socket.socket, Any]] = deque()

    async def accept(self) -> trio.SocketStream:
        stream, _ = await self.accept_with_client()
        return stream

    async def accept_with_client(self) -> tuple[trio.SocketStream, tuple[str, int] | None]:
        """Accept a connection; return it with its client address (None on UNIX sockets).

        The address is the one ``accept(2)`` reported. Asking the socket later
        (``getpeername()``) fails with ENOTCONN once the client has reset the connection,
        yet the request it sent before the reset is still read, served and logged, and
        must name its TCP peer.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waiting = self._waiting
        while not waiting:
            if self._sock.fileno() < 0:
                raise trio.ClosedResourceError("the listening socket was closed")
            while len(waiting) < self._burst:
                try:
                    waiting.append(self._sock.accept())
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in IGNORED_ACCEPT_ERRNOS:
                        continue  # that client is gone already; as trio does
                    if waiting:
                        break  # hand out what we have; the error comes back next time
                    raise
            if not waiting:
                await trio.lowlevel.wait_readable(self._sock)
        sock, address = waiting.popleft()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        if self._burst == 1:
            await trio.lowlevel.cancel_shielded_checkpoint()
        # (IPv6 addresses come with flow info and scope id: the scope takes host and port.)
        return stream, (address[0], address[1]) if self._inet else None

    async def aclose(self) -> None:
        self.socket.close()  # (wakes a waiting accept: ClosedResourceError)
        while self._waiting:
            self._waiting.popleft()[0].close()
        await trio.lowlevel.checkpoint()


def local_address(stream: trio.abc.Stream) -> tuple[str, int | None]:
    """The scope's ``server``: ``(host, port)``; for UNIX sockets ``(path, None)`` as the
    ASGI spec says; a fixed name for in-memory connections. (The client address comes
    from the listener's :meth:`SocketListener.accept_with_client`.)

    Raises:
        OSError: the socket has no local address (already closed).
    """
    if not isinstance(stream, trio.SocketStream):
        return MEMORY_SERVER
    name = stream.socket.getsockname()  # (still answers after the peer's reset)
    if stream.socket.family == socket.AF_UNIX:
        return (name.decode() if isinstance(name, bytes) else str(name)), None
    return name[0], name[1]


class MemoryListener(trio.abc.Listener[trio.abc.HalfCloseableStream]):
    """A listener with no socket: :meth:`connect` hands it one end of a memory stream pair.

    It lets the real connection code run over ``trio.testing`` memory streams (the
    in-memory mode of ``trioserve.testing``). After :meth:`aclose`, :meth:`connect` raises
    ``ConnectionRefusedError`` like a closed port.
    """

    url: Final = MEMORY_URL

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.HalfCloseableStream](0)

    async def connect(self) -> trio.abc.HalfCloseableStream:
        """Open a connection; returns the client's end once the server has accepted it."""
        from trio.testing import memory_stream_pair  # only tests need it

        client, server = memory_stream_pair()
        try:
            await self._send.send(server)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionRefusedError("in-memory server is not accepting") from None
        return client

    async def accept(self) -> trio.abc.HalfCloseableStream:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:  # pragma: no cover - the send side is never closed
            raise trio.ClosedResourceError from None

    async def accept_with_client(self) -> tuple[trio.abc.HalfCloseableStream, tuple[str, int]]:
        """Accept a connection; its client is always ``MEMORY_CLIENT``."""
        return await self.accept(), MEMORY_CLIENT

    def close(self) -> None:
        """Refuse further connections (synchronous, for ``finally`` blocks)."""
        self._receive.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
