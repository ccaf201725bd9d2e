"""The example app `make run` serves: JSON routes, streaming, a WebSocket and a lifespan.

Also a background task, a dependency with ``yield`` and a file response: what the
end-to-end test (tests/test_fastapi_example.py) checks against a real trioserve.

Run it with ``trioserve fastapi_app:app --app-dir examples`` (what ``make run`` does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import BackgroundTasks, Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, StreamingResponse


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
            await anyio.lowlevel.checkpoint()

    return StreamingResponse(numbers(), media_type="text/plain")


@app.post("/background")
async def background(request: Request, tasks: BackgroundTasks) -> dict[str, str]:
    log: list[str] = request.state.log
    tasks.add_task(log.append, "background task done")  # runs after the response is sent
    return {"status": "scheduled"}


@app.get("/log")
async def read_log(request: Request) -> list[str]:
    return list(request.state.log)


async def session(request: Request) -> AsyncIterator[dict[str, Any]]:
    """A dependency with ``yield``: the code after it runs once the request is done."""
    log: list[str] = request.state.log
    log.append("session opened")
    try:
        yield {"user": "alice"}
    finally:
        log.append("session closed")


@app.get("/me")
async def me(current: Annotated[dict[str, Any], Depends(session)]) -> dict[str, Any]:
    return current


@app.get("/source")
async def source() -> FileResponse:
    return FileResponse(__file__, media_type="text/x-python")


@app.websocket("/ws")
async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"echo: {text}")
    except WebSocketDisconnect:
        pass
