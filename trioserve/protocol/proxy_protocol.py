"""The PROXY protocol header, versions 1 and 2 (layer 2: pure, never trio).

HAProxy, AWS NLB, GCP and most TCP load balancers can prefix each connection with a header
naming the original client, before any application byte (and before a TLS handshake):

* v1 is one text line of at most 107 bytes (HAProxy's spec §2.1)::

      PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\\r\\n
      PROXY UNKNOWN\\r\\n

* v2 is binary (§2.2): the 12-byte signature ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``, a version/command
  byte (``0x21`` PROXY, ``0x20`` LOCAL), a family/transport byte, a 2-byte big-endian
  length, then the addresses and optional TLVs (ignored here).

:func:`parse_proxy_header` is fed the bytes received so far; it answers "need more",
a :class:`ProxyHeader`, or raises :class:`ProxyProtocolError`. When the sender declares
``LOCAL``/``UNKNOWN`` (health checks from the balancer itself) or a non-IP family, the
header is valid but names no client, and the socket's own peer stays in the scope.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

V1_PREFIX: Final = b"PROXY "
V1_MAX_LENGTH: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH: Final = 16
_V2_FAMILIES: Final = {0x1: (4, 12), 0x2: (16, 36)}  # AF_INET, AF_INET6: (addr size, block)


class ProxyProtocolError(ValueError):
    """The connection does not start with a valid PROXY protocol header (peer's fault)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header.

    Attributes:
        version: 1 or 2.
        client: the original client ``(host, port)``, or None (LOCAL, UNKNOWN, UNIX, ...).
        server: the address the client connected to, or None likewise.
        length: bytes the header occupied; application data starts right after.
    """

    version: int
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    length: int


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse the header at the start of ``data``.

    Returns:
        The header, or None if ``data`` is a valid beginning that needs more bytes.

    Raises:
        ProxyProtocolError: ``data`` cannot start a valid header (never any other error).
    """
    if data[:12] == V2_SIGNATURE[: len(data[:12])]:
        if len(data) < 12:
            # Could still be either version only if it is empty; "\r" cannot start v1.
            return None
        return _parse_v2(data)
    if data[:6] == V1_PREFIX[: len(data[:6])]:
        return _parse_v1(data) if len(data) >= 6 else None
    raise ProxyProtocolError("connection did not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError("PROXY v1 header longer than 107 bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("PROXY v1 header has a stray CR or LF")
        return None
    line = data[:end]
    length = end + 2
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 header is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # §2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(1, None, None, length)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 header {text[:60]!r}")
    version = 4 if parts[1] == "TCP4" else 6
    source = _v1_address(parts[2], version)
    destination = _v1_address(parts[3], version)
    source_port = _v1_port(parts[4])
    destination_port = _v1_port(parts[5])
    return ProxyHeader(1, (source, source_port), (destination, destination_port), length)


def _v1_address(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"bad address {text[:45]!r} in PROXY v1 header") from None
    if ip.version != version:
        raise ProxyProtocolError(f"address {text!r} does not match TCP{version}")
    return str(ip)


def _v1_port(text: str) -> int:
    # §2.1: ports are decimal 0..65535 without leading zeros.
    if (
        not text.isascii()
        or not text.isdigit()
        or len(text) > 5
        or (len(text) > 1 and text[0] == "0")
        or int(text) > 65535
    ):
        raise ProxyProtocolError(f"bad port {text[:8]!r} in PROXY v1 header")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_HEADER_LENGTH:
        return None
    version_command, family_transport, payload_length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"unsupported PROXY v2 version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyProtocolError(f"unsupported PROXY v2 command {command}")
    length = V2_HEADER_LENGTH + payload_length
    if len(data) < length:
        return None
    family = family_transport >> 4
    if command == 0 or family not in _V2_FAMILIES:
        # LOCAL (the balancer's own health check) or UNSPEC/UNIX: no client to report.
        if family > 3 or (family_transport & 0x0F) > 2:
            raise ProxyProtocolError(f"bad PROXY v2 family byte {family_transport:#04x}")
        return ProxyHeader(2, None, None, length)
    size, block = _V2_FAMILIES[family]
    if payload_length < block:
        raise ProxyProtocolError(
            f"PROXY v2 address block too short: {payload_length} < {block} bytes"
        )
    body = data[V2_HEADER_LENGTH : V2_HEADER_LENGTH + block]
    factory = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    source = str(factory(body[:size]))
    destination = str(factory(body[size : 2 * size]))
    source_port, destination_port = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(2, (source, source_port), (destination, destination_port), length)


def encode_v1(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """A v1 header (used by tests and by anyone chaining trioserve behind itself)."""
    family = "TCP6" if ":" in client[0] else "TCP4"
    return f"PROXY {family} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode("ascii")


def encode_v2(client: tuple[str, int] | None, server: tuple[str, int] | None) -> bytes:
    """A v2 PROXY header for TCP, or a LOCAL header when ``client`` is None."""
    if client is None or server is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    source = ipaddress.ip_address(client[0])
    destination = ipaddress.ip_address(server[0])
    family = 0x11 if source.version == 4 else 0x21
    block = source.packed + destination.packed + struct.pack("!HH", client[1], server[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block
