"""The server half of ``h11.Connection``, parsed by httptools (llhttp) (layer 2, sans-IO).

``--http httptools`` swaps this class in for h11's and nothing else changes: the connection
task, keep-alive and framing policy, scope builder and response path are the ones h11 uses
(:mod:`.http_connection`, :mod:`.http_messages`). It offers the part of h11's API trioserve
calls (:class:`.http_parser.HTTPParser`) with h11's semantics, and hands out h11's own event
objects and exceptions (the request as a ``FilledRequest``, an ``h11.Request`` whose fields
are set directly), so the code above cannot tell the two apart:

* reading: llhttp parses each chunk as it arrives (push); the events wait in a queue and
  :meth:`next_event` hands them out one at a time (pull), stopping at the end of a request
  (``PAUSED``) as h11 does. Bytes that arrive once the current request has ended are kept
  unparsed (``trailing_data``) until :meth:`start_next_cycle`, so pipelined input is bounded
  and screened like h11's, and an upgrade leaves what followed its head untouched.
* upgrades: llhttp ends a request that offers one (``Connection: upgrade`` and
  ``Upgrade``, or CONNECT) at its head, body or not. h11 switches only when the server
  answers 101, and until then reads the body as a body; so does this class (a fresh
  llhttp parser reads the body, see ``HttptoolsConnection._unskip_body``), else the body
  of an h2c or non-GET WebSocket request would be parsed as the next request.
* strictness: llhttp checks the request line, field syntax and Content-Length, and refuses
  obs-fold, bare CR/LF, duplicate Content-Length and Content-Length with Transfer-Encoding.
  h11's remaining rules are applied here: one Host in an HTTP/1.1 request, a lone
  "chunked" as the only transfer coding (else 400 or 501, judged as on the h11 path by
  ``http_parser.transfer_coding_problem``), no empty line before the request line, and
  a head that never ends capped at ``max_incomplete_event_size`` (431). The ``h11.Request``
  is then filled in directly, as h11's constructor would only repeat these checks.
* writing: a small response writer. The head's fields were already validated as strictly as
  h11 does (``response_heads.check_fields``); here h11's checks of the framing fields and its
  framing rules are applied (chunked or Content-Length, HTTP/1.0 peers, HEAD/204/304,
  ``Connection: close``), producing the bytes h11 would. The common head (plain fields, one
  Content-Length, an HTTP/1.1 GET-like exchange) arrives already encoded by the server's
  ``response_heads.ResponseHeads`` and is taken as it is (``send_encoded_head``).

Two differences remain, documented in the README: llhttp knows only registered methods
(GET ... PROPFIND, PURGE, QUERY), so an unknown but well-formed method gets 501 here where
h11 passes it to the app; and two identical Content-Length fields are refused (h11 merges
them).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Final

import h11
import h11._events  # (for mypyc: FilledRequest's base class is defined there)
import httptools
from h11._headers import Headers  # (the type of h11.Request.headers)

from ..compiled import mypyc_attr
from .http1_framing import BodyEnd, ResponseSide, has_token, primed_parser
from .http1_parser import transfer_coding_problem

_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
# (h11's names bound once: the hot paths below look each up per request.)
_IDLE: Final = h11.IDLE
_SEND_BODY: Final = h11.SEND_BODY
_DONE: Final = h11.DONE
_DATA: Final = h11.Data
_END: Final = h11.EndOfMessage
_SEND_RESPONSE: Final = h11.SEND_RESPONSE
_ERROR: Final = h11.ERROR
_NEED_DATA: Final = h11.NEED_DATA
# Request fields on_header looks at (any other is only kept).
_NOTED_FIELDS: Final = frozenset({b"host", b"transfer-encoding", b"connection", b"expect"})
_END_OF_MESSAGE: Final = h11.EndOfMessage()
_OWS: Final = b" \t"
_OWS_BYTES: Final = (b" ", b"\t")
_new: Final = object.__new__
# A well-formed request line (as h11 reads one), to tell a method llhttp does not know
# (501) from garbage (400); and the beginnings that may still become one.
_REQUEST_LINE: Final = re.compile(
    rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r?\n"
)
_MAYBE_REQUEST_LINE: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]*(?: [\x20-\x7e]*\r?)?")

# llhttp's error messages answered other than with 400, as h11 answers the same input.
# (llhttp's two Transfer-Encoding errors, a coding after chunked and chunked not final, are
# the 400s of RFC 9112 §6.3: see http_parser.transfer_coding_problem.)
_STATUS_FOR: Final = {"Invalid HTTP version": 505}


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp (the reason is already queued)."""


@mypyc_attr(native_class=False)  # (a subclass of h11's event, a Python class)
class FilledRequest(h11.Request):
    """The ``h11.Request`` this parser hands out, its fields set directly: llhttp and
    :meth:`HttptoolsConnection.on_headers_complete` have checked them as h11's
    constructor would.

    h11's events are frozen: each field of an ``h11.Request`` made without its constructor
    would be set through ``object.__setattr__``, a call that costs three times a plain
    attribute store (~1.2 k instructions per request). It is an ``h11.Request`` to every
    reader.
    """

    __slots__ = ()
    method: bytes
    target: bytes
    http_version: bytes
    headers: Headers
    # (object's own slot wrappers, both: one C slot serves setting and deleting, and
    # CPython stores attributes directly, as for any class without methods of its own
    # there, only when neither is a Python function, as dataclass's frozen ones are.)
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__


_REQUEST: Final = FilledRequest


class HttptoolsConnection(ResponseSide):
    """A server-side ``h11.Connection`` whose reading is done by llhttp (its writing is
    :class:`.http1_framing.ResponseSide`'s).

    Args:
        max_incomplete_event_size: the largest request head buffered before 431.
    """

    rejects_obs_fold = True  # (llhttp: "Unexpected whitespace after header value")
    takes_encoded_heads = True
    request_type = FilledRequest

    __slots__ = (
        "_between",
        "_body_end",
        "_close",
        "_coded",
        "_ends_queued",
        "_events",
        "_expect",
        "_flags",
        "_head_fed",
        "_headers",
        "_hosts",
        "_http11",
        "_in_head",
        "_line",
        "_max_head",
        "_method_refused",
        "_parser",
        "_raw",
        "_raw_closed",
        "_url",
    )

    def __init__(self, *, max_incomplete_event_size: int = 16 * 1024) -> None:
        super().__init__()
        self._parser = httptools.HttpRequestParser(self)
        self._max_head = max_incomplete_event_size
        self._events: deque[Any] = deque()  # events, then maybe a RemoteProtocolError
        self._ends_queued = 0  # EndOfMessage events in _events
        self._raw = bytearray()  # bytes not fed to llhttp yet (see trailing_data)
        self._raw_closed = False
        self._in_head = False
        self._between = True  # no message begun since the last one ended
        self._line = b""  # the request line so far, while llhttp has not finished it
        self._method_refused = False  # llhttp refused the method; 400 or 501 undecided
        self._head_fed = 0
        self._http11 = False  # the head beginning the current read is HTTP/1.1 (_feed)
        self._body_end: BodyEnd | None = None  # (an upgrade request's body is being read)
        self._url = b""
        self._headers: list[tuple[bytes, bytes, bytes]] = []  # (name, lower-case name, value)
        self._hosts = 0
        self._coded = self._close = self._expect = False  # (_coded: a Transfer-Encoding)
        # (keep-alive refused, 100-continue expected) of each queued request
        self._flags: deque[tuple[bool, bool]] = deque()

    # -- llhttp's callbacks (called while feeding) ----------------------------------------

    def on_message_begin(self) -> None:
        # (The head's fields were reset when the last head completed.)
        self._in_head = True
        self._between = False
        self._line = b""

    def on_url(self, url: bytes) -> None:
        self._url += url  # (llhttp may hand the target over in pieces)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # (the trailer fields of a chunked body: h11 drops them too)
            return
        lower = name.lower()
        if value[-1:] in _OWS_BYTES:
            value = value.rstrip(_OWS)  # (llhttp drops leading whitespace only)
        if lower not in _NOTED_FIELDS:
            pass
        elif lower == b"host":
            self._hosts += 1
        elif lower == b"connection":
            if has_token(value, b"close"):
                self._close = True
        elif lower == b"expect":
            if has_token(value, b"100-continue"):
                self._expect = True
        elif lower == b"transfer-encoding":
            value = value.lower()  # (as h11 keeps it; judged once the head is complete)
            self._coded = True
        self._headers.append((name, lower, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_fed = 0
        parser = self._parser
        headers = self._headers
        if self._http11:  # (see _feed)
            self._http11 = False
            http_version = b"1.1"
        else:
            http_version = self._version()
            if not http_version:
                raise _Stop
        if self._coded:
            problem = transfer_coding_problem(v for _, n, v in headers if n == b"transfer-encoding")
            if problem is not None:
                self._fail(problem[1], problem[0])
                raise _Stop
        # RFC 9112 §3.2: exactly one Host in an HTTP/1.1 request (h11's check).
        if self._hosts != 1 and (self._hosts or http_version == b"1.1"):
            self._fail(
                "Found multiple Host: headers" if self._hosts else "Missing mandatory Host: header"
            )
            raise _Stop
        # The h11 event, filled in directly: llhttp has checked the method, target and
        # fields (and the Content-Length), on_header the Host and Transfer-Encoding rules, so
        # h11's constructor would only check them again (a tenth of a small request's time).
        request: Any = _new(_REQUEST)
        request.method = parser.get_method()
        request.target = self._url
        request.http_version = http_version
        fields = _new(Headers)  # (what Headers(headers) does, minus its Python frame; a
        fields._full_items = headers  # plain attribute: Headers is not frozen)
        request.headers = fields
        # What next_event needs when it hands this request out (later, if pipelined).
        self._flags.append((self._close or http_version < b"1.1", self._expect))
        self._url = b""
        self._headers = []
        self._hosts = 0
        self._coded = self._close = self._expect = False
        self._events.append(request)

    def _version(self) -> bytes:
        """The version of the head llhttp just completed, or b"" when it is refused (the
        reason is queued)."""
        version = self._parser.get_http_version()
        if version == "0.9" and not self._headers:
            # A request line without a version, which llhttp takes for HTTP/0.9 (h11: 400).
            # (An explicit HTTP/0.9 with header fields gets 505 from check_request.)
            self._fail("no HTTP version in the request line")
            return b""
        return _VERSIONS.get(version) or version.encode("ascii")

    def on_body(self, body: bytes) -> None:
        self._events.append(h11.Data(data=body))

    def on_message_complete(self) -> None:
        self._between = True
        self._events.append(_END_OF_MESSAGE)
        self._ends_queued += 1

    # -- reading --------------------------------------------------------------------------

    def _fail(self, message: str, status: int = 400) -> None:
        self._events.append(h11.RemoteProtocolError(message, error_status_hint=status))

    def _feed(self, data: bytes | bytearray) -> None:
        """Parse ``data``: its events (or its error) join the queue."""
        if self._method_refused:
            self._line += data
            self._judge_method()
            return
        self._http11 = False
        if self._between:  # (a message begins with this read)
            # (Compared as ints: ``bytes in bytes`` first tries the operand as an int, and
            # the TypeError it raises and clears costs ~2 k instructions per request.)
            if not data or data[0] == 13 or data[0] == 10:
                # An empty line where a request line belongs: h11 answers 400 (llhttp would
                # skip any number of them, RFC 9112 §2.2's leniency).
                self._fail("no request line received")
                self._between = False
                return
            # If its request line is in this read, it says "HTTP/1.1" right before the
            # line's CRLF, or llhttp refuses it ("Expected CRLF after version"): read here,
            # its version costs no get_http_version() call, which formats a new string
            # (~2 k instructions, a fortieth of a small request).
            end = data.find(b"\r\n")
            self._http11 = end > 0 and data.endswith(b" HTTP/1.1", 0, end)
        body_end = self._body_end
        if body_end is not None:  # (an upgrade request's body: see _unskip_body)
            size = body_end.measure(data)
            if body_end.ended:
                self._body_end = None
                self._raw[:0] = data[size:]
                data = data[:size]
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The head asked to switch protocols: what follows it is not HTTP (yet).
            offset = upgrade.args[0]
            self._raw[:0] = data[offset:]
            self._unskip_body()
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):
                raise  # a bug in a callback: the connection task logs it
            # (_Stop: the reason is queued already)
        except httptools.HttpParserInvalidMethodError:
            self._line += data
            self._method_refused = True
            self._judge_method()
        except httptools.HttpParserError as exc:
            message = str(exc)
            self._fail(message, _STATUS_FOR.get(message, 400))
        if self._in_head:
            if not self._url and not self._method_refused:
                # The request line goes on in the next read: kept, should llhttp refuse
                # its method (_judge_method tells an unknown method from garbage).
                self._line += data
            self._head_fed += len(data)
            if self._head_fed > self._max_head:
                self._fail("Receive buffer too long", 431)
                self._in_head = False

    def _unskip_body(self) -> None:
        """Undo llhttp's end of an upgrade request at its head, if the head declared a body.

        llhttp (through httptools, which answers its on_headers_complete with "skip the
        body" for any upgrade) takes everything after such a head for the new protocol,
        so a body would be parsed as the next request: request smuggling. h11 switches
        only once the server answers 101 (trioserve answers 101 only to a GET WebSocket
        handshake, before reading any body); until then the body is a body. So the queued
        EndOfMessage is withdrawn and a fresh llhttp parser takes over, primed with a
        head that frames a body the same way (this Content-Length, or chunked): llhttp
        parses the body, chunks and trailer included, as strictly as any other. It is fed
        no further than the body's end (:class:`BodyEnd`): what follows waits unparsed
        in ``trailing_data``, as in h11, until the response has shown that the
        connection stays HTTP (:meth:`start_next_cycle`).

        What came with the head waits unparsed too, body included (as in h11's buffer),
        until the request is read on as HTTP: a connection switched then gets it as sent.
        """
        events = self._events
        length = 0
        chunked = False
        for _, name, value in events[-2].headers._full_items:  # (the upgrade request)
            if name == b"transfer-encoding":  # (on_headers_complete let only "chunked" by)
                chunked = True
            elif name == b"content-length":  # (llhttp allows one, of digits only)
                length = int(value)
        if not (chunked or length):
            return  # no body: the message did end with its head
        events.pop()  # (llhttp's EndOfMessage)
        self._ends_queued -= 1
        self._parser = primed_parser(self, length)
        events.pop()  # (the primer's own Request; its fields were reset as any head's)
        self._flags.pop()
        self._body_end = BodyEnd(length)

    def _judge_method(self) -> None:
        """llhttp refused the request's method: 501 if it is a well-formed token llhttp does
        not know, 400 if not; undecided until the request line shows which."""
        line = self._line
        if _REQUEST_LINE.match(line):
            self._fail("request method not recognized by httptools", 501)
        elif (
            len(line) <= self._max_head
            and not self._raw_closed
            and _MAYBE_REQUEST_LINE.fullmatch(line)
        ):
            return
        else:
            self._fail("invalid request method")
        self._method_refused = False

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the peer (b"": the peer closed), as ``h11.Connection`` does."""
        if not data:
            self._raw_closed = True
            if self._method_refused:
                self._judge_method()
        elif self._raw_closed:
            raise RuntimeError("received close, then received more data?")
        elif (
            self._ends_queued
            or self._raw
            or (self.their_state is not _IDLE and self.their_state is not _SEND_BODY)
        ):
            # The current request has ended (or failed): the next one waits unparsed.
            self._raw += data
        else:
            self._feed(data)

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not parsed (pipelined, or after an upgrade's head); EOF."""
        raw = self._raw
        return (bytes(raw) if raw else b""), self._raw_closed

    def next_event(self) -> Any:
        """The next event, ``h11.NEED_DATA`` or ``h11.PAUSED``, as ``h11.Connection``.

        Raises:
            h11.RemoteProtocolError: the peer broke the protocol (their_state is then ERROR).
        """
        events = self._events
        state = self.their_state
        if events and (state is _IDLE or state is _SEND_BODY):
            event = events.popleft()
            kind = type(event)
            if kind is _DATA:
                self.they_are_waiting_for_100_continue = False
                return event
            if kind is _END:
                self._ends_queued -= 1
                self.they_are_waiting_for_100_continue = False
                self.their_state = _DONE
                if not self._keep_alive:
                    self._must_close()
                return event
            if kind is _REQUEST:
                self.their_state = _SEND_BODY
                if self.our_state is _IDLE:
                    self.our_state = _SEND_RESPONSE
                self.their_http_version = event.http_version
                self._request_method = event.method
                close, expect = self._flags.popleft()
                if close:
                    self._keep_alive = False
                # (HTTP/1.1 only: HTTP/1.0 expectations are ignored, RFC 9110 §10.1.1; a
                # client that also says Connection: close still waits for its 100, as h11 has it)
                if expect and event.http_version == b"1.1":
                    self.they_are_waiting_for_100_continue = True
                return event
            self.their_state = h11.ERROR
            raise event
        return self._no_queued_event(state)

    def _no_queued_event(self, state: Any) -> Any:
        """:meth:`next_event` when no event of the current request is queued."""
        if state is _ERROR:
            raise h11.RemoteProtocolError("Can't receive data when peer state is ERROR")
        events = self._events
        if state is _IDLE or state is _SEND_BODY:
            if self._raw and not self._ends_queued:
                raw = self._raw
                self._raw = bytearray()
                self._feed(raw)
                if events:
                    return self.next_event()
        elif (events or self._raw) and (state is _DONE or state is h11.MUST_CLOSE):
            return h11.PAUSED
        if self._raw_closed:
            if state is _SEND_BODY:
                self.their_state = h11.ERROR
                raise h11.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            if self._in_head:
                self.their_state = h11.ERROR
                raise h11.RemoteProtocolError("peer unexpectedly closed connection")
            self.their_state = h11.CLOSED
            return h11.ConnectionClosed()
        return _NEED_DATA

    def start_next_cycle(self) -> None:
        """Reset for the next request on a reusable connection (both sides DONE)."""
        if self.our_state is not _DONE or self.their_state is not _DONE:
            raise h11.LocalProtocolError(
                f"not in a reusable state (ours {self.our_state}, theirs {self.their_state})"
            )
        self.our_state = _IDLE
        self.their_state = _IDLE
        self._request_method = None
        self.they_are_waiting_for_100_continue = False
