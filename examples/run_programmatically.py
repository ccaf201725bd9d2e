"""Start trioserve from Python: ``trioserve.run(app, **options)``.

    python examples/run_programmatically.py [PORT]      # PORT 0: any free port

``run()`` takes an app object or an import string ("fastapi_app:app") and the same options
as the CLI (the ``Config`` fields). It configures logging, installs the SIGINT/SIGTERM
handlers (first signal: graceful drain, second: stop now) and returns once the server has
stopped. Errors are exceptions: ``ConfigError``, ``LifespanError``, ``OSError``...
"""

from __future__ import annotations

import sys
from typing import Any

import trioserve


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"Hello from trioserve.run()\n"})


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    trioserve.run(app, host="127.0.0.1", port=port, lifespan="off", log_level="info")
