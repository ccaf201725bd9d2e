"""Trusted proxies and forwarding headers: pure tables, fuzz, and the scope on the wire."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import run_server
from hypothesis import given
from hypothesis import strategies as st
from wire import Client, connect

from trioserve import Config
from trioserve.errors import ConfigError
from trioserve.protocol.proxy_headers import (
    TrustedHosts,
    parse_forwarded,
    parse_node,
    resolve_forwarded,
)
from trioserve.protocol.scope import apply_proxy_headers

# -- trusted hosts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "host", "trusted"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("127.0.0.1", None, False),
        ("10.0.0.0/8", "10.200.3.4", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("10.1.2.3/8", "10.9.9.9", True),  # host bits are tolerated (strict=False)
        ("fd00::/8", "fd12::1", True),
        ("fd00::/8", "fe80::1", False),
        ("::1", "::1", True),
        ("127.0.0.1", "::ffff:127.0.0.1", True),  # dual-stack socket view of an IPv4 peer
        ("*", "203.0.113.9", True),
        ("*", None, True),
        ("unix:", None, True),
        ("unix:", "127.0.0.1", False),
        ("127.0.0.1, unix:", None, True),
        (" 192.168.0.0/16 , 127.0.0.1 ", "192.168.7.7", True),
        ("127.0.0.1", "not-an-ip", False),
        ("", "127.0.0.1", False),
    ],
)
def test_trusted_hosts_table(spec: str, host: str | None, trusted: bool) -> None:
    assert TrustedHosts(spec).trusts_peer(host) is trusted


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "1.2.3", "unix", "10.0.0.0/8/1"])
def test_invalid_forwarded_allow_ips_is_a_clear_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"forwarded_allow_ips: '.*' is not an IP address"):
        Config(forwarded_allow_ips=f"127.0.0.1,{bad}")
    with pytest.raises(ValueError, match="is not an IP address"):
        TrustedHosts(bad)


def test_forwarded_allow_ips_env_var_is_read_by_the_cli() -> None:
    from trioserve.cli import main

    option = next(p for p in main.params if p.name == "forwarded_allow_ips")
    assert "FORWARDED_ALLOW_IPS" in (option.envvar or ())


# -- node and Forwarded syntax ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", ("1.2.3.4", 0)),
        (" 1.2.3.4 ", ("1.2.3.4", 0)),
        ("1.2.3.4:8080", ("1.2.3.4", 8080)),
        ("::1", ("::1", 0)),
        ("2001:db8::1", ("2001:db8::1", 0)),
        ("[2001:db8::1]", ("2001:db8::1", 0)),
        ("[2001:db8::1]:4711", ("2001:db8::1", 4711)),
        ("unknown", None),
        ("_hidden", None),
        ("1.2.3.4:_port", None),
        ("1.2.3.4:99999", None),
        ("[1.2.3.4]", None),
        ("[::1", None),
        ("[::1]x", None),
        ("", None),
        ("1.2.3.4.5", None),
        ("\uff11.\uff12.\uff13.\uff14", None),  # full-width digits
    ],
)
def test_parse_node_table(text: str, expected: tuple[str, int] | None) -> None:
    node = parse_node(text)
    assert (None if node is None else (str(node[0]), node[1])) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["for=192.0.2.43"], [{"for": "192.0.2.43"}]),
        (['For="[2001:db8:cafe::17]:4711"'], [{"for": "[2001:db8:cafe::17]:4711"}]),
        (
            ["for=192.0.2.60;proto=http;by=203.0.113.43"],
            [{"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}],
        ),
        (["for=192.0.2.43, for=198.51.100.17"], [{"for": "192.0.2.43"}, {"for": "198.51.100.17"}]),
        (
            ["for=192.0.2.43", "for=198.51.100.17"],
            [{"for": "192.0.2.43"}, {"for": "198.51.100.17"}],
        ),
        (['for="a\\"b;,c"'], [{"for": 'a"b;,c'}]),
        (["for=1.2.3.4 ; proto=https"], [{"for": "1.2.3.4", "proto": "https"}]),
        ([""], []),
        (["for"], None),
        (["for=1.2.3.4;for=5.6.7.8"], None),  # a parameter twice in one element
        (['for="unterminated'], None),
        (["for=;proto=http"], None),
        (["=1.2.3.4"], None),
        (["for=1.2.3.4 proto=http"], None),
    ],
)
def test_parse_forwarded_table(values: list[str], expected: list[dict[str, str]] | None) -> None:
    assert parse_forwarded(values) == expected


# -- resolving the client ----------------------------------------------------------------------

PROXIES = TrustedHosts("127.0.0.1, 10.0.0.0/8")


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


RESOLVE_CASES = [
    pytest.param(h(("x-forwarded-for", "203.0.113.7")), ("203.0.113.7", 0), None, id="one-hop"),
    pytest.param(
        h(("x-forwarded-for", "203.0.113.7, 10.0.0.2, 10.0.0.3")),
        ("203.0.113.7", 0),
        None,
        id="skip-trusted-proxies",
    ),
    pytest.param(
        h(("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.2")),
        ("203.0.113.7", 0),
        None,
        id="spoofed-left-part-ignored",
    ),
    pytest.param(
        h(("x-forwarded-for", "10.0.0.5, 10.0.0.2")),
        ("10.0.0.5", 0),
        None,
        id="all-trusted-leftmost",
    ),
    pytest.param(
        h(("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "203.0.113.7")),
        ("203.0.113.7", 0),
        None,
        id="repeated-header-joined",
    ),
    pytest.param(
        h(("x-forwarded-for", "garbage, 10.0.0.2")),
        ("10.0.0.2", 0),
        None,
        id="unparsable-hop-stops-walk",
    ),
    pytest.param(
        h(("x-forwarded-for", "10.0.0.2, garbage")),
        None,
        None,
        id="unparsable-rightmost-ignored",
    ),
    pytest.param(h(("x-forwarded-for", "")), None, None, id="empty"),
    pytest.param(
        h(("x-forwarded-for", "[2001:db8::1]:4711")),
        ("2001:db8::1", 4711),
        None,
        id="ipv6-with-port",
    ),
    pytest.param(h(("x-forwarded-proto", "https")), None, "https", id="proto-only"),
    pytest.param(h(("x-forwarded-proto", "HTTPS ")), None, "https", id="proto-case"),
    pytest.param(h(("x-forwarded-proto", "gopher")), None, None, id="proto-unknown"),
    pytest.param(
        h(("x-forwarded-for", "203.0.113.7, 10.0.0.2"), ("x-forwarded-proto", "https, http")),
        ("203.0.113.7", 0),
        "https",
        id="proto-per-hop",
    ),
    pytest.param(
        h(("x-forwarded-for", "203.0.113.7, 10.0.0.2"), ("x-forwarded-proto", "wss")),
        ("203.0.113.7", 0),
        "wss",
        id="proto-single-value",
    ),
    pytest.param(
        h(("forwarded", 'for=203.0.113.7;proto=https, for="10.0.0.2:80"')),
        ("203.0.113.7", 0),
        "https",
        id="forwarded",
    ),
    pytest.param(
        h(("forwarded", "for=10.0.0.9;proto=https, for=10.0.0.2;proto=http")),
        ("10.0.0.9", 0),
        "https",
        id="forwarded-all-trusted",
    ),
    pytest.param(
        h(("forwarded", "for=unknown;proto=https")), None, "https", id="forwarded-unknown"
    ),
    pytest.param(
        h(("forwarded", "for=203.0.113.7"), ("x-forwarded-for", "198.51.100.1")),
        ("203.0.113.7", 0),
        None,
        id="forwarded-wins",
    ),
    pytest.param(
        h(("forwarded", 'for="broken'), ("x-forwarded-for", "198.51.100.1")),
        ("198.51.100.1", 0),
        None,
        id="malformed-forwarded-falls-back",
    ),
    pytest.param(h(("host", "example.com")), None, None, id="no-headers"),
]


@pytest.mark.parametrize(("headers", "client", "scheme"), RESOLVE_CASES)
def test_resolve_forwarded_table(
    headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None, scheme: str | None
) -> None:
    assert resolve_forwarded(headers, PROXIES) == (client, scheme)


@pytest.mark.parametrize(("headers", "client", "scheme"), RESOLVE_CASES)
def test_apply_proxy_headers_sets_what_resolve_forwarded_finds(
    headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None, scheme: str | None
) -> None:
    """The scope takes what the headers report, whichever of them reports it (the scope's
    own look for a forwarding field must not miss one)."""
    peer = ("10.0.0.2", 4000)
    scope: dict[str, Any] = {"type": "http", "scheme": "http", "client": peer, "headers": headers}
    apply_proxy_headers(scope, PROXIES)
    assert scope["client"] == (client or peer)
    as_http = {"ws": "http", "wss": "https"}  # (an http scope's scheme)
    assert scope["scheme"] == as_http.get(scheme or "http", scheme or "http")


@pytest.mark.parametrize(
    ("scope_type", "proto", "expected"),
    [
        ("http", "https", "https"),
        ("http", "wss", "https"),
        ("websocket", "https", "wss"),
        ("websocket", "http", "ws"),
        ("websocket", "ws", "ws"),
    ],
)
def test_apply_proxy_headers_maps_scheme_to_scope_type(
    scope_type: str, proto: str, expected: str
) -> None:
    scope: dict[str, Any] = {
        "type": scope_type,
        "scheme": "x",
        "client": ("127.0.0.1", 1),
        "headers": h(("x-forwarded-proto", proto)),
    }
    apply_proxy_headers(scope, PROXIES)
    assert scope["scheme"] == expected
    assert scope["client"] == ("127.0.0.1", 1)


header_values = st.lists(
    st.sampled_from(
        [
            *'0123456789abcdef.:[]",;= _-\t\\',
            "for=",
            "proto=",
            "unknown",
            "10.0.0.2",
            "https",
            "::1",
        ]
    ),
    max_size=30,
).map("".join)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"forwarded", b"x-forwarded-for", b"x-forwarded-proto"]),
            header_values.map(lambda v: v.encode()),
        ),
        max_size=4,
    )
)
def test_resolve_forwarded_never_crashes(headers: list[tuple[bytes, bytes]]) -> None:
    client, scheme = resolve_forwarded(headers, PROXIES)
    assert scheme in (None, "http", "https", "ws", "wss")
    if client is not None:
        host, port = client
        assert parse_node(f"[{host}]" if ":" in host else host) is not None
        assert 0 <= port <= 65535


@given(st.binary(max_size=80))
def test_resolve_forwarded_never_crashes_on_raw_bytes(raw: bytes) -> None:
    resolve_forwarded([(b"forwarded", raw), (b"x-forwarded-for", raw)], TrustedHosts("*"))


# -- on the wire ---------------------------------------------------------------------------------


async def scope_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = json.dumps({"client": scope["client"], "scheme": scope["scheme"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def ask(server: Any, headers: list[tuple[str, str]]) -> dict[str, Any]:
    stream = await connect(server.addresses[0])
    async with stream:
        response, body = await Client(stream).request(headers=headers)
    assert response.status_code == 200
    result: dict[str, Any] = json.loads(body)
    return result


FORWARDED = [("x-forwarded-for", "203.0.113.7, 127.0.0.1"), ("x-forwarded-proto", "https")]


async def test_trusted_peer_headers_set_client_and_scheme() -> None:
    async with run_server(scope_app) as server:
        assert await ask(server, FORWARDED) == {"client": ["203.0.113.7", 0], "scheme": "https"}


async def test_untrusted_peer_headers_are_ignored() -> None:
    async with run_server(scope_app, forwarded_allow_ips="10.0.0.1") as server:
        seen = await ask(server, FORWARDED)
        assert seen["client"][0] == "127.0.0.1"
        assert seen["client"][1] > 0
        assert seen["scheme"] == "http"


async def test_no_proxy_headers_ignores_them_even_from_trusted_peer() -> None:
    async with run_server(scope_app, proxy_headers=False) as server:
        seen = await ask(server, FORWARDED)
        assert seen["client"][0] == "127.0.0.1"
        assert seen["scheme"] == "http"


async def test_unix_socket_peer_trusted_only_with_unix_entry(tmp_path: Any) -> None:
    path = str(tmp_path / "s.sock")
    async with run_server(scope_app, uds=path) as server:
        assert await ask(server, FORWARDED) == {"client": None, "scheme": "http"}
    async with run_server(scope_app, uds=path, forwarded_allow_ips="unix:,127.0.0.1") as server:
        assert await ask(server, FORWARDED) == {"client": ["203.0.113.7", 0], "scheme": "https"}


async def test_each_request_on_a_keep_alive_connection_is_resolved_on_its_own() -> None:
    async with run_server(scope_app) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            client = Client(stream)
            _, first = await client.request(headers=FORWARDED)
            _, second = await client.request()
        assert json.loads(first)["client"] == ["203.0.113.7", 0]
        assert json.loads(second)["client"][0] == "127.0.0.1"
        assert json.loads(second)["scheme"] == "http"
