from __future__ import annotations

from conftest import hello_app, run_server
from wire import Client, connect, header


async def test_hello_keep_alive_two_requests_same_connection() -> None:
    async with run_server(hello_app) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            client = Client(stream)
            for _ in range(2):
                response, body = await client.request()
                assert response.status_code == 200
                assert response.reason == b"OK"
                assert body == b"Hello, world!"
                assert header(response, b"content-length") == b"13"
                assert header(response, b"server") == b"trioserve"
