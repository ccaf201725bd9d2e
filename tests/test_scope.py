"""Pure tests for protocol.scope: every scope from one builder and one ConnectionFacts."""

from __future__ import annotations

import dataclasses

import pytest

from trioserve.protocol.proxy_headers import TrustedHosts
from trioserve.protocol.response_extensions import HTTP_EXTENSIONS
from trioserve.protocol.scope import ConnectionFacts, http_scope, websocket_scope

PROXY = TrustedHosts("10.0.0.1")
TLS = {"server_cert": None, "client_cert_chain": [], "tls_version": 0x0304}
HEADERS = [
    (b"host", b"example.com"),
    (b"x-forwarded-for", b"203.0.113.7"),
    (b"x-forwarded-proto", b"https"),
    (b"sec-websocket-protocol", b"chat"),
]


def test_plain_facts_give_the_bare_scope() -> None:
    facts = ConnectionFacts(("10.0.0.1", 5000), ("10.0.0.2", 80), "http", "/api")
    assert facts.plain
    scope = http_scope(b"POST", b"/a%20b?x=1", b"1.0", HEADERS, facts, {"db": 1})
    assert scope["method"] == "POST"
    assert scope["http_version"] == "1.0"
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == (
        "/api/a b",
        b"/api/a%20b",
        b"x=1",
    )
    assert scope["client"] == ("10.0.0.1", 5000)  # forwarding headers of an untrusted peer
    assert scope["scheme"] == "http"
    assert scope["extensions"] == HTTP_EXTENSIONS
    assert scope["state"] == {"db": 1}


def test_tls_and_trusted_proxy_facts_complete_every_scope() -> None:
    facts = ConnectionFacts(("10.0.0.1", 5000), ("10.0.0.2", 443), "https", "", TLS, PROXY)
    assert not facts.plain
    scope = http_scope(b"GET", b"/", b"1.1", HEADERS, facts, None)
    assert scope["extensions"] == {**HTTP_EXTENSIONS, "tls": TLS}
    assert scope["client"] == ("203.0.113.7", 0)
    assert scope["scheme"] == "https"
    assert "state" not in scope
    ws = websocket_scope(b"/ws", b"1.1", HEADERS, facts, None)
    assert list(ws["extensions"]) == ["websocket.http.response", "tls"]
    assert ws["client"] == ("203.0.113.7", 0)
    assert (ws["type"], ws["scheme"], ws["subprotocols"]) == ("websocket", "wss", ["chat"])
    assert "method" not in ws


def test_connection_facts_are_frozen() -> None:
    facts = ConnectionFacts(None, None)
    assert (facts.scheme, facts.root_path, facts.peer) == ("http", "", "unix")
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.scheme = "https"  # type: ignore[misc]
