"""Config: every server option, validated once, never mutated (layer 1, stdlib only).

``Config`` is the single place options are described: each field carries its CLI help in
``metadata`` and ``cli.py`` builds its click options from these fields, so the option list is
written once (uvicorn writes it four times). The CLI, :func:`trioserve.run` and the worker
processes all construct ``Config(...)``, so there is one validator.

No I/O happens here: binding sockets, reading ``--env-file`` / ``--log-config`` and importing
the app belong to ``listeners``, ``logs`` and ``app_loading``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .access_format import compile_access_format
from .config_checks import (
    check_choice,
    check_positive,
    check_range,
    check_simple_types,
    check_ws_engine,
    parse_header,
    websockets_installed,
)
from .errors import ConfigError
from .metrics import require_prometheus_client

LOG_LEVELS: Final = ("critical", "error", "warning", "info", "debug", "trace")
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
LifespanMode = Literal["auto", "on", "off"]
WSMode = Literal["auto", "wsproto", "websockets", "none"]
WS_MODES: Final = ("auto", "wsproto", "websockets", "none")
# No "auto": guessing from the app's imports is process-global (sys.modules), misses lazy
# imports and cannot tell an optional aiohttp from a required asyncpg; the app_call hint
# names --app-loop asyncio when an app fails for want of asyncio.
AppLoop = Literal["trio", "asyncio"]
# How the app is called: "auto" tells ASGI 3 from ASGI 2 (app_loading.is_asgi2); "wsgi" runs
# a PEP 3333 app in worker threads (trioserve.wsgi). uvicorn's flag and values.
Interface = Literal["auto", "asgi3", "asgi2", "wsgi"]
INTERFACES: Final = ("auto", "asgi3", "asgi2", "wsgi")
HTTPImpl = Literal["auto", "h11", "httptools"]
LogFormat = Literal["text", "json"]

SERVER_NAME: Final = "trioserve"


def _opt(
    help: str,
    *,
    flag: str | None = None,
    multiple: bool = False,
    choices: tuple[str, ...] | None = None,
    envvar: tuple[str, ...] = (),
    metavar: str | None = None,
) -> dict[str, Any]:
    """CLI description of a Config field (consumed by ``cli.py``)."""
    return {
        "help": help,
        "flag": flag,
        "multiple": multiple,
        "choices": choices,
        "envvar": envvar,
        "metavar": metavar,
    }


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """Validated server configuration.

    Field names follow uvicorn's where the meaning is the same. Times are float seconds,
    sizes are bytes. Construct with keywords; ``dataclasses.replace(config, port=0)``
    re-validates.

    Raises:
        ConfigError: naming the field and the bad value.
    """

    # -- where to listen -------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata=_opt("Bind socket to this host."))
    port: int = field(default=8000, metadata=_opt("Bind socket to this port (0: a free port)."))
    uds: str | None = field(default=None, metadata=_opt("Bind to a UNIX domain socket."))
    fd: int | None = field(default=None, metadata=_opt("Bind to socket from this file descriptor."))
    backlog: int = field(default=2048, metadata=_opt("Maximum number of pending connections."))
    reuse_port: bool = field(
        default=False,
        metadata=_opt(
            "Each worker binds its own listening socket with SO_REUSEPORT and the kernel "
            "spreads new connections over them (the parent holds no listener)."
        ),
    )
    # -- the application ----------------------------------------------------------------
    app_dir: str = field(
        default=".",
        metadata=_opt("Look for APP in this directory, by adding it to the PYTHONPATH."),
    )
    factory: bool = field(
        default=False,
        metadata=_opt("Treat APP as an application factory, i.e. a () -> <ASGI app> callable."),
    )
    root_path: str = field(
        default="", metadata=_opt("Set the ASGI 'root_path' for apps mounted below a path.")
    )
    lifespan: LifespanMode = field(
        default="auto", metadata=_opt("Lifespan implementation.", choices=("auto", "on", "off"))
    )
    app_loop: AppLoop = field(
        default="trio",
        metadata=_opt(
            "Event loop the app runs on: trio natively, or asyncio through trio-asyncio "
            "(for apps using asyncio-only libraries; pip install 'trioserve[asyncio]').",
            choices=("trio", "asyncio"),
        ),
    )
    interface: Interface = field(
        default="auto",
        metadata=_opt(
            "Application interface: auto (ASGI 3 or ASGI 2, detected), asgi3, asgi2, or wsgi "
            "(a PEP 3333 app, run in up to 40 worker threads).",
            choices=INTERFACES,
        ),
    )
    http: HTTPImpl = field(
        default="h11",
        metadata=_opt(
            "HTTP/1.1 parser: h11 (pure Python), httptools (llhttp in C, about twice the "
            "speed; pip install 'trioserve[fast]'), or auto (httptools when installed).",
            choices=("auto", "h11", "httptools"),
        ),
    )
    env_file: str | None = field(default=None, metadata=_opt("Environment configuration file."))
    # -- logging -----------------------------------------------------------------------
    log_level: LogLevel | None = field(
        default=None, metadata=_opt("Log level. [default: info]", choices=LOG_LEVELS)
    )
    access_log: bool = field(
        default=True,
        metadata=_opt("Enable/Disable access log.", flag="--access-log/--no-access-log"),
    )
    # A dict (dictConfig) only from Python, as uvicorn's run(log_config=...) takes one. It
    # is left out of the hash (a dict has none); equality still compares it.
    log_config: str | dict[str, Any] | None = field(
        default=None,
        hash=False,
        metadata=_opt("Logging configuration file (.json, .yaml or .ini)."),
    )
    access_log_format: str | None = field(
        default=None,
        metadata=_opt(
            "Access line template with {field} placeholders: client, method, path, query, "
            "target, http_version, scheme, status, status_phrase, bytes, duration, "
            "duration_ms, request_id, {header:NAME} (see README). [default: uvicorn's line]"
        ),
    )
    log_format: LogFormat = field(
        default="text",
        metadata=_opt(
            "Log line format: text, or json (one JSON object per line).", choices=("text", "json")
        ),
    )
    use_colors: bool | None = field(
        default=None,
        metadata=_opt(
            "Enable/Disable colorized logging (default: only on a TTY).",
            flag="--use-colors/--no-use-colors",
        ),
    )
    # -- proxies and TLS -------------------------------------------------------------------
    proxy_headers: bool = field(
        default=True,
        metadata=_opt(
            "Enable/Disable X-Forwarded-For, X-Forwarded-Proto and Forwarded to set the "
            "client address and scheme (only from --forwarded-allow-ips peers).",
            flag="--proxy-headers/--no-proxy-headers",
        ),
    )
    forwarded_allow_ips: str = field(
        default="127.0.0.1,::1",
        metadata=_opt(
            "Comma-separated IPs and CIDR networks to trust with proxy headers; '*' trusts "
            "all, 'unix:' trusts UNIX-socket peers.",
            envvar=("FORWARDED_ALLOW_IPS",),
        ),
    )
    proxy_protocol: bool = field(
        default=False,
        metadata=_opt(
            "Require a PROXY protocol v1/v2 header on every connection.",
            flag="--proxy-protocol/--no-proxy-protocol",
        ),
    )
    ssl_keyfile: str | None = field(default=None, metadata=_opt("SSL key file."))
    ssl_certfile: str | None = field(default=None, metadata=_opt("SSL certificate file."))
    ssl_keyfile_password: str | None = field(default=None, metadata=_opt("SSL keyfile password."))
    ssl_cert_reqs: int = field(
        default=0,
        metadata=_opt(
            "Whether client certificate is required (0 none, 1 optional, 2 required; "
            "see stdlib ssl.CERT_*)."
        ),
    )
    ssl_ca_certs: str | None = field(
        default=None, metadata=_opt("CA certificates file for client certificates.")
    )
    ssl_ciphers: str | None = field(
        default=None,
        metadata=_opt("Ciphers to use (OpenSSL cipher list). [default: OpenSSL's]"),
    )
    # -- response headers --------------------------------------------------------------
    server_header: bool = field(
        default=True,
        metadata=_opt(
            "Enable/Disable default Server header.", flag="--server-header/--no-server-header"
        ),
    )
    date_header: bool = field(
        default=True,
        metadata=_opt("Enable/Disable default Date header.", flag="--date-header/--no-date-header"),
    )
    headers: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata=_opt(
            "Specify custom default HTTP response headers as a Name:Value pair.",
            flag="--header",
            multiple=True,
            metavar="NAME:VALUE",
        ),
    )
    # -- limits and timeouts -----------------------------------------------------------
    timeout_keep_alive: float = field(
        default=5.0, metadata=_opt("Close Keep-Alive connections if no new request in this time.")
    )
    timeout_request_header: float = field(
        default=10.0,
        metadata=_opt("Drop a client that has not sent a complete request head in this time."),
    )
    timeout_request_body: float = field(
        default=60.0,
        metadata=_opt(
            "Give up on a request body when none of it arrives for this long while the app "
            "waits for it: the app gets http.disconnect, the client 408 (0: no limit)."
        ),
    )
    timeout_graceful_shutdown: float | None = field(
        default=None,
        metadata=_opt(
            "Maximum seconds to wait for in-flight requests on shutdown (default: no limit)."
        ),
    )
    limit_concurrency: int | None = field(
        default=None,
        metadata=_opt(
            "Maximum number of concurrent requests (WebSocket sessions included) before "
            "answering HTTP 503."
        ),
    )
    limit_max_requests: int | None = field(
        default=None, metadata=_opt("Maximum number of requests to serve before terminating.")
    )
    limit_max_requests_jitter: int = field(
        default=0,
        metadata=_opt("Up to this many extra requests added randomly to --limit-max-requests."),
    )
    h11_max_incomplete_event_size: int = field(
        default=16 * 1024,
        metadata=_opt("Maximum size of a request head in bytes (431 beyond it)."),
    )
    limit_request_body: int = field(
        default=100 * 1024 * 1024,
        metadata=_opt(
            "Maximum size of a request body in bytes: a larger declared Content-Length is "
            "answered 413 without calling the app, a longer chunked body is cut off with "
            "413 (0: no limit)."
        ),
    )
    # -- HTTP/2 ---------------------------------------------------------------------------
    http2: bool = field(
        default=True,
        metadata=_opt(
            "Enable/Disable HTTP/2: ALPN h2 over TLS, prior knowledge and Upgrade: h2c on "
            "cleartext (HTTP/1.1 clients are served either way).",
            flag="--http2/--no-http2",
        ),
    )
    h2_max_concurrent_streams: int = field(
        default=100,
        metadata=_opt(
            "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: streams open at once per connection."
        ),
    )
    h2_max_header_list_size: int = field(
        default=64 * 1024,
        metadata=_opt(
            "HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: the largest decoded request head in bytes."
        ),
    )
    h2_initial_window_size: int = field(
        default=1024 * 1024,
        metadata=_opt(
            "HTTP/2 receive window per stream in bytes (the RFC default is 65535; a larger "
            "one lets an upload go faster than 64 KiB per round trip)."
        ),
    )
    h2_max_inbound_frame_size: int = field(
        default=16 * 1024,
        metadata=_opt("HTTP/2 SETTINGS_MAX_FRAME_SIZE: the largest frame payload accepted."),
    )
    # -- operating many instances: admin listener, metrics, readiness ---------------------
    admin_bind: str | None = field(
        default=None,
        metadata=_opt(
            "Serve GET /livez, /readyz and /metrics on this HOST:PORT (a listener of its own, "
            "never the app's; pip install 'trioserve[metrics]').",
            metavar="HOST:PORT",
        ),
    )
    admin_uds: str | None = field(
        default=None, metadata=_opt("Serve the admin endpoints on this UNIX domain socket.")
    )
    metrics: bool = field(
        default=False,
        metadata=_opt(
            "Count requests for /metrics (always on with --admin-bind/--admin-uds; on its "
            "own for embedders reading Server.metrics).",
            flag="--metrics/--no-metrics",
        ),
    )
    shutdown_delay: float = field(
        default=0.0,
        metadata=_opt(
            "On SIGTERM, first report not ready (/readyz 503) and keep serving normally for "
            "this many seconds, then drain (a built-in Kubernetes preStop sleep)."
        ),
    )
    # -- WebSocket ------------------------------------------------------------------------
    ws: WSMode = field(
        default="auto",
        metadata=_opt(
            "WebSocket protocol implementation: auto (websockets when installed, else "
            "wsproto), wsproto, websockets (its sans-IO protocol, C speedups) or none.",
            choices=WS_MODES,
        ),
    )
    ws_max_size: int = field(
        default=16 * 1024 * 1024, metadata=_opt("WebSocket max size message in bytes.")
    )
    ws_max_queue: int = field(
        default=32, metadata=_opt("The maximum length of the WebSocket message queue.")
    )
    ws_ping_interval: float | None = field(
        default=20.0, metadata=_opt("WebSocket ping interval in seconds.")
    )
    ws_ping_timeout: float | None = field(
        default=20.0, metadata=_opt("WebSocket ping timeout in seconds.")
    )
    ws_per_message_deflate: bool = field(
        default=True,
        metadata=_opt(
            "WebSocket per-message-deflate compression.", flag="--ws-per-message-deflate"
        ),
    )
    # -- processes ------------------------------------------------------------------------
    workers: int = field(
        default=1,
        metadata=_opt(
            "Number of worker processes.", envvar=("TRIOSERVE_WORKERS", "WEB_CONCURRENCY")
        ),
    )
    timeout_worker_healthcheck: float = field(
        default=5.0,
        metadata=_opt("Replace a worker whose event loop is blocked for longer than this."),
    )
    reload: bool = field(default=False, metadata=_opt("Enable auto-reload."))
    reload_dirs: tuple[str, ...] = field(
        default=(),
        metadata=_opt("Set reload directories explicitly.", flag="--reload-dir", multiple=True),
    )
    reload_includes: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "Set glob patterns to include while watching.", flag="--reload-include", multiple=True
        ),
    )
    reload_excludes: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "Set glob patterns to exclude while watching.", flag="--reload-exclude", multiple=True
        ),
    )
    reload_delay: float = field(
        default=0.25, metadata=_opt("Delay between previous and next check if reloading.")
    )

    def __post_init__(self) -> None:
        # Coerce list-like values (JSON round-trips turn tuples into lists) without mutating
        # semantics: the object is still frozen afterwards.
        for name in ("headers", "reload_dirs", "reload_includes", "reload_excludes"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "headers", tuple(parse_header(h) for h in self.headers))
        check_simple_types(self)
        check_range("port", self.port, 0, 65535)
        check_range("backlog", self.backlog, 1, 2**31 - 1)
        check_range("workers", self.workers, 1, 4096)
        check_range(
            "h11_max_incomplete_event_size", self.h11_max_incomplete_event_size, 1024, 2**31 - 1
        )
        check_range("ws_max_size", self.ws_max_size, 1, 2**63 - 1)
        check_range("ws_max_queue", self.ws_max_queue, 1, 2**31 - 1)
        check_range("limit_max_requests_jitter", self.limit_max_requests_jitter, 0, 2**31 - 1)
        check_range("limit_request_body", self.limit_request_body, 0, 2**63 - 1)
        # RFC 9113 §6.5.2: the window is at most 2^31-1, the frame size 2^14..2^24-1.
        check_range("h2_max_concurrent_streams", self.h2_max_concurrent_streams, 1, 2**31 - 1)
        check_range("h2_max_header_list_size", self.h2_max_header_list_size, 1024, 2**31 - 1)
        check_range("h2_initial_window_size", self.h2_initial_window_size, 65535, 2**31 - 1)
        check_range("h2_max_inbound_frame_size", self.h2_max_inbound_frame_size, 2**14, 2**24 - 1)
        for name in ("limit_concurrency", "limit_max_requests"):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, 1, 2**63 - 1)
        for name in (
            "timeout_keep_alive",
            "timeout_request_header",
            "timeout_worker_healthcheck",
            "reload_delay",
        ):
            check_positive(name, getattr(self, name))
        check_positive("timeout_request_body", self.timeout_request_body, allow_zero=True)
        for name in ("timeout_graceful_shutdown", "ws_ping_interval", "ws_ping_timeout"):
            value = getattr(self, name)
            if value is not None:
                check_positive(name, value, allow_zero=True)
        check_choice("lifespan", self.lifespan, ("auto", "on", "off"))
        check_choice("ws", self.ws, WS_MODES)
        check_ws_engine(self.ws)
        check_choice("app_loop", self.app_loop, ("trio", "asyncio"))
        check_choice("interface", self.interface, INTERFACES)
        check_choice("http", self.http, ("auto", "h11", "httptools"))
        if self.http == "httptools" and not _httptools_installed():
            raise ConfigError(
                "--http httptools needs httptools: pip install httptools (trioserve's [fast] extra)"
            )
        check_choice("log_format", self.log_format, ("text", "json"))
        self._check_admin()
        self._check_edge()
        if self.log_level is not None:
            check_choice("log_level", self.log_level, LOG_LEVELS)
        if not isinstance(self.log_config, (str, dict, type(None))):
            raise ConfigError(
                "log_config must be a file path or a logging.config.dictConfig dict, "
                f"got {self.log_config!r}"
            )
        if self.uds is not None and self.fd is not None:
            raise ConfigError("--uds and --fd are mutually exclusive")
        if self.reuse_port and (self.uds is not None or self.fd is not None):
            raise ConfigError("--reuse-port binds a TCP port: it cannot be used with --uds or --fd")
        if self.reuse_port and self.port == 0 and (self.workers > 1 or self.reload):
            raise ConfigError("--reuse-port needs a --port: with port 0 each worker gets another")
        if self.fd is not None and self.fd < 0:
            raise ConfigError(f"fd must be a non-negative file descriptor, got {self.fd}")
        if self.root_path and not self.root_path.startswith("/"):
            raise ConfigError(f"root_path must start with '/', got {self.root_path!r}")
        if self.root_path.endswith("/"):
            object.__setattr__(self, "root_path", self.root_path.rstrip("/"))
        if not self.host:
            raise ConfigError("host must not be empty")

    def _check_edge(self) -> None:
        """Proxy, TLS and access-format options (files are checked at startup, by tls.py)."""
        for entry in self.forwarded_allow_ips.split(","):
            entry = entry.strip()
            if entry in ("", "*", "unix:"):
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(
                    f"forwarded_allow_ips: {entry!r} is not an IP address, a CIDR network, "
                    "'*' or 'unix:'"
                ) from None
        check_range("ssl_cert_reqs", self.ssl_cert_reqs, 0, 2)
        if self.ssl_certfile is None:
            for name in ("ssl_keyfile", "ssl_keyfile_password", "ssl_ca_certs", "ssl_ciphers"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name.replace('_', '-')} needs --ssl-certfile")
            if self.ssl_cert_reqs:
                raise ConfigError("--ssl-cert-reqs needs --ssl-certfile")
        if self.ssl_cert_reqs and self.ssl_ca_certs is None:
            raise ConfigError("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs to verify clients")
        if self.access_log_format is not None:
            compile_access_format(self.access_log_format)

    def _check_admin(self) -> None:
        """Admin listener and metrics options (prometheus-client must be installed)."""
        check_positive("shutdown_delay", self.shutdown_delay, allow_zero=True)
        if self.admin_bind is not None and self.admin_uds is not None:
            raise ConfigError("--admin-bind and --admin-uds are mutually exclusive")
        if self.admin_bind is not None:
            _, port = self.admin_address
            if port == self.port and port != 0 and self.uds is None and self.fd is None:
                raise ConfigError(
                    f"admin_bind must not use the app's port {port}: the admin endpoints "
                    "get a listener of their own"
                )
        if self.admin_uds is not None and self.admin_uds == self.uds:
            raise ConfigError("admin_uds must not be the app's --uds socket")
        if self.collects_metrics:
            require_prometheus_client()

    @property
    def admin_address(self) -> tuple[str, int]:
        """``admin_bind`` as (host, port), IPv6 brackets removed.

        Raises:
            ConfigError: not HOST:PORT with a port between 0 and 65535.
        """
        host, sep, port = (self.admin_bind or "").rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(
                f"admin_bind must be HOST:PORT (e.g. 127.0.0.1:9000), got {self.admin_bind!r}"
            )
        return host, int(port)

    @property
    def has_admin(self) -> bool:
        """Whether an admin listener (/livez, /readyz, /metrics) is asked for."""
        return self.admin_bind is not None or self.admin_uds is not None

    @property
    def collects_metrics(self) -> bool:
        """Whether servers count requests (``metrics``, or an admin listener to show them)."""
        return self.metrics or self.has_admin

    @property
    def is_ssl(self) -> bool:
        """Whether connections speak TLS."""
        return self.ssl_certfile is not None

    # -- derived values (pure) ------------------------------------------------------------

    @property
    def bind_host(self) -> str:
        """The host without IPv6 brackets (``[::1]`` → ``::1``)."""
        host = self.host
        if host.startswith("[") and host.endswith("]"):
            return host[1:-1]
        return host

    @property
    def default_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Encoded ``--header`` values plus the Server header, Date excluded (it changes)."""
        out: list[tuple[bytes, bytes]] = []
        if self.server_header:
            out.append((b"server", SERVER_NAME.encode()))
        for name, value in self.headers:
            out.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        return tuple(out)

    @property
    def effective_log_level(self) -> LogLevel:
        return self.log_level or "info"

    def to_dict(self) -> dict[str, Any]:
        """Field values as JSON-able primitives (for worker processes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _httptools_installed() -> bool:
    return importlib.util.find_spec("httptools") is not None


def ws_implementation(choice: str) -> Literal["wsproto", "websockets"]:
    """The engine ``--ws`` names, ``auto`` resolved (websockets when it is installed)."""
    if choice == "websockets" or (choice == "auto" and websockets_installed()):
        return "websockets"
    return "wsproto"


def http_implementation(choice: str) -> Literal["h11", "httptools"]:
    """The parser ``--http`` names, ``auto`` resolved (httptools when it is installed)."""
    if choice == "httptools" or (choice == "auto" and _httptools_installed()):
        return "httptools"
    return "h11"
