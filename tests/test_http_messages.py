"""Pure table tests of trioserve.protocol.http1_messages: no sockets, no trio (STYLE.md §2 Tests).

Requests are parsed by a real server-side parser, ``h11.Connection(h11.SERVER)`` and then
trioserve's httptools twin (fed whole and byte by byte); responses produced by
:class:`ResponseWriter` are parsed back by an ``h11.Connection(h11.CLIENT)`` so framing is
checked by an independent parser.
"""

from __future__ import annotations

from typing import Any

import conftest
import h11
import pytest

from trioserve.errors import AppProtocolError
from trioserve.protocol.http1_messages import (
    ResponseWriter,
    build_http_scope,
    check_request,
    error_response,
    head_has_obs_fold,
    is_websocket_upgrade,
)
from trioserve.protocol.http1_parser import HTTPParser, refusal, transfer_coding_problem
from trioserve.protocol.response_extensions import HTTP_EXTENSIONS
from trioserve.protocol.response_heads import MAX_CHECKED_FIELDS, MAX_KNOWN_SIZE, ResponseHeads
from trioserve.protocol.scope import ASGI_VERSION, split_target

pytestmark = pytest.mark.usefixtures("both_parsers")  # every test on h11 and httptools

DEFAULTS: tuple[tuple[bytes, bytes], ...] = ((b"server", b"trioserve"),)


def parse_request(raw: bytes, *, bytewise: bool = False) -> tuple[HTTPParser, h11.Request]:
    """Feed ``raw`` to a server-side parser (h11, then httptools) and return the Request."""
    conn = conftest.server_parser()
    pieces = [raw[i : i + 1] for i in range(len(raw))] if bytewise else [raw]
    for piece in pieces:
        conn.receive_data(piece)
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return conn, event
        assert event is h11.NEED_DATA
    raise AssertionError("no request in the sample")


def scope_for(raw: bytes, *, root_path: str = "", bytewise: bool = False) -> dict[str, Any]:
    _, request = parse_request(raw, bytewise=bytewise)
    scope: dict[str, Any] = build_http_scope(
        request,
        scheme="http",
        client=("1.2.3.4", 5678),
        server=("127.0.0.1", 8000),
        root_path=root_path,
        state={"db": "x"},
    )
    return scope


# -- scope building --------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    ("target", "path", "raw_path", "query"),
    [
        pytest.param(b"/", "/", b"/", b"", id="root"),
        pytest.param(b"/a/b", "/a/b", b"/a/b", b"", id="plain"),
        pytest.param(b"/a%20b", "/a b", b"/a%20b", b"", id="percent-space"),
        pytest.param(b"/caf%C3%A9", "/caf\u00e9", b"/caf%C3%A9", b"", id="percent-utf8"),
        pytest.param(
            b"/%E2%82%AC?x=%E2%82%AC",
            "/\u20ac",
            b"/%E2%82%AC",
            b"x=%E2%82%AC",
            id="query-stays-raw",
        ),
        pytest.param(b"/a%2Fb", "/a/b", b"/a%2Fb", b"", id="encoded-slash"),
        pytest.param(b"/a+b", "/a+b", b"/a+b", b"", id="plus-is-not-space"),
        pytest.param(b"/p?", "/p", b"/p", b"", id="empty-query"),
        pytest.param(b"/p?a=1&b=2&a=3", "/p", b"/p", b"a=1&b=2&a=3", id="query"),
        pytest.param(b"/p?a=?b", "/p", b"/p", b"a=?b", id="second-question-mark"),
        pytest.param(b"http://example.com/x/y?q=1", "/x/y", b"/x/y", b"q=1", id="absolute-form"),
        pytest.param(b"http://example.com", "/", b"/", b"", id="absolute-no-path"),
        pytest.param(b"http://example.com?q=1", "/", b"/", b"q=1", id="absolute-query-no-path"),
        pytest.param(b"https://h:8443/s?", "/s", b"/s", b"", id="absolute-https-port"),
        pytest.param(
            b"/r?next=http://e.com/z", "/r", b"/r", b"next=http://e.com/z", id="url-in-query"
        ),
        pytest.param(b"*", "*", b"*", b"", id="asterisk-form"),
    ],
)
def test_scope_path_raw_path_and_query(
    target: bytes, path: str, raw_path: bytes, query: bytes, bytewise: bool
) -> None:
    method = b"OPTIONS" if target == b"*" else b"GET"
    scope = scope_for(method + b" " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", bytewise=bytewise)
    assert scope["path"] == path
    assert scope["raw_path"] == raw_path
    assert scope["query_string"] == query
    assert isinstance(scope["raw_path"], bytes)
    assert isinstance(scope["query_string"], bytes)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a?b", (b"/a", b"b")),
        (b"/a", (b"/a", b"")),
        (b"http://h/a?b", (b"/a", b"b")),
        (b"http://h?b", (b"/", b"b")),
        (b"HTTP://h/", (b"/", b"")),
        (b"*", (b"*", b"")),
    ],
)
def test_split_target(target: bytes, expected: tuple[bytes, bytes]) -> None:
    assert split_target(target) == expected


def test_scope_invalid_utf8_percent_escape_does_not_raise() -> None:
    scope = scope_for(b"GET /%FF%FE HTTP/1.1\r\nHost: a\r\n\r\n")
    assert scope["raw_path"] == b"/%FF%FE"
    # Replaced, not surrogate-escaped: apps encode the path to UTF-8 (a JSON echo).
    assert scope["path"] == "/\ufffd\ufffd"
    assert scope["path"].encode("utf-8") == "/\ufffd\ufffd".encode()


@pytest.mark.parametrize(
    ("root_path", "target", "path", "raw_path"),
    [
        ("", b"/x", "/x", b"/x"),
        ("/api", b"/x", "/api/x", b"/api/x"),
        ("/api", b"/", "/api/", b"/api/"),
        ("/api", b"/a%20b?q", "/api/a b", b"/api/a%20b"),
    ],
)
def test_scope_root_path_prefixes_path(
    root_path: str, target: bytes, path: str, raw_path: bytes
) -> None:
    scope = scope_for(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", root_path=root_path)
    assert scope["root_path"] == root_path
    assert scope["path"] == path
    assert scope["raw_path"] == raw_path


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_scope_headers_lower_case_in_order_with_duplicates(bytewise: bool) -> None:
    raw = (
        b"POST /u HTTP/1.1\r\nHost: example.com\r\nX-Dup: 1\r\nContent-Type: text/plain\r\n"
        b"x-dup: 2\r\nCOOKIE: a=b\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n"
    )
    scope = scope_for(raw, bytewise=bytewise)
    assert scope["headers"] == [
        (b"host", b"example.com"),
        (b"x-dup", b"1"),
        (b"content-type", b"text/plain"),
        (b"x-dup", b"2"),
        (b"cookie", b"a=b"),
        (b"x-empty", b""),
        (b"content-length", b"0"),
    ]
    assert all(type(n) is bytes and type(v) is bytes for n, v in scope["headers"])


def test_scope_has_every_key_with_exact_values() -> None:
    scope = scope_for(b"PATCH /p?q=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert scope == {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "PATCH",
        "scheme": "http",
        "path": "/p",
        "raw_path": b"/p",
        "query_string": b"q=1",
        "root_path": "",
        "headers": [(b"host", b"a")],
        "client": ("1.2.3.4", 5678),
        "server": ("127.0.0.1", 8000),
        "state": {"db": "x"},
        "extensions": HTTP_EXTENSIONS,
    }
    assert ASGI_VERSION == {"version": "3.0", "spec_version": "2.4"}


def test_scope_http_10_and_state_is_a_copy() -> None:
    _, request = parse_request(b"GET / HTTP/1.0\r\n\r\n")
    state = {"k": 1}
    scope = build_http_scope(
        request, scheme="https", client=None, server=("/s.sock", None), root_path="", state=state
    )
    assert scope["http_version"] == "1.0"
    assert scope["scheme"] == "https"
    assert scope["client"] is None
    assert scope["server"] == ("/s.sock", None)
    scope["state"]["k"] = 2
    assert state == {"k": 1}
    no_state = build_http_scope(
        request, scheme="http", client=None, server=None, root_path="", state=None
    )
    assert "state" not in no_state


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"upgrade", b"websocket"), (b"connection", b"Upgrade")], True),
        ([(b"upgrade", b"WebSocket"), (b"connection", b"keep-alive, upgrade")], True),
        ([(b"upgrade", b"websocket")], False),
        ([(b"connection", b"upgrade")], False),
        ([(b"upgrade", b"h2c"), (b"connection", b"upgrade")], False),
    ],
)
def test_is_websocket_upgrade(headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    request = h11.Request(method="GET", target="/", headers=[(b"host", b"a"), *headers])
    assert is_websocket_upgrade(request) is expected


@pytest.mark.parametrize(
    ("method", "version"),
    [(b"POST", b"1.1"), (b"get", b"1.1"), (b"HEAD", b"1.1"), (b"GET", b"1.0")],
)
def test_is_websocket_upgrade_only_for_an_http11_get(method: bytes, version: bytes) -> None:
    # RFC 6455 §4.1: "The method of the request MUST be GET, and the HTTP version MUST be at
    # least 1.1" (methods are case-sensitive, RFC 9110 §9.1).
    headers = [(b"host", b"a"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
    request = h11.Request(method=method, target="/", headers=headers, http_version=version)
    assert is_websocket_upgrade(request) is False


# -- request checks (smuggling and size, beyond what h11 enforces) ------------------------


@pytest.mark.parametrize(
    ("values", "status"),
    [
        pytest.param([b"chunked"], None, id="chunked"),
        pytest.param([b"Chunked "], None, id="case-and-ows"),
        pytest.param([b"gzip, chunked"], 501, id="gzip-then-chunked"),
        pytest.param([b"gzip", b"chunked"], 501, id="two-fields-chunked-last"),
        pytest.param([b"chunked, gzip"], 400, id="chunked-not-final"),
        pytest.param([b"chunked", b"gzip"], 400, id="two-fields-chunked-first"),
        pytest.param([b"gzip"], 400, id="no-chunked"),
        pytest.param([b"chunked, chunked"], 400, id="chunked-twice"),
        pytest.param([b"chunked", b"chunked"], 400, id="chunked-twice-two-fields"),
        pytest.param([b"chunked,"], 400, id="empty-last-element"),
    ],
)
def test_transfer_coding_problem(values: list[bytes], status: int | None) -> None:
    # RFC 9112 §6.3 (400 and close when chunked is not final), §6.1 (501 for a coding we
    # cannot decode; chunked applied once at most).
    problem = transfer_coding_problem(values)
    assert (problem and problem[0]) == status


def test_refusal_judges_h11s_transfer_encoding_501_from_the_head() -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n"
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    with pytest.raises(h11.RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.error_status_hint == 501  # (h11's answer to any coding but chunked)
    assert refusal(info.value, head) == (400, "chunked is not the final transfer coding")
    # Without the head (the httptools parser judges codings itself), h11's own answer.
    assert refusal(info.value, b"") == (501, str(info.value))


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None, id="plain"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n", None, id="cl"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", None, id="te"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            id="cl-te",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 3\r\n\r\n",
            400,
            id="te-cl",
        ),
        pytest.param(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, id="te-in-http10"
        ),
        pytest.param(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, id="http2-version"),
        pytest.param(b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, id="http09-version"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 2000 + b"\r\n\r\n",
            431,
            id="head-too-large",
        ),
    ],
)
def test_check_request(raw: bytes, status: int | None) -> None:
    if conftest.HTTP_IMPL == "httptools" and b"Transfer-Encoding" in raw and b"Content-Len" in raw:
        # llhttp rejects CL with TE itself, with the status h11's path gives.
        with pytest.raises(h11.RemoteProtocolError) as info:
            parse_request(raw)
        assert info.value.error_status_hint == status
        return
    _, request = parse_request(raw)
    result = check_request(request, max_head_size=1024)
    if status is None:
        assert result is None
    else:
        assert result is not None
        assert result[0] == status
        assert isinstance(result[1], str)
        assert result[1]


@pytest.mark.parametrize(
    ("buffer", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\tc\r\n\r\n", True),
        (b"GET / HTTP/1.1\nHost: a\nX: b\n c\n\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n ", True),  # incomplete head, already folded
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n", False),  # incomplete, not (yet) folded
        # A fold-like pattern after the head (in the body or a later request) is not ours.
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n\n  x", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nX: b\r\n c\r\n\r\n", False),
    ],
)
def test_head_has_obs_fold(buffer: bytes, expected: bool) -> None:
    assert head_has_obs_fold(buffer) is expected


# -- ResponseWriter -------------------------------------------------------------------


def writer_for(
    raw: bytes = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", defaults: tuple[Any, ...] = DEFAULTS
) -> tuple[ResponseWriter, HTTPParser, h11.Connection]:
    """A writer answering ``raw``, plus a client connection that sent ``raw``."""
    conn, request = parse_request(raw)
    client = h11.Connection(h11.CLIENT)
    # Put the client in the matching state by sending the same request through it.
    client.send(
        h11.Request(
            method=request.method,
            target=request.target,
            headers=list(request.headers),
            http_version=request.http_version,
        )
    )
    if client.our_state is h11.SEND_BODY:
        client.send(h11.EndOfMessage())
    writer = ResponseWriter(conn, request.method, defaults)
    return writer, conn, client


def parse_response(client: h11.Connection, data: bytes) -> tuple[h11.Response, bytes, bool]:
    """Parse one response; returns (head, body, complete)."""
    client.receive_data(data)
    head = client.next_event()
    assert isinstance(head, h11.Response), head
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return head, body, True
        else:
            assert event is h11.NEED_DATA, event
            return head, body, False


def header_values(response: h11.Response, name: bytes) -> list[bytes]:
    return [v for k, v in response.headers if k == name]


def start(status: int = 200, headers: Any = ((b"content-type", b"text/plain"),)) -> Any:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def test_writer_single_shot_body_is_one_write_with_content_length() -> None:
    writer, conn, client = writer_for()
    writer.start(start())
    assert not writer.started
    data = writer.body({"type": "http.response.body", "body": b"hello"})
    assert writer.complete
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"\r\n\r\nhello")
    response, body, complete = parse_response(client, data)
    assert complete
    assert body == b"hello"
    assert header_values(response, b"content-length") == [b"5"]
    assert header_values(response, b"transfer-encoding") == []
    assert header_values(response, b"server") == [b"trioserve"]
    assert conn.our_state is h11.DONE


def test_writer_empty_single_shot_body_declares_zero_length() -> None:
    writer, _, client = writer_for()
    writer.start(start(headers=[]))
    data = writer.body({"type": "http.response.body"})
    response, body, complete = parse_response(client, data)
    assert (body, complete) == (b"", True)
    assert header_values(response, b"content-length") == [b"0"]


def test_writer_streamed_body_is_chunked_and_head_leaves_with_first_chunk() -> None:
    writer, _, client = writer_for()
    writer.start(start())
    first = writer.body({"type": "http.response.body", "body": b"ab", "more_body": True})
    assert writer.started
    assert not writer.complete
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert first.endswith(b"\r\n\r\n2\r\nab\r\n")
    empty = writer.body({"type": "http.response.body", "body": b"", "more_body": True})
    assert empty == b""
    rest = writer.body({"type": "http.response.body", "body": b"cde", "more_body": True})
    assert rest == b"3\r\ncde\r\n"
    last = writer.body({"type": "http.response.body", "body": b""})
    assert last == b"0\r\n\r\n"
    response, body, complete = parse_response(client, first + empty + rest + last)
    assert complete
    assert body == b"abcde"
    assert header_values(response, b"transfer-encoding") == [b"chunked"]
    assert header_values(response, b"content-length") == []


def test_writer_keeps_app_content_length_when_streaming() -> None:
    writer, _, client = writer_for()
    writer.start(start(headers=[(b"content-length", b"4")]))
    data = writer.body({"type": "http.response.body", "body": b"ab", "more_body": True})
    data += writer.body({"type": "http.response.body", "body": b"cd"})
    response, body, complete = parse_response(client, data)
    assert (body, complete) == (b"abcd", True)
    assert header_values(response, b"content-length") == [b"4"]
    assert header_values(response, b"transfer-encoding") == []


def test_writer_app_headers_win_over_defaults_and_keep_order() -> None:
    writer, _, client = writer_for()
    writer.start(start(headers=[(b"Server", b"mine"), (b"x-a", b"1"), (b"x-a", b"2")]))
    response, _, _ = parse_response(client, writer.body({"type": "http.response.body"}))
    assert header_values(response, b"server") == [b"mine"]
    assert header_values(response, b"x-a") == [b"1", b"2"]


def test_writer_close_flag_adds_connection_close() -> None:
    writer, conn, client = writer_for()
    writer.start(start(), close=True)
    response, _, _ = parse_response(client, writer.body({"type": "http.response.body"}))
    assert header_values(response, b"connection") == [b"close"]
    assert conn.our_state is h11.MUST_CLOSE


@pytest.mark.parametrize("more_body", [False, True], ids=["single", "streamed"])
def test_writer_head_request_gets_headers_but_no_body(more_body: bool) -> None:
    writer, _, client = writer_for(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    writer.start(start())
    data = writer.body({"type": "http.response.body", "body": b"hello", "more_body": more_body})
    if more_body:
        data += writer.body({"type": "http.response.body", "body": b"world"})
    assert data.endswith(b"\r\n\r\n")
    assert b"hello" not in data
    assert b"world" not in data
    response, body, complete = parse_response(client, data)
    assert (body, complete) == (b"", True)
    if not more_body:
        # RFC 9110 §9.3.2: the same header fields as GET, whose body would be 5 bytes.
        assert header_values(response, b"content-length") == [b"5"]


@pytest.mark.parametrize("status", [204, 304])
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_writer_204_304_drop_body_and_add_no_content_length(status: int, method: bytes) -> None:
    writer, _, client = writer_for(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    writer.start(start(status=status))
    data = writer.body({"type": "http.response.body", "body": b"ignored"})
    assert b"ignored" not in data
    response, body, complete = parse_response(client, data)
    assert response.status_code == status
    assert (body, complete) == (b"", True)
    assert header_values(response, b"content-length") == []
    assert header_values(response, b"transfer-encoding") == []


def test_writer_http10_streamed_response_is_close_delimited() -> None:
    conn, request = parse_request(b"GET / HTTP/1.0\r\n\r\n")
    writer = ResponseWriter(conn, request.method, DEFAULTS)
    writer.start(start())
    data = writer.body({"type": "http.response.body", "body": b"ab", "more_body": True})
    data += writer.body({"type": "http.response.body", "body": b"cd"})
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"\r\n\r\nabcd")
    assert b"chunked" not in data.lower()
    assert conn.our_state is h11.MUST_CLOSE


@pytest.mark.parametrize(
    ("status", "reason"),
    [(200, b"OK"), (404, b"Not Found"), (418, b"I'm a Teapot"), (599, b""), (299, b"")],
)
def test_writer_reason_phrase(status: int, reason: bytes) -> None:
    writer, _, client = writer_for()
    writer.start(start(status=status))
    response, _, _ = parse_response(client, writer.body({"type": "http.response.body"}))
    assert response.status_code == status
    assert response.reason == reason


BAD_STARTS = [
    pytest.param({"type": "http.response.start"}, id="no-status"),
    pytest.param({"type": "http.response.start", "status": "200"}, id="status-str"),
    pytest.param({"type": "http.response.start", "status": 200.0}, id="status-float"),
    pytest.param({"type": "http.response.start", "status": True}, id="status-bool"),
    pytest.param({"type": "http.response.start", "status": 99}, id="status-too-small"),
    pytest.param({"type": "http.response.start", "status": 101}, id="status-1xx"),
    pytest.param({"type": "http.response.start", "status": 1000}, id="status-too-large"),
    pytest.param(
        {"type": "http.response.start", "status": 200, "headers": [("a", "b")]}, id="header-str"
    ),
    pytest.param(
        {"type": "http.response.start", "status": 200, "headers": [(b"a", "b")]},
        id="header-value-str",
    ),
    pytest.param(
        {"type": "http.response.start", "status": 200, "headers": [(b"a", 1)]},
        id="header-value-int",
    ),
    pytest.param(
        {"type": "http.response.start", "status": 200, "headers": [(b"a",)]}, id="header-not-pair"
    ),
    pytest.param(
        {"type": "http.response.start", "status": 200, "headers": [b"ab"]}, id="header-bytes-item"
    ),
    pytest.param(
        {"type": "http.response.start", "status": 200, "headers": {b"a": b"b"}}, id="headers-dict"
    ),
    pytest.param(
        {"type": "http.response.start", "status": 200, "headers": b"a: b"}, id="headers-bytes"
    ),
    pytest.param({"type": "http.response.start", "status": 200, "headers": 5}, id="headers-int"),
]


@pytest.mark.parametrize("message", BAD_STARTS)
def test_writer_invalid_start_raises_app_protocol_error(message: dict[str, Any]) -> None:
    writer, conn, _ = writer_for()
    with pytest.raises(AppProtocolError):
        writer.start(message)
    assert not writer.started
    assert conn.our_state is h11.SEND_RESPONSE  # nothing reached h11: a 500 is still possible


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"x\r\ninjected", b"1")], id="crlf-in-name"),
        pytest.param([(b"x", b"a\r\nInjected: 1")], id="crlf-in-value"),
        pytest.param([(b"bad name", b"1")], id="space-in-name"),
        pytest.param([(b"x", b"\x00")], id="nul-in-value"),
        pytest.param([(b"content-length", b"abc")], id="bad-content-length"),
    ],
)
def test_writer_invalid_header_bytes_raise_before_anything_is_written(
    headers: list[tuple[bytes, bytes]],
) -> None:
    writer, conn, _ = writer_for()
    writer.start(start(headers=headers))
    with pytest.raises(AppProtocolError):
        writer.body({"type": "http.response.body", "body": b"x"})
    assert conn.our_state is h11.SEND_RESPONSE
    assert not writer.started
    # The server can still send its own 500.
    assert error_response(conn, 500, DEFAULTS).startswith(b"HTTP/1.1 500 ")


@pytest.mark.parametrize(
    "message",
    [
        pytest.param({"type": "http.response.body", "body": "text"}, id="body-str"),
        pytest.param({"type": "http.response.body", "body": None}, id="body-none"),
        pytest.param({"type": "http.response.body", "body": [1, 2]}, id="body-list"),
        pytest.param({"type": "http.response.body", "more_body": 1}, id="more-body-int"),
        pytest.param({"type": "http.response.body", "more_body": "yes"}, id="more-body-str"),
    ],
)
def test_writer_invalid_body_message_raises(message: dict[str, Any]) -> None:
    writer, _, _ = writer_for()
    writer.start(start())
    with pytest.raises(AppProtocolError):
        writer.body(message)


def test_writer_body_types_bytearray_and_memoryview_accepted() -> None:
    writer, _, client = writer_for()
    writer.start(start())
    data = writer.body({"type": "http.response.body", "body": bytearray(b"ab"), "more_body": True})
    data += writer.body({"type": "http.response.body", "body": memoryview(b"cd")})
    _, body, complete = parse_response(client, data)
    assert (body, complete) == (b"abcd", True)


def test_writer_out_of_order_messages_raise() -> None:
    writer, _, _ = writer_for()
    with pytest.raises(AppProtocolError, match="before"):
        writer.body({"type": "http.response.body", "body": b"x"})
    writer.start(start())
    with pytest.raises(AppProtocolError, match="twice"):
        writer.start(start())
    writer.body({"type": "http.response.body", "body": b"x"})
    with pytest.raises(AppProtocolError, match="after"):
        writer.body({"type": "http.response.body", "body": b"y"})
    with pytest.raises(AppProtocolError):
        writer.start(start())


@pytest.mark.parametrize(
    ("declared", "bodies"),
    [
        pytest.param(b"2", [(b"abc", False)], id="too-long-single"),
        pytest.param(b"5", [(b"abc", False)], id="too-short-single"),
        pytest.param(b"3", [(b"ab", True), (b"cd", False)], id="too-long-streamed"),
        pytest.param(b"5", [(b"ab", True), (b"", False)], id="too-short-streamed"),
    ],
)
def test_writer_body_contradicting_content_length_raises(
    declared: bytes, bodies: list[tuple[bytes, bool]]
) -> None:
    writer, _, _ = writer_for()
    writer.start(start(headers=[(b"content-length", declared)]))
    *first, (last_body, last_more) = bodies
    for body, more in first:
        writer.body({"type": "http.response.body", "body": body, "more_body": more})
    with pytest.raises(AppProtocolError):
        writer.body({"type": "http.response.body", "body": last_body, "more_body": last_more})


def test_response_heads_check_each_distinct_field_list_once() -> None:
    heads = ResponseHeads()
    first = heads.fields_of([(b"content-type", b"text/plain")])
    assert heads.fields_of([(b"content-type", b"text/plain")]) is first  # a new, equal list
    assert heads.fields_of(((b"content-type", b"text/plain"),)) is first
    assert heads.fields_of(None) is heads.fields_of([])
    # Pairs that are lists cannot be looked up: checked every time, and still accepted.
    listed = heads.fields_of([[b"x-a", b"1"]])
    assert listed.fields == ((b"x-a", b"1"),)
    assert heads.fields_of([[b"x-a", b"1"]]) is not listed
    # What fails is never remembered as checked.
    for _ in range(2):
        with pytest.raises(AppProtocolError):
            heads.fields_of([(b"x-a", "1")])
    # The app's invalid bytes are refused whenever they are sent, not only the first time.
    bad = heads.fields_of([(b"x-a", b"1\r\nInjected: 1")])
    for _ in range(2):
        with pytest.raises(AppProtocolError):
            heads.lines(bad, DEFAULTS)


def test_response_heads_stay_bounded() -> None:
    heads = ResponseHeads()
    for n in range(MAX_CHECKED_FIELDS * 3):
        fields = heads.fields_of([(b"content-length", b"%d" % n)])
        assert heads.lines(fields, DEFAULTS) == b"content-length: %d\r\nserver: trioserve\r\n" % n
    assert len(heads._known) <= MAX_CHECKED_FIELDS
    assert len(heads.checked) <= MAX_CHECKED_FIELDS
    # A large list is checked every time rather than kept.
    large = [(b"set-cookie", b"x" * MAX_KNOWN_SIZE)]
    assert heads.fields_of(large) is not heads.fields_of(large)
    assert heads.fields_of(large).fields == tuple(large)


@pytest.mark.parametrize(
    ("fields", "defaults"),
    [
        pytest.param([(b"transfer-encoding", b"chunked")], DEFAULTS, id="chunked"),
        pytest.param([(b"connection", b"close")], DEFAULTS, id="connection"),
        pytest.param([(b"host", b"h")], DEFAULTS, id="host"),
        pytest.param([(b"content-length", b"1"), (b"content-length", b"1")], DEFAULTS, id="2xCL"),
        pytest.param([(b"Server", b"mine")], DEFAULTS, id="default-overridden"),
        pytest.param([], ((b"connection", b"x"),), id="framing-default"),
    ],
)
def test_response_heads_leave_what_framing_rules_change_to_the_parser(
    fields: list[tuple[bytes, bytes]], defaults: tuple[tuple[bytes, bytes], ...]
) -> None:
    heads = ResponseHeads()
    assert heads.lines(heads.fields_of(fields), defaults) is None


# -- error_response -------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 413, 431, 500, 501, 503, 505])
def test_error_response_is_plain_text_and_closes(status: int) -> None:
    conn, _ = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    data = error_response(conn, status, DEFAULTS)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
    client.send(h11.EndOfMessage())
    response, body, complete = parse_response(client, data)
    assert response.status_code == status
    assert complete
    assert body == response.reason + b"\n"
    assert response.reason
    assert header_values(response, b"connection") == [b"close"]
    assert header_values(response, b"content-type") == [b"text/plain; charset=utf-8"]
    assert header_values(response, b"server") == [b"trioserve"]
    assert conn.our_state is h11.MUST_CLOSE
    assert b"Traceback" not in data


def test_error_response_to_head_has_no_body() -> None:
    conn, _ = parse_request(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    data = error_response(conn, 500, (), method=b"HEAD")
    assert data.endswith(b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")


def test_error_response_after_a_remote_protocol_error() -> None:
    conn = conftest.server_parser()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError) as info:
        conn.next_event()
    data = error_response(conn, info.value.error_status_hint, ())
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close\r\n" in data


def test_error_response_is_empty_once_the_head_left() -> None:
    writer, conn, _ = writer_for()
    writer.start(start())
    writer.body({"type": "http.response.body", "body": b"a", "more_body": True})
    assert error_response(conn, 500, DEFAULTS) == b""


@pytest.mark.parametrize(
    ("raw", "max_body_size", "status"),
    [
        pytest.param(b"Content-Length: 1000\r\n", 1000, None, id="at-the-limit"),
        pytest.param(b"Content-Length: 1001\r\n", 1000, 413, id="over-the-limit"),
        pytest.param(b"Content-Length: 99999999999999\r\n", 0, None, id="no-limit"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", 1, None, id="chunked-counted-later"),
        pytest.param(b"", 1, None, id="no-body"),
    ],
)
def test_check_request_refuses_a_content_length_over_max_body_size(
    raw: bytes, max_body_size: int, status: int | None
) -> None:
    _, request = parse_request(b"POST / HTTP/1.1\r\nHost: a\r\n" + raw + b"\r\n")
    result = check_request(request, max_head_size=1024, max_body_size=max_body_size)
    assert (result and result[0]) == status
    if result is not None:
        assert "1001" in result[1]
        assert "1000" in result[1]
