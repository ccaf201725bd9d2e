"""The per-connection HTTP/1.1 state machine's interface, and its h11 implementation
(layer 2, sans-IO).

``--http`` picks the parser behind :class:`HTTPParser`: :class:`H11Connection` (h11, pure
Python, the default) or ``httptools_parser.HttptoolsConnection`` (llhttp in C). Everything
above it (the connection task, keep-alive and framing policy, scope builder, response path)
is shared. The interface is h11's own server-side API, so h11 needs only a thin subclass,
plus these additions:

* :meth:`HTTPParser.send_response_head` takes a response head as plain values whose
  header fields the caller has already checked (``http_messages.check_fields``): h11 still
  applies its framing checks; the httptools side skips building an ``h11.Response``.
* :meth:`HTTPParser.send_encoded_head`: the common head (plain fields and one
  Content-Length) already encoded by the caller, which the httptools side takes as it is
  when h11's rules would not change it (h11 declines: it takes fields one by one).
* :meth:`HTTPParser.send_body`: body bytes and the end of the response in one call.
* ``rejects_obs_fold``: whether the parser refuses obs-fold itself (llhttp does); h11
  unfolds it silently, so trioserve screens heads for it when the parser does not.
"""

from __future__ import annotations

from typing import Any, Protocol

import h11


class HTTPParser(Protocol):
    """The server side of one HTTP/1.1 connection, as trioserve drives it (h11's API)."""

    @property
    def rejects_obs_fold(self) -> bool: ...

    @property
    def takes_encoded_heads(self) -> bool: ...  # (whether send_encoded_head may accept)

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

    def send_body(self, data: bytes, end: bool) -> list[Any]:
        """The bytes of a piece of response body (maybe empty) and, if ``end``, of the
        response's end: h11's ``Data`` and ``EndOfMessage`` events in one call.

        Raises:
            h11.LocalProtocolError: more or less body than the Content-Length declared.
        """
        ...

    def send_failed(self) -> None: ...

    def start_next_cycle(self) -> None: ...


class H11Connection(h11.Connection):
    """``h11.Connection`` in the server role, with :class:`HTTPParser`'s two additions."""

    rejects_obs_fold = False
    takes_encoded_heads = False

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

    def send_body(self, data: bytes, end: bool) -> list[Any]:
        pieces = (self.send_with_data_passthrough(h11.Data(data=data)) or []) if data else []
        if end:
            pieces += self.send_with_data_passthrough(h11.EndOfMessage()) or ()
        return pieces
