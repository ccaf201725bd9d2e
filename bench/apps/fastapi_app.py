"""The FastAPI app of the ``json`` scenario: one endpoint returning a small JSON object."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/json")
async def json_endpoint() -> dict[str, object]:
    return {"message": "Hello, world!", "items": [1, 2, 3], "ok": True}
