"""The per-connection HTTP/1.1 state machine's interface, and its h11 implementation
(layer 2, sans-IO).

``--http`` picks the parser behind :class:`HTTPParser`: :class:`H11Connection` (h11, pure
Python, the default) or ``httptools_parser.HttptoolsConnection`` (llhttp in C). Everything
above it (the connection task, keep-alive and framing policy, scope builder, response path)
is shared. The interface is h11's own server-side API, so h11 needs only a thin subclass,
plus these additions:

* :meth:`HTTPParser.send_response_head` takes a response head as plain values whose
  header fields the caller has already checked (``response_heads.check_fields``): h11 still
  applies its framing checks; the httptools side skips building an ``h11.Response``.
* :meth:`HTTPParser.send_encoded_head`: the common head (plain fields and one
  Content-Length) already encoded by the caller, which the httptools side takes as it is
  when h11's rules would not change it (h11 declines: it takes fields one by one).
* :meth:`HTTPParser.send_body`: body bytes and the end of the response in one call.
* :meth:`HTTPParser.send_trailers`: the end of a chunked response with trailer fields.
* ``rejects_obs_fold``: whether the parser refuses obs-fold itself (llhttp does); h11
  unfolds it silently, so trioserve screens heads for it when the parser does not.
* ``request_type``: the class of its request events: ``h11.Request``, or a subclass
  (what ``next_event`` hands out is told apart by ``type()``, as the cheapest check).

Both parsers judge a request's Transfer-Encoding by :func:`transfer_coding_problem` (h11
refuses every value but a lone "chunked" with 501, without saying which it saw:
:func:`refusal` judges its refusal again from the head's bytes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final, Protocol, cast

import h11

from .response_extensions import FileRegion

# A Transfer-Encoding field of a request head, as h11 reads one (its value without OWS),
# and the blank line that ends the head.
_TRANSFER_ENCODING_FIELD: Final = re.compile(
    rb"\ntransfer-encoding:[ \t]*([^\r\n]*?)[ \t]*\r?(?=\n)", re.IGNORECASE
)
_HEAD_END: Final = re.compile(rb"\n\r?\n")


def transfer_coding_problem(values: Iterable[bytes]) -> tuple[int, str] | None:
    """Judge a request's Transfer-Encoding field values: None for the one framing both
    parsers read (a lone "chunked"), else the ``(status, reason)`` to answer and close with.

    * chunked not the final coding (absent, or followed by another): 400. RFC 9112 §6.3:
      "the message body length cannot be determined reliably; the server MUST respond
      with the 400 (Bad Request) status code and then close the connection."
    * chunked more than once: 400 ("A sender MUST NOT apply the chunked transfer coding
      more than once to a message body", §6.1): the framing is faulty too.
    * another coding (gzip, ...) before a final chunked: the body's length is known but
      we cannot decode it: 501 ("A server that receives a request message with a
      transfer coding it does not understand SHOULD respond with 501", §6.1).
    """
    codings = [coding.strip().lower() for value in values for coding in value.split(b",")]
    if not codings or codings[-1] != b"chunked":
        return 400, "chunked is not the final transfer coding"
    if codings.count(b"chunked") > 1:
        return 400, "chunked transfer coding applied more than once"
    if len(codings) > 1:
        unsupported = b", ".join(codings[:-1]).decode("ascii", "replace")
        return 501, f"unsupported transfer coding {unsupported}"
    return None


def refusal(exc: h11.RemoteProtocolError, head: bytes | bytearray) -> tuple[int, str]:
    """The ``(status, reason)`` to answer a request head the parser refused with.

    Args:
        exc: the parser's refusal.
        head: the head's bytes as received, when the parser is h11 (else b""): h11's 501
            for a Transfer-Encoding is judged again from them (see the module docstring).
    """
    if exc.error_status_hint == 501 and head:
        end = _HEAD_END.search(head)
        values = _TRANSFER_ENCODING_FIELD.findall(head, 0, len(head) if end is None else end.end())
        problem = transfer_coding_problem(values) if values else None
        if problem is not None:
            return problem
    return exc.error_status_hint, str(exc)


def data_of(event: h11.Data) -> bytes | bytearray:
    """A request body piece's bytes. h11 declares ``Data.data`` as bytes, yet hands out
    bytearray slices of its buffer: code compiled by mypyc, which checks declared types at
    run time, reads the field through this (untyped access, truthful type)."""
    data: bytes | bytearray = cast(Any, event).data
    return data


class HTTPParser(Protocol):
    """The server side of one HTTP/1.1 connection, as trioserve drives it (h11's API)."""

    @property
    def rejects_obs_fold(self) -> bool: ...

    @property
    def takes_encoded_heads(self) -> bool: ...  # (whether send_encoded_head may accept)

    @property
    def request_type(self) -> type[h11.Request]: ...  # (the class of its requests)

    @property
    def our_state(self) -> Any: ...  # (h11's state sentinels, h11.IDLE ... h11.ERROR)

    @property
    def their_state(self) -> Any: ...

    @property
    def their_http_version(self) -> bytes | None: ...

    @property
    def they_are_waiting_for_100_continue(self) -> bool: ...

    @property
    def trailing_data(self) -> tuple[bytes, bool]: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> Any: ...

    def send(self, event: Any) -> bytes | None: ...

    def send_with_data_passthrough(self, event: Any) -> list[Any] | None: ...

    def send_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> list[Any]:
        """The bytes of a response head whose fields were checked by the caller.

        Raises:
            h11.LocalProtocolError: the framing headers are invalid (bad Content-Length, a
                transfer coding other than chunked), before any state changed.
        """
        ...

    def send_encoded_head(
        self, status: int, reason: bytes, lines: bytes, length: int
    ) -> list[Any] | None:
        """The bytes of a response head whose fields the caller checked and encoded
        (``lines``, no framing field among them but one Content-Length of ``length``); or
        None, and nothing changed, when the parser would rather take the fields one by one
        (:meth:`send_response_head`)."""
        ...

    def send_body(self, data: bytes | FileRegion, end: bool) -> list[Any]:
        """The bytes of a piece of response body (maybe empty) and, if ``end``, of the
        response's end: h11's ``Data`` and ``EndOfMessage`` events in one call.

        Raises:
            h11.LocalProtocolError: more or less body than the Content-Length declared.
        """
        ...

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> list[Any]:
        """The bytes of the response's end with trailer ``fields`` (checked by the caller):
        the last chunk and the trailer section (RFC 9112 §7.1.2).

        Raises:
            h11.LocalProtocolError: the body is not chunked.
        """
        ...

    def send_failed(self) -> None: ...

    def start_next_cycle(self) -> None: ...


class H11Connection(h11.Connection):
    """``h11.Connection`` in the server role, with :class:`HTTPParser`'s two additions."""

    rejects_obs_fold = False
    takes_encoded_heads = False
    request_type = h11.Request

    def __init__(self, *, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)

    def send_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> list[Any]:
        # (Built before send(): an invalid head leaves h11's state untouched.)
        response = h11.Response(
            status_code=status, headers=headers, reason=reason, http_version=b"1.1", _parsed=True
        )
        return self.send_with_data_passthrough(response) or []

    def send_encoded_head(
        self, status: int, reason: bytes, lines: bytes, length: int
    ) -> list[Any] | None:
        return None  # (h11 takes the fields one by one)

    def send_body(self, data: bytes | FileRegion, end: bool) -> list[Any]:
        # (A FileRegion passes through h11 as it is: h11 only takes its len().)
        pieces: list[Any] = []
        if data:
            pieces = self.send_with_data_passthrough(h11.Data(data=data)) or []  # type: ignore[arg-type]
        if end:
            pieces += self.send_with_data_passthrough(h11.EndOfMessage()) or ()
        return pieces

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> list[Any]:
        # (h11 refuses trailers unless the body is chunked.)
        return self.send_with_data_passthrough(h11.EndOfMessage(headers=fields)) or []
