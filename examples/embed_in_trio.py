"""trioserve inside your own trio program, beside a background task.

    python examples/embed_in_trio.py [PORT]        # PORT 0: any free port

``await nursery.start(trioserve.serve, app, config)`` returns once lifespan startup is done
and the socket listens, with a :class:`trioserve.Server` handle. ``serve()`` installs no
signal handlers: the program owns them. Here the first Ctrl-C (or SIGTERM) drains the
server gracefully (in-flight requests finish, lifespan shutdown runs), then the background
task is cancelled and the program exits 0; a second Ctrl-C stops at once (still exit 0).
A Ctrl-C the program could no longer receive (after its signal receiver closed) exits 130,
without a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import trio

import trioserve


class Ticker:
    """State shared by the background job and the app (plain objects: one thread, one loop)."""

    def __init__(self) -> None:
        self.ticks = 0


async def background_job(ticker: Ticker) -> None:
    """Stands for any work the program does besides serving HTTP."""
    while True:
        ticker.ticks += 1
        await trio.sleep(0.05)


def make_app(ticker: Ticker) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    print("app: lifespan shutdown", flush=True)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":  # an in-flight request that a drain lets finish
            print("app: slow request started", flush=True)
            await trio.sleep(0.5)
        body = f"ticks: {ticker.ticks}\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def stop_on_second_signal(signals: Any, scope: trio.CancelScope) -> None:
    # Keeps reading until cancelled: a signal left unread in the receiver would be
    # re-delivered when it closes, as a KeyboardInterrupt.
    async for _ in signals:
        print("another signal: stopping now", flush=True)
        scope.cancel()


async def main(port: int) -> None:
    ticker = Ticker()
    config = trioserve.Config(host="127.0.0.1", port=port, timeout_graceful_shutdown=10)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(background_job, ticker)
            server: trioserve.Server = await nursery.start(
                trioserve.serve, make_app(ticker), config
            )
            print(f"serving on {server.url}", flush=True)
            async for signum in signals:
                print(f"received {signal.Signals(signum).name}: draining", flush=True)
                break
            with trio.CancelScope() as drain:
                nursery.start_soon(stop_on_second_signal, signals, drain)
                await server.shutdown()  # returns once serve() has returned
            nursery.cancel_scope.cancel()  # the background job, and serve() after a 2nd signal
    print(f"stopped cleanly after {ticker.ticks} ticks", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
    except KeyboardInterrupt:  # a Ctrl-C while the receiver was not open (see above)
        print("interrupted", flush=True)
        sys.exit(130)
