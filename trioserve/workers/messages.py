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
        return cls(event=data["event"], kind=data.get("kind"), error=data.get("error"))
