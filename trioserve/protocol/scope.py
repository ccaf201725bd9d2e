"""The ASGI connection scope, built in one place (layer 2: pure, never trio).

Every ``http`` and ``websocket`` scope trioserve hands an app is made here, from two
inputs:

* what the request says (method, target, HTTP version, headers): primitives, not a
  parser's event, so any HTTP version can pass them (HTTP/1.1's request line, HTTP/2's
  pseudo-headers);
* :class:`ConnectionFacts`, one frozen record per connection, made by
  ``connection.edge`` once the connection is set up (PROXY header, TLS handshake): client,
  server, scheme, root path, the TLS extension and, only when the direct peer is a trusted
  proxy, the trusted networks whose forwarding headers are believed.

The common case (plain HTTP from an untrusted peer) costs one attribute check beyond the
dict itself: :attr:`ConnectionFacts.plain`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

from ..message_trace import peer_name
from .proxy_headers import TrustedHosts, resolve_forwarded
from .response_extensions import HTTP_EXTENSIONS
from .ws_messages import HTTP_RESPONSE_EXTENSION, parse_subprotocols

ASGI_VERSION: Final = {"version": "3.0", "spec_version": "2.4"}
# The scheme of the other protocol family, for a proto reported on the "wrong" scope type.
_AS_WEBSOCKET: Final = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_AS_HTTP: Final = {"ws": "http", "wss": "https", "http": "http", "https": "https"}

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What holds for one connection's whole life, as its scopes report it.

    Attributes:
        client: the client address (after a PROXY header), or None (UNIX sockets).
        server: the local address.
        scheme: ``"http"`` or ``"https"``.
        root_path: ``--root-path``.
        tls: the ASGI TLS extension, computed once per connection (TLS only).
        trusted: the trusted proxies, set only when the direct peer is one of them: then
            each scope's client and scheme come from its forwarding headers.
        plain: neither ``tls`` nor ``trusted``: a scope needs nothing beyond the above.
    """

    client: tuple[str, int] | None
    server: tuple[str, int | None] | None
    scheme: str = "http"
    root_path: str = ""
    tls: dict[str, Any] | None = None
    trusted: TrustedHosts | None = None
    plain: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", self.tls is None and self.trusted is None)

    @property
    def peer(self) -> str:
        """The client for log lines: ``host:port``, or ``unix``.

        (Made when needed: a string kept per connection would cost every idle connection.)
        """
        return peer_name(self.client)


def http_scope(
    method: bytes,
    target: bytes,
    http_version: bytes,
    headers: Headers,
    facts: ConnectionFacts,
    state: dict[str, Any] | None,
) -> dict[str, Any]:
    """Build the ASGI ``http`` connection scope of one request.

    ``path`` is percent-decoded UTF-8 and, like ``raw_path``, includes ``root_path``
    (the ASGI spec's clarification, followed by uvicorn). ``headers`` (lower-case names,
    order and duplicates kept) is taken as is. ``state`` is lifespan's, copied per scope.
    """
    if target[:1] == b"/":  # (origin-form: the common case, split here)
        raw_path, _, query_string = target.partition(b"?")
    else:
        raw_path, query_string = split_target(target)
    # Invalid UTF-8 after percent-decoding becomes U+FFFD (as uvicorn and hypercorn do):
    # a lone surrogate would make every app that encodes the path (a JSON echo of a path
    # parameter) fail with a 500 that any client can trigger. raw_path keeps the bytes.
    path = raw_path.decode("latin-1")
    if "%" in path:
        path = unquote(path, encoding="utf-8", errors="replace")
    root_path = facts.root_path
    if root_path:
        path = root_path + path
        raw_path = root_path.encode("utf-8") + raw_path
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": ASGI_VERSION,
        "http_version": "1.1" if http_version == b"1.1" else _version_name(http_version),
        "method": method.decode("ascii"),
        "scheme": facts.scheme,
        "path": path,
        "raw_path": raw_path,
        "query_string": query_string,
        "root_path": root_path,
        "headers": headers,
        "client": facts.client,
        "server": facts.server,
        # (pathsend, early hints, trailers: see protocol.response_extensions)
        "extensions": HTTP_EXTENSIONS.copy(),
    }
    if state is not None:
        scope["state"] = state.copy()
    if facts.plain:
        return scope
    if facts.tls is not None:
        scope["extensions"]["tls"] = facts.tls
    if facts.trusted is not None:
        apply_proxy_headers(scope, facts.trusted)
    return scope


def _version_name(http_version: bytes) -> str:
    """The scope's ``http_version`` for anything but HTTP/1.1 (compared first, inline)."""
    return "2" if http_version == b"2" else "1.0"


def websocket_scope(
    target: bytes,
    http_version: bytes,
    headers: Headers,
    facts: ConnectionFacts,
    state: dict[str, Any] | None,
) -> dict[str, Any]:
    """Build the ASGI ``websocket`` scope of an upgrade request.

    The handshake is an HTTP GET, so path, query, headers, client, server, root_path and
    state are :func:`http_scope`'s; here the scheme becomes ``ws``/``wss``, ``method`` goes,
    and ``subprotocols`` and the denial-response extension are added.
    """
    http = http_scope(b"GET", target, http_version, headers, facts, state)
    scope = {key: value for key, value in http.items() if key != "method"}
    scope["type"] = "websocket"
    scope["scheme"] = "wss" if http["scheme"] == "https" else "ws"
    scope["subprotocols"] = parse_subprotocols(headers)
    extensions: dict[str, Any] = {HTTP_RESPONSE_EXTENSION: {}}
    extensions.update(
        (name, value) for name, value in http["extensions"].items() if name not in HTTP_EXTENSIONS
    )  # (the http response extensions are not a WebSocket's)
    scope["extensions"] = extensions
    return scope


def apply_proxy_headers(scope: dict[str, Any], trusted: TrustedHosts) -> None:
    """Set ``scope["client"]`` and ``scope["scheme"]`` from the forwarding headers.

    The caller has already decided that the direct peer is trusted (once per connection,
    ``ConnectionFacts.trusted``). A reported ``https`` becomes ``wss`` on a WebSocket scope
    and vice versa.
    """
    client, scheme = resolve_forwarded(scope["headers"], trusted)
    if client is not None:
        scope["client"] = client
    if scheme is not None:
        table = _AS_WEBSOCKET if scope["type"] == "websocket" else _AS_HTTP
        scope["scheme"] = table[scheme]


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split a request-target into (path, query) (RFC 9112 §3.2).

    Absolute-form targets (``http://host/p?q``) are reduced to their path; the
    asterisk-form ``*`` is kept as the path.
    """
    if target[:1] != b"/" and b"://" in target:
        after_scheme = target.split(b"://", 1)[1]
        # The authority ends at the first "/" or "?" (RFC 3986 §3.2); an empty path is "/".
        end = len(after_scheme)
        for delimiter in (b"/", b"?"):
            found = after_scheme.find(delimiter)
            if 0 <= found < end:
                end = found
        target = after_scheme[end:]
        if target[:1] != b"/":
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return path, query
