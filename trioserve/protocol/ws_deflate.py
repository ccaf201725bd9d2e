"""permessage-deflate bounded by ``--ws-max-size`` (layer 2: wsproto, never trio).

wsproto's ``PerMessageDeflate`` inflates what it receives without a bound; the subclass
here caps each message at the size the server accepts, so a small compressed frame cannot
become a large allocation ("zip bomb"). ``connection.websocket`` offers it in the accept.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol


class BoundedPerMessageDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate, never inflating a message past ``--ws-max-size``.

    wsproto (1.x) inflates each received chunk of a compressed frame whole, with zlib's
    ``decompress`` and no ``max_length``: deflate reaches ~1000:1, so one 64 KiB read of a
    crafted message would become ~64 MiB before :class:`MessageAssembler` could count it.
    Here every chunk is inflated to at most the room left in the message plus one byte;
    reaching that byte fails the connection with 1009 at once, so no message ever holds
    more than ``max_size + 1`` inflated bytes. (This overrides wsproto's payload hook and
    reads its decompression state; tests/test_websocket_wire.py pins the behaviour.)
    """

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self._max_size = max_size
        self._inflated = 0  # bytes inflated so far in the current message

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        room = self._max_size - self._inflated
        try:  # max_length >= 1 (0 would mean "unbounded")
            inflated = self._decompressor.decompress(bytes(data), room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(inflated) > room:
            return CloseReason.MESSAGE_TOO_BIG
        self._inflated += len(inflated)
        return inflated

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if fin:
            self._inflated = 0
        return super().frame_inbound_complete(proto, fin)

    def accept_any_client_window(self) -> None:
        """Once negotiated: inflate with the largest window, which decodes any smaller
        window too, so a client that cannot honour a small ``client_max_window_bits`` is
        still read."""
        self.client_max_window_bits = 15
