"""Access-log fields and the ``--access-log-format`` template (layer 1, stdlib only).

An access record is the request's ASGI scope plus what happened to the response (status,
body bytes, duration). :func:`access_fields` turns that into named fields; the text
formatter renders them through a template, the JSON formatter emits them as keys.

Template syntax: ``{field}`` placeholders, ``{header:NAME}`` for any request header,
``{{`` / ``}}`` for literal braces. Fields:

=============== =====================================================================
``client``      ``host:port`` of the client (after trusted proxy headers), or ``-``
``method``      request method, ``GET``
``path``        decoded path, ``/items/1``
``query``       raw query string without ``?`` (empty if none)
``target``      path plus ``?query`` when there is one
``http_version`` ``1.1``
``scheme``      ``http``, ``https``, ``ws`` or ``wss``
``status``      response status, or ``-`` when none was sent; ``499`` when the client
                left before any response (nginx's "client closed request", never a 5xx)
``status_phrase`` its reason phrase, ``OK`` (``http.HTTPStatus``'s, as uvicorn logs it)
``bytes``       response body bytes sent
``duration``    seconds from request head to response end, ``0.001234``
``duration_ms`` milliseconds, one decimal, ``1.2``
``request_id``  the ``X-Request-ID`` request header, or ``-``
=============== =====================================================================

The default (``--access-log-format`` unset) is uvicorn's own access line, so log parsers
written for uvicorn keep working (the level prefix comes from the formatter)::

    {client} - "{method} {target} HTTP/{http_version}" {status} {status_phrase}

that is ``INFO:     127.0.0.1:50312 - "GET /items?id=1 HTTP/1.1" 200 OK``. It is rendered
without the template machinery (``server_state.log_access``); a response cut short after
it started (the client left mid-body, or the app failed after starting it) gets
``(aborted)`` after the phrase. For the duration, use :data:`TIMED_ACCESS_FORMAT`::

    {client} - "{method} {target} HTTP/{http_version}" {status} {status_phrase} {duration_ms}ms
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

from .errors import ConfigError

FIELDS: Final = (
    "client",
    "method",
    "path",
    "query",
    "target",
    "http_version",
    "scheme",
    "status",
    "status_phrase",
    "bytes",
    "duration",
    "duration_ms",
    "request_id",
)
DEFAULT_ACCESS_FORMAT: Final = (
    '{client} - "{method} {target} HTTP/{http_version}" {status} {status_phrase}'
)
# The default line plus the duration (the documented alternative).
TIMED_ACCESS_FORMAT: Final = DEFAULT_ACCESS_FORMAT + " {duration_ms}ms"
# nginx's status for a request whose client closed the connection before anything was
# answered: nothing was sent and the server did not fail, so it must not count as a 5xx.
CLIENT_CLOSED_REQUEST: Final = 499
# Reason phrases by status code, looked up once per access line (an HTTPStatus(code) call
# costs an enum lookup and raises for codes it does not know).
STATUS_PHRASES: Final[dict[int, str]] = {
    **{status.value: status.phrase for status in HTTPStatus},
    CLIENT_CLOSED_REQUEST: "Client Closed Request",
}
_PLACEHOLDER: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class AccessTemplate:
    """A compiled ``--access-log-format``; :meth:`render` fills it from access fields."""

    __slots__ = ("_parts",)

    def __init__(self, parts: list[tuple[str, str | None]]) -> None:
        # (literal text, field name or None, lower-case header name for {header:NAME}):
        # the header key is encoded here once, not on every access line.
        self._parts = [
            (literal, name, None)
            if name is None or not name.startswith("header:")
            else (literal, None, name[7:].encode("latin-1"))
            for literal, name in parts
        ]

    def render(self, fields: Mapping[str, Any], headers: Any = ()) -> str:
        out: list[str] = []
        for literal, name, header in self._parts:
            out.append(literal)
            if header is not None:
                out.append(_header(headers, header) or "-")
            elif name is not None:
                out.append(str(fields[name]))
        return "".join(out)


def compile_access_format(template: str) -> AccessTemplate:
    """Parse an access-log template.

    Raises:
        ConfigError: an unknown field, a bad header name or an unmatched brace.
    """
    parts: list[tuple[str, str | None]] = []
    literal: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        literal.append(template[position : match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        name = match.group(1)
        if name is None:
            raise ConfigError(
                f"access_log_format: unmatched {token!r} in {template!r} (use {token * 2})"
            )
        if name.startswith("header:"):
            header = name[7:]
            if not _HEADER_NAME.fullmatch(header):
                raise ConfigError(f"access_log_format: bad header name {header!r}")
            name = "header:" + header.lower()
        elif name not in FIELDS:
            raise ConfigError(
                f"access_log_format: unknown field {{{name}}}; known: "
                f"{', '.join(FIELDS)}, header:NAME"
            )
        parts.append(("".join(literal), name))
        literal = []
    literal.append(template[position:])
    parts.append(("".join(literal), None))
    return AccessTemplate(parts)


def access_fields(
    scope: Mapping[str, Any], status: int | None, body_bytes: int, duration: float
) -> dict[str, Any]:
    """The named fields of one access record (see the module docstring)."""
    client = scope.get("client")
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope.get("path", "")
    return {
        "client": f"{client[0]}:{client[1]}" if client else "-",
        "method": scope.get("method", "GET"),
        "path": path,
        "query": query,
        "target": f"{path}?{query}" if query else path,
        "http_version": scope.get("http_version", "1.1"),
        "scheme": scope.get("scheme", "http"),
        "status": status if status is not None else "-",
        "status_phrase": status_phrase(status),
        "bytes": body_bytes,
        "duration": f"{duration:.6f}",
        "duration_ms": f"{duration * 1000:.1f}",
        "request_id": _header(scope.get("headers", ()), b"x-request-id") or "-",
    }


def status_phrase(status: int | None) -> str:
    """The reason phrase logged after ``status``: ``OK``; ``-`` when no status was sent, and
    empty for a code without one (uvicorn does the same)."""
    if status is None:
        return "-"
    return STATUS_PHRASES.get(status, "")


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return str(value.decode("latin-1"))
    return None
