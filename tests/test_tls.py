"""TLS: handshake, scheme, the ASGI TLS extension, failures, timeouts and start-up errors."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import run_server
from cryptography.hazmat.primitives import serialization
from wire import Client, read_until_eof

from trioserve import Config
from trioserve.errors import ConfigError
from trioserve.protocol.proxy_protocol import encode_v2
from trioserve.tls import load_tls, rfc4514_name


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files for the server: cert chain, key, encrypted key, CA; and a client cert."""
    root = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {
        name: str(root / name)
        for name in ("cert.pem", "key.pem", "enc-key.pem", "ca.pem", "other-key.pem")
    }
    server.cert_chain_pems[0].write_to_path(paths["cert.pem"])
    server.private_key_pem.write_to_path(paths["key.pem"])
    ca.cert_pem.write_to_path(paths["ca.pem"])
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), password=None)
    Path(paths["enc-key.pem"]).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    ca.issue_cert("other.example").private_key_pem.write_to_path(paths["other-key.pem"])
    return paths


def tls_options(pki: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"ssl_certfile": pki["cert.pem"], "ssl_keyfile": pki["key.pem"], **extra}


async def scope_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = json.dumps(
        {
            "scheme": scope["scheme"],
            "client": scope["client"],
            "tls": scope["extensions"].get("tls"),
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


async def open_tls(server: Any, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(*server.addresses[0])
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1", https_compatible=True)
    with trio.fail_after(10):
        await stream.do_handshake()
    return stream


async def get_json(stream: trio.abc.Stream, client: Client | None = None) -> dict[str, Any]:
    client = client or Client(stream)  # type: ignore[arg-type]
    response, body = await client.request()
    assert response.status_code == 200
    result: dict[str, Any] = json.loads(body)
    return result


async def test_https_scope_has_scheme_and_tls_extension(
    ca: trustme.CA, pki: dict[str, str]
) -> None:
    async with run_server(scope_app, **tls_options(pki)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        stream = await open_tls(server, client_context(ca))
        async with stream:
            client = Client(stream)  # type: ignore[arg-type]
            seen = await get_json(stream, client)
            again = await get_json(stream, client)  # keep-alive: the same facts
    assert seen == again
    assert seen["scheme"] == "https"
    assert seen["client"][0] == "127.0.0.1"
    tls = seen["tls"]
    assert tls["server_cert"] == Path(pki["cert.pem"]).read_text()
    assert tls["client_cert_chain"] == []
    assert tls["client_cert_name"] is None
    assert tls["client_cert_error"] is None
    assert tls["tls_version"] == 0x0304
    assert tls["cipher_suite"] in (0x1301, 0x1302, 0x1303)


async def test_client_certificate_is_required_and_reported(
    ca: trustme.CA, pki: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    client_cert = ca.issue_cert("client@example.com", common_name="alice")
    options = tls_options(pki, ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=pki["ca.pem"])
    async with run_server(scope_app, **options) as server:
        stream = await open_tls(server, client_context(ca, client_cert))
        async with stream:
            tls = (await get_json(stream))["tls"]
        # Without a certificate the server refuses (TLS 1.3 reports it after the handshake).
        tcp = await trio.open_tcp_stream(*server.addresses[0])
        bare = trio.SSLStream(tcp, client_context(ca), server_hostname="127.0.0.1")
        async with bare:
            try:
                await bare.do_handshake()
                await bare.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = await read_until_eof(bare)
            except trio.BrokenResourceError:
                answer = b""
    assert answer == b""
    assert tls["client_cert_name"].startswith("CN=alice,OU=Testing cert")
    assert tls["client_cert_chain"] == [client_cert.cert_chain_pems[0].bytes().decode()]
    assert "TLS handshake failed" in caplog.text


async def test_plain_http_on_tls_port_is_logged_and_other_connections_go_on(
    ca: trustme.CA, pki: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    async with run_server(scope_app, **tls_options(pki)) as server:
        good = await open_tls(server, client_context(ca))
        async with good:
            client = Client(good)  # type: ignore[arg-type]
            await get_json(good, client)
            plain = await trio.open_tcp_stream(*server.addresses[0])
            async with plain:
                await plain.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                assert b"HTTP/1.1 200" not in await read_until_eof(plain)
            garbage = await trio.open_tcp_stream(*server.addresses[0])
            async with garbage:
                await garbage.send_all(b"\x16\x03\x01\x00\x05hello")
                await read_until_eof(garbage)
            assert (await get_json(good, client))["scheme"] == "https"
    assert "plain HTTP request sent to a TLS port" in caplog.text
    assert "TLS handshake failed" in caplog.text
    assert "Traceback" not in caplog.text


async def test_silent_client_is_dropped_after_handshake_timeout(
    autojump_clock: trio.testing.MockClock, pki: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    async with run_server(scope_app, timeout_request_header=4.0, **tls_options(pki)) as server:
        tcp = await trio.open_tcp_stream(*server.addresses[0])
        async with tcp:
            start = trio.current_time()
            assert await read_until_eof(tcp) == b""
            assert 4.0 <= trio.current_time() - start < 5.0
    assert "TLS handshake) timed out" in caplog.text


class _PrefixFirstWrite(trio.abc.Stream):
    """Client side: send a PROXY header in the same write as the TLS ClientHello."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data, self.prefix = self.prefix + bytes(data), b""
        await self.stream.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_proxy_protocol_header_then_tls_in_one_segment(
    ca: trustme.CA, pki: dict[str, str]
) -> None:
    async with run_server(scope_app, proxy_protocol=True, **tls_options(pki)) as server:
        tcp = await trio.open_tcp_stream(*server.addresses[0])
        header = encode_v2(("198.51.100.9", 4242), ("10.0.0.1", 443))
        stream = trio.SSLStream(
            _PrefixFirstWrite(tcp, header),
            client_context(ca),
            server_hostname="127.0.0.1",
            https_compatible=True,
        )
        async with stream:
            seen = await get_json(stream)
    assert seen["client"] == ["198.51.100.9", 4242]
    assert seen["scheme"] == "https"


# -- start-up errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ssl_keyfile": "k.pem"}, "--ssl-keyfile needs --ssl-certfile"),
        ({"ssl_ca_certs": "ca.pem"}, "--ssl-ca-certs needs --ssl-certfile"),
        ({"ssl_certfile": "c.pem", "ssl_cert_reqs": 2}, "needs --ssl-ca-certs"),
        ({"ssl_certfile": "c.pem", "ssl_cert_reqs": 3}, "ssl_cert_reqs must be between 0 and 2"),
    ],
)
def test_tls_option_combinations_are_checked_by_config(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ssl_certfile": "/nonexistent/cert.pem"}, "ssl_certfile not found: /nonexistent"),
        ({"ssl_keyfile": "/nonexistent/key.pem"}, "ssl_keyfile not found"),
        (
            {"ssl_keyfile": "enc-key.pem", "ssl_keyfile_password": "wrong"},
            "wrong --ssl-keyfile-password",
        ),
        ({"ssl_keyfile": "enc-key.pem"}, "is encrypted: give --ssl-keyfile-password"),
        ({"ssl_keyfile": "other-key.pem"}, "does not match ssl_certfile"),
        ({"ssl_keyfile": "ca.pem"}, "invalid ssl_certfile/ssl_keyfile"),
        ({"ssl_ciphers": "NO-SUCH-CIPHER"}, "no cipher matches 'NO-SUCH-CIPHER'"),
    ],
)
def test_tls_file_errors_are_clear_config_errors(
    pki: dict[str, str], options: dict[str, Any], message: str
) -> None:
    resolved = {k: pki.get(v, v) for k, v in options.items()}
    with pytest.raises(ConfigError, match=message):
        load_tls(Config(**tls_options(pki, **resolved)))


def test_encrypted_key_with_right_password_loads(pki: dict[str, str]) -> None:
    assert (
        load_tls(
            Config(
                **tls_options(pki, ssl_keyfile=pki["enc-key.pem"], ssl_keyfile_password="s3cret")
            )
        )
        is not None
    )


def test_cli_reports_wrong_password_in_one_line(pki: dict[str, str]) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trioserve",
            "conftest:hello_app",
            "--app-dir",
            "tests",
            "--port",
            "0",
            "--ssl-certfile",
            pki["cert.pem"],
            "--ssl-keyfile",
            pki["enc-key.pem"],
            "--ssl-keyfile-password",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot decrypt ssl_keyfile {pki['enc-key.pem']}: wrong --ssl-keyfile-password"
    )


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (((("commonName", "alice"),),), "CN=alice"),
        (
            ((("countryName", "US"),), (("organizationName", "A, B"),), (("commonName", "x"),)),
            "CN=x,O=A\\, B,C=US",
        ),
        (((("commonName", "a"), ("userId", "7")),), "CN=a+UID=7"),
        (((("commonName", " lead#"),),), "CN=\\ lead#"),
    ],
)
def test_rfc4514_name(subject: Any, expected: str) -> None:
    assert rfc4514_name(subject) == expected


async def test_websocket_over_tls_has_wss_scheme_and_tls_extension(
    ca: trustme.CA, pki: dict[str, str]
) -> None:
    import wsproto
    import wsproto.events as ws_events

    async def ws_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        tls = scope["extensions"]["tls"]
        text = json.dumps({"scheme": scope["scheme"], "tls_version": tls["tls_version"]})
        await send({"type": "websocket.send", "text": text})
        await send({"type": "websocket.close", "code": 1000})

    async with run_server(ws_app, **tls_options(pki)) as server:
        stream = await open_tls(server, client_context(ca))
        async with stream:
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            await stream.send_all(ws.send(ws_events.Request(host="x", target="/")))
            events: list[Any] = []
            with trio.fail_after(10):
                while not any(isinstance(e, ws_events.TextMessage) for e in events):
                    ws.receive_data(bytes(await stream.receive_some(65536)) or None)
                    events.extend(ws.events())
    assert isinstance(events[0], ws_events.AcceptConnection)
    [message] = [e for e in events if isinstance(e, ws_events.TextMessage)]
    assert json.loads(message.data) == {"scheme": "wss", "tls_version": 0x0304}


async def test_ssl_ciphers_restricts_what_tls12_clients_can_negotiate(
    ca: trustme.CA, pki: dict[str, str]
) -> None:
    aes128 = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
    aes256 = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"

    def tls12_client(ciphers: str) -> ssl.SSLContext:
        context = client_context(ca)
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # cipher lists do not cover TLS 1.3
        context.set_ciphers(ciphers)
        return context

    async with run_server(scope_app, **tls_options(pki, ssl_ciphers=aes128)) as server:
        stream = await open_tls(server, tls12_client(aes128))
        async with stream:
            tls = (await get_json(stream))["tls"]
        assert tls["tls_version"] == 0x0303
        assert tls["cipher_suite"] in (0xC02B, 0xC02F)  # the *-AES128-GCM-SHA256 suites
        tcp = await trio.open_tcp_stream(*server.addresses[0])
        refused = trio.SSLStream(tcp, tls12_client(aes256), server_hostname="127.0.0.1")
        async with refused:
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(10):
                await refused.do_handshake()
