"""Bind or adopt listening sockets and wrap them as trio listeners (layer 3).

TCP (IPv4, IPv6 literals with or without brackets, host names; ``--reuse-port`` sets
SO_REUSEPORT), UNIX domain sockets (``--uds``), an inherited file descriptor (``--fd``) and
the sockets of systemd socket activation. Binding errors are the operator's: they surface as
:class:`~trioserve.errors.BindError` (an ``OSError``) naming the address.

Socket activation (``sd_listen_fds(3)``): when ``LISTEN_PID`` is this process's pid,
``LISTEN_FDS`` sockets start at fd 3 (``SD_LISTEN_FDS_START``), named by the optional
colon-separated ``LISTEN_FDNAMES``. They are served instead of binding ``--host``/``--port``,
and the variables are removed once read, so that the app's child processes do not take the
sockets for theirs. ``--workers`` processes are activated by their parent the same way:
:func:`activation_environ` names the worker's pid and the sockets it inherited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio

from ..config import Config
from ..errors import BindError, ConfigError

logger = logging.getLogger(__name__)

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
# sd_listen_fds(3): the first passed socket, and the variables that pass them.
LISTEN_FDS_START: Final = 3
ACTIVATION_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True)
class BoundSocket:
    """A listening socket and how to describe it."""

    sock: socket.socket
    url: str
    address: tuple[str, int] | str
    # The LISTEN_FDNAMES name of a socket-activated socket ("unknown" when unnamed, as
    # systemd says); None for a socket bound or adopted (--fd) by trioserve itself.
    activation_name: str | None = None


def bind_sockets(
    config: Config, environ: MutableMapping[str, str] = os.environ
) -> list[BoundSocket]:
    """Create the listening sockets for ``config`` (blocking stdlib calls, done once).

    Sockets passed by socket activation (read from ``environ``, which loses the variables)
    replace ``--host``/``--port``.

    Raises:
        BindError: the address is in use, not available, or the fd is not a socket.
        ConfigError: socket activation with ``--uds``, ``--fd`` or ``--reuse-port``.
    """
    activated = take_activated_fds(environ)
    if activated:
        _check_activation(activated, config)
        bound = []
        for fd, name in activated.items():
            b = describe(adopt_fd(fd, config.backlog))
            bound.append(dataclasses.replace(b, activation_name=name))
            logger.info("Adopted socket-activated fd %d (%s): %s", fd, name, b.url)
        return bound
    if config.fd is not None:
        return [describe(adopt_fd(config.fd, config.backlog))]
    if config.uds is not None:
        return [describe(bind_unix(config.uds, config.backlog))]
    sock = bind_tcp(config.bind_host, config.port, config.backlog, reuse_port=config.reuse_port)
    return [describe(sock)]


def bind_parent_sockets(
    config: Config, environ: MutableMapping[str, str] = os.environ
) -> list[BoundSocket]:
    """The sockets the parent of worker processes holds and passes on to them.

    None with ``--reuse-port``: each worker binds a socket of its own
    (socket activation is refused then, as by :func:`bind_sockets`).
    """
    if not config.reuse_port:
        return bind_sockets(config, environ)
    _check_activation(take_activated_fds(environ), config)
    return []


def _check_activation(activated: dict[int, str], config: Config) -> None:
    """Refuse binding options that contradict the sockets socket activation passed."""
    flags = (
        ("--uds", config.uds is not None),
        ("--fd", config.fd is not None),
        ("--reuse-port", config.reuse_port),
    )
    conflict = [flag for flag, given in flags if given]
    if activated and conflict:
        raise ConfigError(
            f"{len(activated)} socket(s) passed by socket activation (LISTEN_FDS): "
            f"drop {' and '.join(conflict)}"
        )


def take_activated_fds(environ: MutableMapping[str, str] = os.environ) -> dict[int, str]:
    """The sockets socket activation passed to this process: fd → name (``sd_listen_fds``).

    Empty unless ``LISTEN_PID`` is this process's pid (the variables were meant for a
    parent otherwise). The three variables are removed from ``environ`` either way,
    as ``sd_listen_fds(unset_environment=1)`` does.

    Raises:
        ConfigError: ``LISTEN_FDS`` or ``LISTEN_PID`` is not a number.
    """
    values = {name: environ.pop(name, None) for name in ACTIVATION_VARIABLES}
    pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if pid is None or count is None:
        return {}
    if not (pid.isdigit() and count.isdigit()):
        raise ConfigError(f"socket activation: LISTEN_PID={pid!r} LISTEN_FDS={count!r}")
    if int(pid) != os.getpid():
        return {}
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    given = names.split(":") if names else []
    if len(given) != len(fds):
        given = ["unknown"] * len(fds)  # systemd's name for an unnamed socket
    return dict(zip(fds, given, strict=True))


def activation_environ(names: Sequence[str], pid: int) -> dict[str, str]:
    """The variables that activate process ``pid`` with sockets at fds 3, 4, ... named
    ``names``: a ``--workers`` process inherits its parent's socket-activated sockets at
    the same fd numbers and adopts them as the parent did. Empty when ``names`` is."""
    if not names:
        return {}
    return {
        "LISTEN_PID": str(pid),
        "LISTEN_FDS": str(len(names)),
        "LISTEN_FDNAMES": ":".join(names),
    }


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
    # Passed without close-on-exec by systemd: the app's child processes must not hold it
    # (worker processes still get it: pass_fds makes it inheritable for them alone).
    sock.set_inheritable(False)
    return sock


def bind_tcp(host: str, port: int, backlog: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind and listen on ``host:port`` (the first address ``host`` resolves to).

    ``reuse_port``: set SO_REUSEPORT, so that several processes (``--workers`` with
    ``--reuse-port``) each bind a socket of their own to the port and the kernel spreads
    new connections over them.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(exc.errno, f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
    # (The address's shape tells the family: a socket's family attribute converts to an
    # enum on every read, which costs more than the system call.)
    if isinstance(name, tuple):  # AF_INET (host, port), AF_INET6 (host, port, flow, scope)
        return name[0], name[1]
    return (name.decode() if isinstance(name, bytes) else str(name)), None


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
