"""The FastAPI app of the ``json``, ``file1m`` and ``static`` scenarios: a small JSON
object, a 1 MiB file through ``FileResponse`` and 16 KiB files through ``StaticFiles``.

The files are made at import, in a directory of their own under the temporary directory
(each written under a temporary name, then renamed: worker processes import this at once).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

FILES = Path(tempfile.gettempdir()) / "trioserve-bench-files"
SIZES = {"f1m.bin": 1024 * 1024, "f16k.bin": 16 * 1024, "f16k-2.bin": 16 * 1024}


def _make_files() -> None:
    FILES.mkdir(exist_ok=True)
    for name, size in SIZES.items():
        path = FILES / name
        if not path.exists() or path.stat().st_size != size:
            partial = FILES / f".{name}.{os.getpid()}"
            partial.write_bytes(os.urandom(size))
            partial.replace(path)


_make_files()

app = FastAPI()


@app.get("/json")
async def json_endpoint() -> dict[str, object]:
    return {"message": "Hello, world!", "items": [1, 2, 3], "ok": True}


@app.get("/file1m")
async def file1m() -> FileResponse:
    return FileResponse(FILES / "f1m.bin")


app.mount("/static", StaticFiles(directory=FILES), name="static")
