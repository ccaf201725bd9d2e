"""PROXY protocol v1/v2: parser tables (whole, byte by byte, with trailing data), fuzz, wire."""

from __future__ import annotations

import json
import logging
import struct
from typing import Any

import pytest
import trio
from conftest import run_server
from hypothesis import given
from hypothesis import strategies as st
from wire import Client, connect, read_until_eof

from trioserve.protocol.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

V2_TCP4 = encode_v2(("203.0.113.7", 56324), ("10.0.0.1", 443))
V2_TCP6 = encode_v2(("2001:db8::7", 1), ("2001:db8::1", 8443))
V2_WITH_TLV = (
    V2_SIGNATURE
    + bytes([0x21, 0x11])
    + struct.pack("!H", 12 + 7)
    + bytes([198, 51, 100, 1, 10, 0, 0, 1])
    + struct.pack("!HH", 5000, 80)
    + b"\x04\x00\x04abcd"  # a PP2_TYPE_NOOP TLV: ignored
)

VALID = [
    pytest.param(
        b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n",
        ProxyHeader(1, ("203.0.113.7", 56324), ("10.0.0.1", 443), 43),
        id="v1-tcp4",
    ),
    pytest.param(
        b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n",
        ProxyHeader(1, ("2001:db8::7", 1), ("2001:db8::1", 65535), 44),
        id="v1-tcp6",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None, 15), id="v1-unknown"),
    pytest.param(
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ProxyHeader(1, None, None, 35),
        id="v1-unknown-with-addresses",
    ),
    pytest.param(
        V2_TCP4, ProxyHeader(2, ("203.0.113.7", 56324), ("10.0.0.1", 443), 28), id="v2-tcp4"
    ),
    pytest.param(
        V2_TCP6, ProxyHeader(2, ("2001:db8::7", 1), ("2001:db8::1", 8443), 52), id="v2-tcp6"
    ),
    pytest.param(
        V2_WITH_TLV, ProxyHeader(2, ("198.51.100.1", 5000), ("10.0.0.1", 80), 35), id="v2-tlv"
    ),
    pytest.param(encode_v2(None, None), ProxyHeader(2, None, None, 16), id="v2-local"),
    pytest.param(
        V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216),
        ProxyHeader(2, None, None, 232),
        id="v2-unix",
    ),
    pytest.param(
        V2_SIGNATURE + bytes([0x21, 0x00, 0, 0]), ProxyHeader(2, None, None, 16), id="v2-unspec"
    ),
]


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_valid_header_whole_and_with_trailing_data(raw: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(raw) == expected
    assert parse_proxy_header(raw + b"GET / HTTP/1.1\r\n\r\n") == expected


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_valid_header_fed_byte_by_byte_needs_data_until_complete(
    raw: bytes, expected: ProxyHeader
) -> None:
    for end in range(len(raw)):
        assert parse_proxy_header(raw[:end]) is None, end
    assert parse_proxy_header(raw) == expected


INVALID = [
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="plain-http"),
    pytest.param(b"\x16\x03\x01\x02\x00", id="tls-client-hello"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", id="v1-extra-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", id="v1-missing-field"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", id="v1-bad-family"),
    pytest.param(b"PROXY TCP4 ::1 ::1 1 2\r\n", id="v1-family-mismatch"),
    pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", id="v1-bad-ip"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", id="v1-leading-zero-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", id="v1-port-range"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", id="v1-negative-port"),
    pytest.param(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", id="v1-double-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", id="v1-bare-lf"),
    pytest.param(b"PROXY " + b"A" * 120, id="v1-too-long"),
    pytest.param(b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n", id="v1-not-ascii"),
    pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="v1-lower-case"),
    pytest.param(V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12), id="v2-version-1"),
    pytest.param(V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12), id="v2-bad-command"),
    pytest.param(V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4), id="v2-short-inet"),
    pytest.param(V2_SIGNATURE + bytes([0x21, 0x21, 0, 12]) + bytes(12), id="v2-short-inet6"),
    pytest.param(V2_SIGNATURE + bytes([0x21, 0x51, 0, 0]), id="v2-bad-family"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00", id="v2-bad-signature"),
]


@pytest.mark.parametrize("raw", INVALID)
def test_invalid_header_raises_proxy_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(raw)


@given(st.binary(max_size=300))
def test_parser_never_crashes_on_random_bytes(raw: bytes) -> None:
    try:
        header = parse_proxy_header(raw)
    except ProxyProtocolError:
        return
    if header is not None:
        assert 0 < header.length <= len(raw)


@given(
    st.sampled_from([b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", V2_TCP4, V2_TCP6]),
    st.integers(min_value=0),
    st.integers(min_value=0, max_value=255),
)
def test_parser_never_crashes_on_mutated_headers(raw: bytes, where: int, value: int) -> None:
    mutated = bytearray(raw)
    mutated[where % len(raw)] = value
    try:
        parse_proxy_header(bytes(mutated))
    except ProxyProtocolError:
        pass


def test_encode_v1_round_trips() -> None:
    raw = encode_v1(("2001:db8::7", 1234), ("::1", 80))
    assert parse_proxy_header(raw) == ProxyHeader(1, ("2001:db8::7", 1234), ("::1", 80), len(raw))


# -- on the wire ---------------------------------------------------------------------------------


async def scope_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = json.dumps({"client": scope["client"], "server": scope["server"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n", id="v1"),
        pytest.param(V2_TCP4, id="v2"),
    ],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "two-writes"])
async def test_client_address_comes_from_the_proxy_header(header: bytes, split: bool) -> None:
    async with run_server(scope_app, proxy_protocol=True) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            if split:
                await stream.send_all(header[:7])
                await trio.testing.wait_all_tasks_blocked()
                await stream.send_all(header[7:])
                await stream.send_all(REQUEST)
            else:
                await stream.send_all(header + REQUEST)
            response = await read_until_eof(stream)
    assert response.startswith(b"HTTP/1.1 200 ")
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body == {"client": ["203.0.113.7", 56324], "server": ["10.0.0.1", 443]}


async def test_local_header_keeps_the_socket_peer() -> None:
    async with run_server(scope_app, proxy_protocol=True) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await stream.send_all(encode_v2(None, None) + REQUEST)
            response = await read_until_eof(stream)
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["client"][0] == "127.0.0.1"


async def test_connection_without_valid_header_is_closed_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    async with run_server(scope_app, proxy_protocol=True) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await stream.send_all(REQUEST)
            assert await read_until_eof(stream) == b""
        # ...and the next, valid client is served normally.
        stream = await connect(server.addresses[0])
        async with stream:
            await stream.send_all(encode_v1(("198.51.100.2", 7), ("127.0.0.1", 1)) + REQUEST)
            assert (await read_until_eof(stream)).startswith(b"HTTP/1.1 200 ")
    assert "did not start with a PROXY protocol header" in caplog.text


async def test_silent_connection_is_closed_after_the_header_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    async with run_server(scope_app, proxy_protocol=True, timeout_request_header=3.0) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            start = trio.current_time()
            await stream.send_all(b"PROXY TCP4 ")
            assert await read_until_eof(stream) == b""
            assert 3.0 <= trio.current_time() - start < 4.0
    assert "timed out" in caplog.text


async def test_trust_for_proxy_headers_uses_the_reported_client() -> None:
    """The balancer passes HTTP through untouched, so X-Forwarded-For from the reported
    (untrusted) client must not be believed."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(scope["client"]).encode()})

    async with run_server(app, proxy_protocol=True) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await stream.send_all(encode_v1(("198.51.100.2", 7), ("127.0.0.1", 1)))
            _, body = await Client(stream).request(headers=[("x-forwarded-for", "6.6.6.6")])
        assert json.loads(body) == ["198.51.100.2", 7]
