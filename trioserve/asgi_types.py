"""The ASGI callables' types (layer 0, stdlib only).

Scopes and messages are plain dicts: ``Message`` is what ``receive()`` returns and
``send()`` takes. What an app passes to ``send()`` is untrusted input, checked field by
field where it is used (``protocol.http1_messages``, ``protocol.response_heads``,
``protocol.ws_messages``) before anything reaches the wire.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[Message]]
ASGISend = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], ASGIReceive, ASGISend], Awaitable[None]]
