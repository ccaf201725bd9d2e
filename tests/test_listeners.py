"""trioserve's listening sockets: every connection waiting in the backlog is taken at once;
socket activation (``LISTEN_FDS``) and ``--reuse-port``, in real processes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from server_process import WORKER_APP, get, running_process, started_process
from wire import Client

from trioserve.connection.listeners import (
    ACCEPT_BURST,
    SocketListener,
    activation_environ,
    take_activated_fds,
)
from trioserve.errors import ConfigError


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextlib.asynccontextmanager
async def listener_with_clients(
    count: int, *, burst: int = ACCEPT_BURST
) -> AsyncIterator[tuple[SocketListener, list[socket.socket]]]:
    """A listener and ``count`` clients already connected to it (in its backlog)."""
    sock = listening_socket()
    listener = SocketListener(sock, burst=burst)
    clients = [socket.create_connection(sock.getsockname()) for _ in range(count)]
    try:
        yield listener, clients
    finally:
        for client in clients:
            client.close()
        await listener.aclose()


async def test_connections_waiting_in_the_backlog_are_accepted_in_one_go() -> None:
    async with listener_with_clients(10) as (listener, clients):
        streams = [await listener.accept()]
        # The other nine were taken with the first: no further wait on the listener.
        assert len(listener._waiting) == 9
        for _ in range(9):
            streams.append(await listener.accept())
        # Each stream is a real, connected socket: bytes flow both ways.
        for index, (client, stream) in enumerate(zip(clients, streams, strict=True)):
            client.sendall(b"%d" % index)
            assert await stream.receive_some(10) == b"%d" % index
            await stream.send_all(b"ok")
            assert client.recv(10) == b"ok"
            await stream.aclose()


async def test_a_burst_is_bounded() -> None:
    async with listener_with_clients(ACCEPT_BURST + 5) as (listener, _):
        stream = await listener.accept()
        assert len(listener._waiting) == ACCEPT_BURST - 1
        await stream.aclose()


async def test_closing_wakes_a_waiting_accept_and_later_accepts_fail() -> None:
    listener = SocketListener(listening_socket())
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await listener.accept()

        nursery.start_soon(accept)
        await trio.testing.wait_all_tasks_blocked()
        await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


async def test_a_shared_socket_takes_one_connection_per_wakeup() -> None:
    # Several worker processes accept on one socket: none may grab the whole backlog.
    async with listener_with_clients(3, burst=1) as (listener, _):
        for _ in range(3):
            stream = await listener.accept()
            assert not listener._waiting
            await stream.aclose()


# -- socket activation: the variables (pure) -----------------------------------------------


def test_activated_fds_start_at_3_with_their_names_and_the_variables_are_removed() -> None:
    environ = {
        "LISTEN_PID": str(os.getpid()),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "web:local",
        "OTHER": "kept",
    }
    assert take_activated_fds(environ) == {3: "web", 4: "local"}
    assert environ == {"OTHER": "kept"}


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"LISTEN_FDS": "1"}, {}, id="no-pid"),
        pytest.param({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, {}, id="another-process"),
        pytest.param({"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"}, {}, id="none-passed"),
        pytest.param(
            {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2"}, {3: "unknown", 4: "unknown"}, id="unnamed"
        ),
        pytest.param(
            {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"},
            {3: "unknown", 4: "unknown"},
            id="names-do-not-match",
        ),
    ],
)
def test_activated_fds_are_only_those_meant_for_this_process(
    environ: dict[str, str], expected: dict[int, str]
) -> None:
    environ = {k: v.format(pid=os.getpid()) for k, v in environ.items()}
    assert take_activated_fds(environ) == expected
    assert environ == {}  # removed either way: the app's children must not see them


def test_activation_variables_that_are_not_numbers_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LISTEN_FDS='three'"):
        take_activated_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "three"})


def test_a_worker_is_activated_with_its_own_pid_and_the_same_names() -> None:
    environ = activation_environ(["web", "local"], 1234)
    assert environ == {"LISTEN_PID": "1234", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:local"}
    assert activation_environ([], 1234) == {}


# -- real processes: systemd-socket-activate and --reuse-port -------------------------------

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
# The app answers with its pid and what it sees of the activation variables.
ACTIVATION_APP = """
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{os.getpid()} {os.environ.get('LISTEN_FDS')} {os.environ.get('LISTEN_PID')}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get_unix(path: Path) -> tuple[int, bytes]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        response, body = await Client(stream).request("GET", "/", [("connection", "close")])
    return response.status_code, body


def socket_activate(port: int, path: Path) -> list[str]:
    return [
        SOCKET_ACTIVATE,
        f"--listen=127.0.0.1:{port}",
        f"--listen={path}",
        "--fdname=web:local",
        "--setenv=PYTHONUNBUFFERED=1",
    ]


@pytest.mark.parametrize("workers", [1, 2])
async def test_socket_activation_serves_every_passed_socket(tmp_path: Path, workers: int) -> None:
    (tmp_path / "activated.py").write_text(ACTIVATION_APP)
    port, path = free_port(), tmp_path / "activated.sock"
    args = ["--app-dir", str(tmp_path), "--workers", str(workers), "activated:app"]
    async with running_process(args, wrapper=socket_activate(port, path), cwd=tmp_path) as server:
        await server.wait_for(f"Listening on {re.escape(str(path))}")
        with trio.fail_after(20):
            # The first connection starts trioserve (systemd-socket-activate execs it in
            # place, so LISTEN_PID is its pid); it waits in the backlog meanwhile.
            answers = [await get(port), await get_unix(path)]
            answers += [await get(port) for _ in range(4)]
        for status, body in answers:
            _, listen_fds, listen_pid = body.decode().split()
            assert status == 200
            # The app's process never sees the variables (its children would not either).
            assert (listen_fds, listen_pid) == ("None", "None")
        pids = {int(body.split()[0]) for _, body in answers}
        if workers == 1:
            assert pids == {server.pid}
        else:
            assert server.pid not in pids
            assert pids <= set(server.started_pids())
        await server.wait_for(rf"Adopted socket-activated fd 3 \(web\): http://127.0.0.1:{port}")
        await server.wait_for(rf"Adopted socket-activated fd 4 \(local\): unix:{path}")
        assert "running on unix:" in server.stderr
        assert await server.stop() == 0
    assert "Traceback" not in server.stderr


async def test_socket_activation_with_reuse_port_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "activated.py").write_text(ACTIVATION_APP)
    port, path = free_port(), tmp_path / "activated.sock"
    args = ["--app-dir", str(tmp_path), "--reuse-port", "activated:app"]
    async with running_process(args, wrapper=socket_activate(port, path), cwd=tmp_path) as server:
        await server.wait_for(f"Listening on {re.escape(str(path))}")
        with socket.create_connection(("127.0.0.1", port)):  # starts trioserve
            assert await server.wait_exit() == 2
        await server.finish()
    assert (
        "Error: 2 socket(s) passed by socket activation (LISTEN_FDS): drop --reuse-port"
        in server.stderr.splitlines()
    )
    assert "Traceback" not in server.stderr


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (any address), from /proc/net/tcp."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:  # TCP_LISTEN
            inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                found.add(target[len("socket:[") : -1])
    return found


async def test_reuse_port_workers_each_bind_and_the_kernel_spreads_connections(
    tmp_path: Path,
) -> None:
    (tmp_path / "workerapp.py").write_text(WORKER_APP)
    port = free_port()
    args = ["--app-dir", str(tmp_path), "--port", str(port), "--workers", "2", "--reuse-port"]
    async with started_process([*args, "workerapp:app"], cwd=tmp_path) as server:
        workers = set(await server.wait_ready(2))
        listening = listening_inodes(port)
        assert len(listening) == 2  # one socket per worker
        assert not socket_inodes(server.pid) & listening  # the parent holds none
        for pid in workers:
            assert len(socket_inodes(pid) & listening) == 1
        answered: dict[int, int] = {}
        with trio.fail_after(20):
            for _ in range(100):  # new connections: the kernel hashes each to a socket
                status, body = await get(port)
                assert status == 200
                answered[int(body)] = answered.get(int(body), 0) + 1
        assert set(answered) == workers, answered
        assert await server.stop() == 0
