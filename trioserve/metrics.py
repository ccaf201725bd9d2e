"""What a server counts for ``/metrics``, and its Prometheus exposition (layer 1, stdlib only).

The hot path never touches prometheus_client. Each ``serve()`` with metrics on owns one
:class:`ServerMetrics`: plain ints (and one float) in ``__slots__``, incremented in place
by the connection code, so a request costs a few attribute increments, two dict look-ups
and a list slot's increment, done inline where its response completes (no method call:
the budget is 3 % of the instructions of a hello request, ~4,800). Its duration is timed
from the clock read its Date header already made. What can be derived from numbers the
server keeps anyway (open connections, requests in flight, keep-alive reuses) is derived
at scrape time instead. Nothing is locked: one trio thread owns the object.

At scrape time the numbers become a *sample*: a flat ``{key: number}`` dict, JSON-able, so
a worker process sends it to its parent with every heartbeat and the parent adds up the
samples of its workers (:func:`add_sample`). A key is a family name from :data:`FAMILIES`,
followed by its label values, ``|``-separated (``"requests|GET|2xx|1.1"``); the histogram's
keys are ``"request_duration_seconds|bucket|<le>"`` and ``"request_duration_seconds|sum"``.
A counter of a worker that exited stays in its parent's totals (counters are monotonic over
worker restarts); its gauges go with it.

:func:`render` turns a sample into the Prometheus text format with a one-shot collector
(prometheus_client, the ``trioserve[metrics]`` extra, imported only there).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from .access_format import CLIENT_CLOSED_REQUEST
from .errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

PREFIX: Final = "trioserve_"
# Request duration histogram bounds in seconds (Prometheus' client defaults, plus 30 s).
DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
)
# The methods counted by name; any other (a client's invention) is "other", so that a peer
# cannot grow the label set without bound.
KNOWN_METHODS: Final = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"CONNECT", b"TRACE"}
)
# status -> its class's label (at scrape time). A request that got no response is "none":
# the client left first (the access log's 499, CLIENT_CLOSED_REQUEST, never sent) or no
# status was recorded (None); so is a status past 599 (an app may send up to 999).
STATUS_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
_STATUS_CLASS: Final[dict[int | None, str]] = {
    status: "none" if status == CLIENT_CLOSED_REQUEST else STATUS_CLASSES[status // 100]
    for status in range(100, 600)
}
PROTOCOL_ERROR_STATUSES: Final = (400, 408, 413, 414, 431, 501, 505)
# Requests are counted per status in a list of this many slots (ServerMetrics.requests);
# slot 0 holds the statuses of the "none" class that have no slot (None, 600-999).
STATUS_SLOTS: Final = 600
OTHER_METHOD: Final = b"other"  # (the key of the methods not in KNOWN_METHODS)

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class Family:
    """One metric family as exposed (``trioserve_`` + name; a counter gains ``_total``)."""

    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()


FAMILIES: Final = (
    Family("requests", "counter", "HTTP requests answered.", ("method", "status", "http_version")),
    Family("requests_in_flight", "gauge", "HTTP requests whose app call is running."),
    Family("websocket_sessions", "counter", "WebSocket sessions accepted."),
    Family("websockets_in_flight", "gauge", "WebSocket sessions open."),
    Family("connections", "counter", "Connections accepted."),
    Family("connections_open", "gauge", "Connections open."),
    Family("keepalive_reuses", "counter", "Requests served on an already used connection."),
    Family("received_bytes", "counter", "Bytes read from clients."),
    Family("sent_bytes", "counter", "Bytes written to clients."),
    Family("concurrency_rejections", "counter", "Requests answered 503 by --limit-concurrency."),
    Family(
        "protocol_errors",
        "counter",
        "Malformed requests answered with an error status.",
        ("status",),
    ),
    Family("tls_handshake_failures", "counter", "TLS handshakes that failed."),
    Family("draining", "gauge", "1 from the moment a shutdown was asked for (readiness off)."),
    Family("worker_starts", "counter", "Worker processes started."),
    Family("worker_restarts", "counter", "Worker processes started beyond the first --workers."),
    Family("worker_exits", "counter", "Worker processes that exited, by cause.", ("cause",)),
    Family("worker_healthcheck_failures", "counter", "Workers found blocked (no heartbeat)."),
    Family("workers", "gauge", "Worker processes running."),
)
_KIND: Final = {f.name: f.kind for f in FAMILIES}
HISTOGRAM: Final = "request_duration_seconds"

Sample = dict[str, float]


def require_prometheus_client() -> None:
    """Raise ConfigError when the ``trioserve[metrics]`` extra is not installed.

    Found, not imported: a process that never renders a scrape (a worker, whose parent
    renders; ``--metrics`` alone) never loads it, nor its imports (http.server, wsgiref...).
    """
    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(
            "metrics and --admin-bind/--admin-uds need prometheus-client: "
            "pip install 'trioserve[metrics]'"
        )


class ServerMetrics:
    """The counters of one server, kept as plain numbers and incremented in place.

    The connection code adds to the attributes directly (``metrics.sent_bytes += n``),
    each hook behind one ``if metrics is not None`` (metrics off cost nothing more):

    * ``connection.stream.ConnectionStream``: ``received_bytes`` and ``sent_bytes`` at
      every read and write (what HTTP/1.1 and WebSocket read and write: after TLS
      decryption, without a PROXY header; ``connection.http1`` adds the first bytes
      ``connection.edge`` read for it); ``connection.http2`` counts the same at its
      own reads and writes (it frames the raw stream, without a ``ConnectionStream``);
    * ``server.serve_connection``: ``connections`` at accept, and
      ``connections_setting_up`` until the connection has joined the live ones (PROXY
      header, TLS handshake, HTTP/2 preface); ``connection.edge``:
      ``tls_handshake_failures``;
    * ``connection.request_cycle.RequestCycle``: ``requests`` and the duration histogram
      where a response completes, the access-log point (inline there; a label set seen
      for the first time goes through :meth:`count_new_labels`);
    * ``connection.http1``: ``first_requests`` (once per connection),
      ``concurrency_rejections`` and :meth:`protocol_error`; ``connection.http2``:
      ``h2_streams``; ``connection.websocket``: ``websocket_sessions`` and
      ``websockets_in_flight``.

    Open connections are not counted per connection: they are the server's set of live
    connections (``live_connections``, which its drain needs anyway) plus those still in
    set-up, read at scrape time. Nor are requests in flight: they are the app calls
    running (``app_calls()``, the ``--limit-concurrency`` count, kept anyway) less the
    WebSocket sessions among them (a handshake not accepted yet counts as a request). As
    in Prometheus' own client libraries, a request is in flight while its app call runs
    (a ``BackgroundTasks`` tail after its response too). Nor are keep-alive reuses: they
    are the app calls admitted (``admitted()``, ``ServerState.total_requests``) and the
    requests refused by ``--limit-concurrency``, less each HTTP/1.1 connection's first
    request and the HTTP/2 streams (see ``__init__``).
    """

    __slots__ = (
        "admitted",
        "app_calls",
        "concurrency_rejections",
        "connections",
        "connections_setting_up",
        "draining",
        "duration_buckets",
        "duration_sum",
        "first_requests",
        "h2_streams",
        "live_connections",
        "protocol_errors",
        "received_bytes",
        "requests",
        "sent_bytes",
        "tls_handshake_failures",
        "websocket_sessions",
        "websockets_in_flight",
    )

    def __init__(
        self,
        live_connections: Sized = (),
        app_calls: Callable[[], int] = lambda: 0,
        admitted: Callable[[], int] = lambda: 0,
    ) -> None:
        # Requests answered, {http_version: {method: counts}}, ``counts[status]`` (a list
        # of STATUS_SLOTS; slot 0 counts the "none" class past 599 or without a status):
        # the request's own method bytes and the scope's version string, no tuple key to
        # build and hash; a list slot is cheaper to increment than a dict entry. The status
        # classes and label keys are made at scrape time (sample()).
        self.requests: dict[str, dict[bytes, list[int]]] = {}
        # Requests per duration bucket, the last one +Inf; the first (the fastest, most
        # requests) is not counted but derived in sample(): the requests counted less those
        # of the other buckets. (An increment per request is 7 % of the metrics budget.)
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.app_calls = app_calls  # (ServerState.active_requests: HTTP and WebSocket)
        self.websocket_sessions = 0
        self.websockets_in_flight = 0
        self.connections = 0
        self.connections_setting_up = 0
        self.live_connections = live_connections
        # Keep-alive reuses are not counted per request but derived in sample(): the app
        # calls admitted (ServerState.total_requests, kept anyway) and the requests refused
        # by --limit-concurrency, less the first request of each HTTP/1.1 connection
        # (first_requests) and the HTTP/2 streams (h2_streams: not keep-alive; the stream
        # of an h2c upgrade is its HTTP/1.1 request, not counted there).
        self.admitted = admitted
        self.first_requests = 0
        self.h2_streams = 0
        self.received_bytes = 0
        self.sent_bytes = 0
        self.concurrency_rejections = 0
        self.protocol_errors: dict[int, int] = {}
        self.tls_handshake_failures = 0
        self.draining = 0

    def count_new_labels(self, method: bytes, http_version: str, status: int | None) -> None:
        """Count a request that the inline count (``RequestCycle._finish``) did not place:
        a method or version seen for the first time, or a status with no slot of its own
        (none, or past 599: the "none" class, slot 0). A method a client made up counts as
        "other" (and comes here each time: the label set stays small, whatever clients
        send)."""
        methods = self.requests.setdefault(http_version, {})
        known = method in KNOWN_METHODS
        counts = methods.setdefault(method if known else OTHER_METHOD, [0] * STATUS_SLOTS)
        counts[status if status is not None and status < STATUS_SLOTS else 0] += 1

    def protocol_error(self, status: int) -> None:
        """Count a malformed request answered with ``status`` (400, 413, 431, 501...)."""
        self.protocol_errors[status] = self.protocol_errors.get(status, 0) + 1

    def sample(self) -> Sample:
        """The numbers now, as a flat JSON-able dict (see the module docstring)."""
        out: Sample = {}
        answered = 0
        for version, methods in self.requests.items():
            for method, counts in methods.items():
                name = method.decode("latin-1")
                for status, count in enumerate(counts):
                    if count:
                        label = _STATUS_CLASS.get(status, "none")
                        key = f"requests|{name}|{label}|{version}"
                        out[key] = out.get(key, 0) + count
                        answered += count
        for status, count in self.protocol_errors.items():
            out[f"protocol_errors|{status}"] = count
        cumulative = 0
        buckets = [answered - sum(self.duration_buckets[1:]), *self.duration_buckets[1:]]
        for bound, count in zip((*DURATION_BUCKETS, "+Inf"), buckets, strict=True):
            cumulative += count
            out[f"{HISTOGRAM}|bucket|{bound}"] = cumulative
        out[f"{HISTOGRAM}|sum"] = self.duration_sum
        out["connections_open"] = self.connections_setting_up + len(self.live_connections)
        # (A session's app call ends just after it leaves websockets_in_flight: never < 0.)
        out["requests_in_flight"] = max(0, self.app_calls() - self.websockets_in_flight)
        # (Each term changes with the one it pairs with, in one step of the same task: a
        # first request is counted just before it is admitted or refused.)
        out["keepalive_reuses"] = max(
            0,
            self.admitted() + self.concurrency_rejections - self.h2_streams - self.first_requests,
        )
        for name in (
            "websocket_sessions",
            "websockets_in_flight",
            "connections",
            "received_bytes",
            "sent_bytes",
            "concurrency_rejections",
            "tls_handshake_failures",
            "draining",
        ):
            out[name] = getattr(self, name)
        return out


def is_gauge(key: str) -> bool:
    return _KIND.get(key.partition("|")[0]) == "gauge"


def add_sample(total: Sample, sample: Mapping[str, float], *, counters_only: bool = False) -> None:
    """Add ``sample`` into ``total`` in place; ``counters_only`` drops the gauges (the
    sample of a worker that exited: its counters stay, its in-flight numbers do not)."""
    for key, value in sample.items():
        if counters_only and is_gauge(key):
            continue
        total[key] = total.get(key, 0) + value


def check_sample(data: object) -> Sample:
    """Validate a sample that came over a worker's link.

    Raises:
        ValueError: not a ``{str: number}`` dict.
    """
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in data.items()
    ):
        raise ValueError(f"not a metrics sample: {data!r:.200}")
    return data


def render(sample: Mapping[str, float]) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``sample``, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SampleCollector(sample))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _SampleCollector:
    """A prometheus_client collector that exposes one sample (built per scrape)."""

    def __init__(self, sample: Mapping[str, float]) -> None:
        self.sample = sample

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        by_family: dict[str, list[tuple[list[str], float]]] = {}
        for key, value in self.sample.items():
            name, *labels = key.split("|")
            by_family.setdefault(name, []).append((labels, value))
        for family in FAMILIES:
            maker = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            metric = maker(PREFIX + family.name, family.doc, labels=family.labels)
            for labels, value in sorted(by_family.get(family.name, [])):
                if len(labels) == len(family.labels):
                    metric.add_metric(labels, value)
            if family.labels or family.name in by_family:
                yield metric
        histogram = by_family.get(HISTOGRAM)
        if histogram:
            buckets = sorted(
                ((labels[1], value) for labels, value in histogram if labels[0] == "bucket"),
                key=lambda bucket: float(bucket[0]),
            )
            total = sum(value for labels, value in histogram if labels[0] == "sum")
            durations = HistogramMetricFamily(
                PREFIX + HISTOGRAM, "Time from request head to complete response."
            )
            durations.add_metric([], buckets, sum_value=total)
            yield durations
