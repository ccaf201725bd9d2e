"""WebSocket echo load client for the ``ws`` scenario (bench-only).

Opens ``--conns`` connections, each keeping one small text message in flight, and counts
echoed round trips for ``--duration`` seconds. Written on plain non-blocking sockets and
epoll (Linux) so the client stays cheap next to the server it measures; frames are built
by hand (RFC 6455 §5.2: client frames masked, server frames not) and every echo is
compared byte for byte with the expected frame. Prints one JSON line:
``{"messages": N, "seconds": S, "rate": N/S, "errors": E, "p50_ms": ..., "p99_ms": ...}``.

Usage: python bench/ws_load.py --port 8000 [--conns 50] [--duration 3] [--messages N]

``--messages N`` stops once N echoes have come back (and sends no more than N): a fixed
amount of work, for counting the server's instructions per message under callgrind.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import socket
import statistics
import time

PAYLOAD = b"Hello, websocket!"
MASK = b"\x11\x22\x33\x44"


def client_frame(payload: bytes) -> bytes:
    """A masked, final text frame (payloads < 126 bytes)."""
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + MASK + masked


def server_frame(payload: bytes) -> bytes:
    """The unmasked final text frame a server echoes back."""
    return bytes([0x81, len(payload)]) + payload


def handshake(port: int, path: str, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            raise ConnectionError("server closed during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(f"handshake refused: {head.splitlines()[0]!r}")
    if rest:
        sock.close()
        raise ConnectionError("unexpected bytes after the handshake")
    return sock


def run(
    port: int, conns: int, duration: float, path: str = "/", limit: int = 0
) -> dict[str, float]:
    out_frame = client_frame(PAYLOAD)
    expected = server_frame(PAYLOAD)
    size = len(expected)
    socks = [handshake(port, path, 10.0) for _ in range(conns)]
    poller = select.epoll()
    by_fd: dict[int, socket.socket] = {}
    buffers: dict[int, bytes] = {}
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    errors = 0
    messages = 0
    sent = 0
    limit = limit or -1  # (no limit: -1 is never reached)
    try:
        for sock in socks:
            sock.setblocking(False)
            fd = sock.fileno()
            by_fd[fd] = sock
            buffers[fd] = b""
            poller.register(fd, select.EPOLLIN)
        start = time.perf_counter()
        end = start + duration
        for fd, sock in by_fd.items():
            if sent == limit:
                break
            sent_at[fd] = time.perf_counter()
            sock.send(out_frame)
            sent += 1
        now = start
        while now < end and by_fd and messages + errors != limit:
            for fd, _ in poller.poll(0.1):
                sock = by_fd[fd]
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    errors += 1
                    poller.unregister(fd)
                    del by_fd[fd]
                    sock.close()
                    continue
                buf = buffers[fd] + chunk
                if len(buf) < size:
                    buffers[fd] = buf
                    continue
                now = time.perf_counter()
                if buf != expected:
                    errors += 1
                else:
                    messages += 1
                    latencies.append(now - sent_at[fd])
                buffers[fd] = b""
                if sent == limit:
                    continue
                sent_at[fd] = now
                sock.send(out_frame)
                sent += 1
            now = time.perf_counter()
        elapsed = time.perf_counter() - start
    finally:
        poller.close()
        close = bytes([0x88, 0x82]) + MASK + bytes(b ^ MASK[i] for i, b in enumerate(b"\x03\xe8"))
        for sock in socks:
            try:
                sock.setblocking(True)
                sock.settimeout(0.05)
                sock.send(close)
            except OSError:
                pass
            sock.close()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000 if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if len(latencies) >= 100 else p50
    return {
        "messages": messages,
        "seconds": elapsed,
        "rate": messages / elapsed if elapsed else 0.0,
        "errors": errors,
        "p50_ms": p50,
        "p99_ms": p99,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--path", default="/")
    parser.add_argument("--messages", type=int, default=0, help="stop after N echoes")
    args = parser.parse_args()
    print(json.dumps(run(args.port, args.conns, args.duration, args.path, args.messages)))


if __name__ == "__main__":
    main()
