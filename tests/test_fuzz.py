"""Invariant fuzzing (h11's written invariant, STYLE.md §2 Tests).

Whatever bytes a client sends, in whatever pieces: the server never crashes or logs an
internal error, never answers 500 (the only 5xx it may send are the ones the RFCs
prescribe for the input: 501 for an unknown transfer coding, 505 for an unsupported HTTP
version), never hangs (everything runs under ``trio.fail_after``), and the next client is
served normally.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h11
import pytest
import trio
import trio.testing
from conftest import hello_app, run_server
from hypothesis import given, settings
from hypothesis import strategies as st
from wire import Client, connect, read_until_eof

from trioserve.errors import AppProtocolError
from trioserve.protocol.http1_messages import (
    build_http_scope,
    check_request,
    head_has_obs_fold,
)
from trioserve.protocol.response_heads import check_fields

pytestmark = pytest.mark.usefixtures("both_parsers")  # every test on h11 and httptools

FRAGMENTS = [
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"OPTIONS ",
    b"/",
    b"/a%20b?c=d",
    b"*",
    b"http://h/p",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b" HTTP/2.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"Host: t\r\n",
    b"Content-Length: ",
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
    b"0",
    b"5",
    b"ff",
    b"-1",
    b";x=y",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b":",
    b"hello",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
]
VALID = b"GET /v HTTP/1.1\r\nHost: t\r\n\r\n"
ALLOWED_5XX = {501, 505}
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")

http_like = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=16)), max_size=60
).map(b"".join)
payloads = st.one_of(st.binary(max_size=2048), http_like)


async def reading_app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body, answers a fixed text (never echoes input)."""
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            break
    await hello_app(scope, receive, send)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def server_errors() -> Iterator[list[logging.LogRecord]]:
    handler = _Errors()
    logger = logging.getLogger("trioserve")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    last = 0
    for point in [*points, len(data)]:
        if point > last:
            pieces.append(data[last:point])
            last = point
    return pieces


async def exchange(server: Any, pieces: list[bytes]) -> bytes:
    async with await connect(server.addresses[0]) as stream:
        for piece in pieces:
            try:
                await stream.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            await trio.testing.wait_all_tasks_blocked()
        try:
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return await read_until_eof(stream)


@settings(max_examples=50, deadline=None)
@given(
    payload=payloads,
    prefix_valid=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4096), max_size=8),
)
async def test_random_bytes_never_crash_or_5xx_and_next_client_is_served(
    payload: bytes, prefix_valid: bool, cuts: list[int]
) -> None:
    data = (VALID if prefix_valid else b"") + payload
    with server_errors() as errors, trio.fail_after(10):
        async with run_server(
            reading_app, ws="none", timeout_keep_alive=1, timeout_request_header=1
        ) as server:
            answer = await exchange(server, split(data, cuts))
            statuses = [int(m.group(1)) for m in STATUS_LINE.finditer(answer)]
            if answer:
                assert answer.startswith(b"HTTP/1.1 "), answer[:100]
            assert not [s for s in statuses if s >= 500 and s not in ALLOWED_5XX], answer[:300]
            if prefix_valid:
                assert statuses[:1] == [200]
            async with await connect(server.addresses[0]) as stream:
                response, body = await Client(stream).request("GET", "/next")
            assert (response.status_code, body) == (200, b"Hello, world!")
    assert errors == []


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(st.binary(max_size=512), http_like), root_path=st.sampled_from(["", "/r"]))
def test_pure_request_functions_never_raise_on_what_h11_accepts(raw: bytes, root_path: str) -> None:
    conn = h11.Connection(h11.SERVER)
    assert isinstance(head_has_obs_fold(raw), bool)
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return
    if not isinstance(event, h11.Request):
        return
    problem = check_request(event, max_head_size=16384)
    assert problem is None or problem[0] in (400, 431, 505)
    scope = build_http_scope(
        event, scheme="http", client=None, server=None, root_path=root_path, state=None
    )
    assert scope["raw_path"].startswith(root_path.encode())
    assert scope["path"].startswith(root_path)
    assert isinstance(scope["query_string"], bytes)


# Response header fields: trioserve checks them itself (and tells h11 they are clean), so
# its check must accept exactly what h11's would.
_FIELD_BYTES = st.binary(max_size=12) | st.sampled_from(
    [b"", b"x", b" x", b"x ", b"a b", b"a\tb", b"a\r\nb", b"a\x00", b"\x80\xff", b"a\x0bb", b"\x7f"]
)


def _h11_accepts(name: bytes, value: bytes) -> bool:
    try:
        h11.Response(status_code=200, headers=[(name, value)])
    except h11.LocalProtocolError:
        return False
    return True


@settings(max_examples=2000, deadline=None)
@given(name=_FIELD_BYTES, value=_FIELD_BYTES)
def test_response_field_check_matches_h11(name: bytes, value: bytes) -> None:
    checked: set[tuple[bytes, bytes]] = set()
    try:
        check_fields([(name, value)], checked)
    except AppProtocolError:
        ours = False
    else:
        ours = True
    if name.lower() in (b"content-length", b"transfer-encoding"):
        return  # (h11 also checks these framing headers' values; it still does for us)
    assert ours == _h11_accepts(name, value)
    assert ((name, value) in checked) == ours
