"""Trusted proxies and the forwarding headers they add (layer 2: pure, never trio).

A reverse proxy (nginx, HAProxy, a cloud load balancer, a Kubernetes ingress) connects to
trioserve itself, so the socket's peer is the proxy. The proxy reports the real client in
``X-Forwarded-For`` / ``X-Forwarded-Proto`` or in RFC 7239 ``Forwarded``. Anyone can send
those headers, so they are believed only when the *direct peer* is a trusted proxy
(``--forwarded-allow-ips``), and the chain is walked from the right:

    X-Forwarded-For: <client>, <proxy 1>, <proxy 2>      (the direct peer is proxy 3)

Each proxy appends the address it saw, so the rightmost entry was written by our trusted
peer. Walking right to left, every entry that is itself a trusted proxy is skipped; the
first untrusted entry is the client (RFC 7239 §7.4: only the hops you trust are facts).
If every entry is trusted the leftmost one is the client. An entry that cannot be parsed
(``unknown``, an obfuscated identifier, garbage) ends the walk: nothing left of it can be
verified, so the client is the last address that could be, and garbage never reaches the
scope. Malformed headers are ignored, never an error.

``Forwarded`` wins over ``X-Forwarded-*`` when both are present and it parses.
``X-Forwarded-Proto`` is used when it names ``http``, ``https``, ``ws`` or ``wss``; when it
lists one value per ``X-Forwarded-For`` entry, the client's entry is used, else the
rightmost value (the one our peer set).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES: Final = frozenset({"http", "https", "ws", "wss"})

UNIX_PEER: Final = "unix:"
HOP_CACHE_SIZE: Final = 4096


class TrustedHosts:
    """The set of peers whose forwarding headers are believed (``--forwarded-allow-ips``).

    Args:
        spec: a comma-separated string or an iterable of entries: IP addresses, CIDR
            networks (``10.0.0.0/8``, ``fd00::/8``), ``*`` (trust everyone) or ``unix:``
            (trust peers on a UNIX socket, which have no address).

    Raises:
        ValueError: an entry is neither of those (the message names it).
    """

    __slots__ = ("_hops", "_peers", "addresses", "everyone", "networks", "unix")

    def __init__(self, spec: str | Iterable[str]) -> None:
        entries = spec.split(",") if isinstance(spec, str) else spec
        self.everyone = False
        self.unix = False
        self.addresses: set[IPAddress] = set()
        self.networks: list[IPNetwork] = []
        self._hops: dict[str, tuple[Address, bool] | None] = {}
        self._peers: dict[str, bool] = {}
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if entry == "*":
                self.everyone = True
            elif entry == UNIX_PEER:
                self.unix = True
            else:
                try:
                    network = ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(
                        f"{entry!r} is not an IP address, a CIDR network, '*' or 'unix:'"
                    ) from None
                if network.num_addresses == 1:
                    self.addresses.add(network.network_address)
                else:
                    self.networks.append(network)

    def trusts_peer(self, host: str | None) -> bool:
        """Whether a direct peer may set forwarding headers; ``None`` is a UNIX-socket peer."""
        if self.everyone:
            return True
        if host is None:
            return self.unix
        # Asked once per accepted connection, mostly for the same few peers: remembered
        # (bounded, like hop()), since parsing with ipaddress costs microseconds.
        try:
            return self._peers[host]
        except KeyError:
            pass
        answer = self.trusts_ip(parse_ip(host))
        if len(self._peers) >= HOP_CACHE_SIZE:
            self._peers.clear()
        self._peers[host] = answer
        return answer

    def hop(self, text: str) -> tuple[Address, bool] | None:
        """A forwarded hop as (address, trusted), or None if it is not an address.

        A proxy sends the same few addresses over and over and ``ipaddress`` parsing costs
        microseconds, so answers are remembered (bounded: hostile input only resets it).
        """
        try:
            return self._hops[text]
        except KeyError:
            pass
        node = parse_node(text)
        answer = None if node is None else ((str(node[0]), node[1]), self.trusts_ip(node[0]))
        if len(self._hops) >= HOP_CACHE_SIZE:
            self._hops.clear()
        self._hops[text] = answer
        return answer

    def trusts_ip(self, ip: IPAddress | None) -> bool:
        if self.everyone:
            return True
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        if ip in self.addresses:
            return True
        return any(ip in network for network in self.networks)


def parse_ip(text: str) -> IPAddress | None:
    """An IP address (IPv6 with or without brackets), or None."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_node(text: str) -> tuple[IPAddress, int] | None:
    """Parse a hop: ``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]``, ``[::1]:80``.

    RFC 7239 §6 node syntax plus the bare IPv6 form ``X-Forwarded-For`` uses. Returns None
    for ``unknown``, obfuscated identifiers (``_hidden``) and anything malformed. A missing
    port is 0.
    """
    text = text.strip()
    if not text:
        return None
    port = 0
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            return None
        if rest:
            if not rest.startswith(":"):
                return None
            parsed_port = _parse_port(rest[1:])
            if parsed_port is None:
                return None
            port = parsed_port
        ip = parse_ip(host)
        return None if ip is None or ip.version != 6 else (ip, port)
    if text.count(":") == 1:  # IPv4 with a port
        text, _, port_text = text.partition(":")
        parsed_port = _parse_port(port_text)
        if parsed_port is None:
            return None
        port = parsed_port
    ip = parse_ip(text)
    return None if ip is None else (ip, port)


def _parse_port(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if port <= 65535 else None


def parse_forwarded(values: Sequence[str]) -> list[dict[str, str]] | None:
    """Parse RFC 7239 ``Forwarded`` header values into elements (left to right).

    ``forwarded-element = [ forwarded-pair ] *( ";" [ forwarded-pair ] )``,
    ``forwarded-pair = token "=" value``, ``value = token / quoted-string`` (§4). Parameter
    names are case-insensitive and lower-cased here; a name may appear once per element.

    Returns:
        The elements, or None when the header is malformed anywhere (then it is ignored).
    """
    elements: list[dict[str, str]] = []
    for value in values:
        current: dict[str, str] = {}
        i, n = 0, len(value)
        while True:
            while i < n and value[i] in " \t":
                i += 1
            start = i
            while i < n and value[i] not in '=;, \t"':
                i += 1
            name = value[start:i].lower()
            if name:
                if i >= n or value[i] != "=" or name in current:
                    return None
                i += 1
                if i < n and value[i] == '"':
                    i += 1
                    chars: list[str] = []
                    while i < n and value[i] != '"':
                        if value[i] == "\\" and i + 1 < n:
                            i += 1
                        chars.append(value[i])
                        i += 1
                    if i >= n:
                        return None  # unterminated quoted-string
                    i += 1
                    current[name] = "".join(chars)
                else:
                    start = i
                    while i < n and value[i] not in ';, \t"':
                        i += 1
                    if start == i:
                        return None
                    current[name] = value[start:i]
                while i < n and value[i] in " \t":
                    i += 1
            if i >= n:
                if current:
                    elements.append(current)
                break
            if value[i] == ";":
                i += 1
            elif value[i] == ",":
                if current:
                    elements.append(current)
                current = {}
                i += 1
            else:
                return None
    return elements


def resolve_forwarded(
    headers: Iterable[tuple[bytes, bytes]], trusted: TrustedHosts
) -> tuple[Address | None, str | None]:
    """The client address and scheme the forwarding headers report.

    Call only when the direct peer is trusted. Returns ``(None, None)`` parts for whatever
    the headers do not (validly) say.
    """
    forwarded: list[str] = []
    xff: list[str] = []
    xfp: list[str] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff.append(value.decode("latin-1"))
        elif name == b"x-forwarded-proto":
            xfp.append(value.decode("latin-1"))
        elif name == b"forwarded":
            forwarded.append(value.decode("latin-1"))
    if not (forwarded or xff or xfp):
        return None, None  # the common case, even behind a proxy that sends none
    if forwarded:
        elements = parse_forwarded(forwarded)
        if elements:
            hops = [element.get("for", "") for element in elements]
            index, client = _walk(hops, trusted)
            element = elements[index if index is not None else -1]
            return client, _scheme(element.get("proto"))
    hops = [hop for value in xff for hop in value.split(",")]
    index, client = _walk(hops, trusted)
    scheme = None
    if xfp:
        protos = [proto for value in xfp for proto in value.split(",")]
        if index is not None and len(protos) == len(hops):
            scheme = _scheme(protos[index])
        else:
            scheme = _scheme(protos[-1])
    return client, scheme


def _walk(hops: Sequence[str], trusted: TrustedHosts) -> tuple[int | None, Address | None]:
    """Right to left: skip trusted proxies, stop at the first untrusted or unparsable hop."""
    found: tuple[int | None, Address | None] = (None, None)
    for index in range(len(hops) - 1, -1, -1):
        hop = trusted.hop(hops[index])
        if hop is None:
            break
        address, is_trusted = hop
        found = (index, address)
        if not is_trusted:
            break
    return found


def _scheme(value: str | None) -> str | None:
    if value is None:
        return None
    scheme = value.strip().lower()
    return scheme if scheme in SCHEMES else None
