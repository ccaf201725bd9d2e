"""The example app `make run` serves: JSON routes, streaming, a WebSocket and a lifespan.

Run it with ``trioserve fastapi_app:app --app-dir examples`` (what ``make run`` does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import BackgroundTasks, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    # The dict becomes scope["state"] of every request (request.state in FastAPI).
    yield {"greeting": "Hello", "log": []}


app = FastAPI(title="trioserve example", lifespan=lifespan)


@app.get("/")
async def root(request: Request) -> dict[str, str]:
    return {"message": f"{request.state.greeting} from trioserve"}


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None) -> dict[str, Any]:
    return {"item_id": item_id, "q": q}


@app.post("/echo")
async def echo(payload: dict[str, Any]) -> dict[str, Any]:
    return {"received": payload}


@app.get("/stream")
async def stream(n: int = 5) -> StreamingResponse:
    async def numbers() -> AsyncIterator[bytes]:
        for i in range(n):
            yield f"chunk {i}\n".encode()
            await anyio.sleep(0)

    return StreamingResponse(numbers(), media_type="text/plain")


@app.post("/background")
async def background(request: Request, tasks: BackgroundTasks) -> dict[str, str]:
    log: list[str] = request.state.log
    tasks.add_task(log.append, "done")
    return {"status": "scheduled"}


@app.websocket("/ws")
async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"echo: {text}")
    except WebSocketDisconnect:
        pass
