"""The ASGI response extensions' messages, checked without I/O (layer 2: never trio).

Three extensions of the ASGI spec (asgiref ``docs/extensions.rst``) let an app say more
than ``http.response.start`` and ``http.response.body`` can; :data:`HTTP_EXTENSIONS` is
what ``protocol.scope`` advertises in every ``http`` scope:

* ``http.response.pathsend``: ``{"path": ...}`` sends a file as the rest of the body.
  :func:`pathsend_path` checks the message; the request cycle opens the file and wraps it
  in a :class:`FileRegion`, a *sized* stand-in for the file's bytes. It travels through the
  response state machine and the parser as a body piece would (they only take its
  ``len()``, to frame and count it), and the connection stream sends it: ``os.sendfile``
  on a plain socket, :meth:`FileRegion.pieces` on any other stream.
* ``http.response.early_hint``: ``{"links": [...]}`` before the head sends
  ``103 Early Hints`` (RFC 8297) with one ``Link`` field per link (:func:`early_hint_fields`).
* ``http.response.trailers``: ``"trailers": True`` in ``http.response.start`` announces
  trailer fields after the body; ``{"headers": ..., "more_trailers": ...}`` carries them
  (:func:`trailer_fields`). They are sent only to a client that said ``TE: trailers``
  (:func:`accepts_trailers`, RFC 9110 §10.1.4); otherwise dropped.

Messages from the app are untrusted: violations raise
:class:`~trioserve.errors.AppProtocolError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Final

from ..errors import AppProtocolError
from .response_heads import check_fields, validate_headers

PATHSEND: Final = "http.response.pathsend"
EARLY_HINT: Final = "http.response.early_hint"
TRAILERS: Final = "http.response.trailers"
# What every http scope's "extensions" starts with: copied per scope (apps may add keys),
# a shallow copy (the spec gives each extension an empty dict, which no one writes).
HTTP_EXTENSIONS: Final[dict[str, Any]] = {PATHSEND: {}, EARLY_HINT: {}, TRAILERS: {}}

# Fields a trailer section must not carry (RFC 9110 §6.5.1: "framing, routing, request
# modifiers, authentication, response control, or payload processing"): the ones a
# recipient would act on as if they were in the head.
FORBIDDEN_TRAILERS: Final = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"upgrade",
        b"te",
        b"trailer",
        b"host",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"cache-control",
        b"expires",
        b"location",
        b"retry-after",
        b"set-cookie",
        b"www-authenticate",
        b"authorization",
        b"vary",
        b"date",
    }
)


class FileRegion:
    """``count`` bytes of an open file from ``offset``: a body piece that is not bytes.

    Its ``len()`` is ``count``, which is all the response state machine and the parsers
    need of a body piece (Content-Length checks, chunk sizes); only the connection stream
    reads the file. The request cycle owns ``fd`` and closes it.

    Attributes:
        fd: the open file's descriptor.
        offset: where the region starts in the file.
        count: its length in bytes.
        path: the file's path (for error messages).
    """

    __slots__ = ("count", "fd", "offset", "path")

    def __init__(self, fd: int, offset: int, count: int, path: str) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count
        self.path = path

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"<FileRegion {self.path!r} [{self.offset}, +{self.count})>"

    def pieces(self, size: int) -> Iterator[bytes]:
        """The region's bytes in pieces of at most ``size`` bytes (``os.pread``: no thread;
        a file in the page cache reads in microseconds), for streams that cannot take the
        file itself (TLS, memory streams, HTTP/2 DATA frames).

        Raises:
            AppProtocolError: the file ended before the region did (it shrank).
        """
        offset = self.offset
        end = offset + self.count
        while offset < end:
            data = os.pread(self.fd, min(size, end - offset), offset)
            if not data:
                raise self.shrank(offset - self.offset)
            offset += len(data)
            yield data

    def shrank(self, sent: int) -> AppProtocolError:
        """The error for a file that ended after ``sent`` bytes of the region."""
        return AppProtocolError(
            f"file {self.path!r} ended at {sent} bytes while being sent, short of {self.count}"
        )


def pathsend_path(message: Mapping[str, object]) -> str:
    """The path of an ``http.response.pathsend`` message.

    Raises:
        AppProtocolError: no path, or not a ``str`` / ``os.PathLike`` of one.
    """
    path = message.get("path")
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if type(path) is not str or not path:
        raise AppProtocolError(f"'path' must be a non-empty str, got {path!r}")
    # (ASGI: "the path must be absolute"; a relative one would depend on the cwd.)
    if not os.path.isabs(path):
        raise AppProtocolError(f"'path' must be absolute, got {path!r}")
    return path


def early_hint_fields(
    message: Mapping[str, object], checked: set[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The ``Link`` fields of an ``http.response.early_hint`` message.

    Raises:
        AppProtocolError: ``links`` is not an iterable of bytes, or a link is not a valid
            field value (no CR, LF or NUL reaches the wire).
    """
    links = message.get("links")
    if isinstance(links, (bytes, str, Mapping)) or not isinstance(links, (list, tuple)):
        raise AppProtocolError(f"'links' must be a list of bytes, got {links!r}")
    fields = []
    for link in links:
        if not isinstance(link, bytes):
            raise AppProtocolError(f"each link must be bytes, got {link!r}")
        fields.append((b"link", bytes(link)))
    check_fields(fields, checked)
    return fields


def trailer_fields(
    message: Mapping[str, object], checked: set[tuple[bytes, bytes]]
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The fields and ``more_trailers`` of an ``http.response.trailers`` message.

    Raises:
        AppProtocolError: bad types, an invalid name or value, or a field a trailer section
            must not carry (:data:`FORBIDDEN_TRAILERS`).
    """
    more = message.get("more_trailers", False)
    if not isinstance(more, bool):
        raise AppProtocolError(f"'more_trailers' must be a bool, got {more!r}")
    names: set[bytes] = set()
    fields = validate_headers(message.get("headers"), names)
    forbidden = names & FORBIDDEN_TRAILERS
    if forbidden:
        listed = ", ".join(sorted(name.decode("latin-1") for name in forbidden))
        raise AppProtocolError(f"field not allowed in trailers: {listed}")
    check_fields(fields, checked)
    return fields, more


def accepts_trailers(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's ``TE`` fields say ``trailers`` (RFC 9110 §10.1.4: "the client
    is willing to accept trailer fields")."""
    for name, value in headers:
        if name == b"te" and any(
            part.split(b";")[0].strip() == b"trailers" for part in value.lower().split(b",")
        ):
            return True
    return False
