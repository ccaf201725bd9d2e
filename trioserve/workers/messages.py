"""What the parent and its worker processes say to each other (layer 4, stdlib only).

The parent (:mod:`trioserve.workers.supervisor`) hands each worker a :class:`WorkerSpec` in the
``TRIOSERVE_WORKER`` environment variable; the worker (:mod:`trioserve.workers.worker`) reports back
over its link, one :class:`WorkerEvent` JSON object per line. Both sides import this module
only, so neither needs the other's code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from ..metrics import check_sample

SPEC_ENV: Final = "TRIOSERVE_WORKER"
FailureKind = Literal["load", "lifespan", "os"]
EventName = Literal["beat", "ready", "draining", "failed"]


@dataclass(frozen=True)
class WorkerSpec:
    """What the parent tells a worker (the ``TRIOSERVE_WORKER`` JSON)."""

    app: str
    config: dict[str, Any]
    link_fd: int
    stack_fd: int
    # Names of the socket-activated sockets it inherits at fds 3, 4, ... (LISTEN_FDNAMES).
    activated: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class WorkerEvent:
    """One status line from a worker to its parent."""

    event: EventName
    kind: FailureKind | None = None
    error: str | None = None
    # With metrics on, every beat (and the last line before exit) carries the worker's
    # counters (``trioserve.metrics.ServerMetrics.sample()``); the parent adds them up.
    stats: dict[str, float] | None = None

    def encode(self) -> bytes:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return json.dumps(fields).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> WorkerEvent:
        """Parse one line.

        Raises:
            ValueError: not a status line.
        """
        data = json.loads(line)
        if not isinstance(data, dict) or data.get("event") not in get_args(EventName):
            raise ValueError(f"not a worker status line: {line!r}")
        stats = data.get("stats")
        return cls(
            event=data["event"],
            kind=data.get("kind"),
            error=data.get("error"),
            stats=None if stats is None else check_sample(stats),
        )
