"""TLS: the server's ``SSLContext`` from Config and the ASGI TLS extension (layer 1).

:func:`load_tls` runs once at startup (it reads the certificate and key files) and turns
every operator mistake into a :class:`ConfigError` naming the file: missing, unreadable,
not a certificate, a key that does not match, a wrong or missing password, a cipher list
OpenSSL rejects. :func:`tls_extension` builds the scope's ``extensions["tls"]`` (ASGI TLS
extension) once per connection, after the handshake.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any, Final

from .config import Config
from .errors import ConfigError

# ssl.SSLObject.version() → the TLS protocol number the ASGI TLS extension wants.
_TLS_VERSIONS: Final = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# RFC 4514 §3 short names for the attribute types Python's getpeercert() spells out.
_RDN_NAMES: Final = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """What every TLS connection of one server shares.

    Attributes:
        context: the server-side ``SSLContext``.
        server_cert: the PEM of our own certificate (``extensions["tls"]["server_cert"]``).
        cipher_ids: OpenSSL cipher name → IANA cipher suite number.
    """

    context: ssl.SSLContext
    server_cert: str | None
    cipher_ids: dict[str, int]


def load_tls(config: Config) -> TLSSettings | None:
    """Build the TLS settings for ``config``; None when TLS is off.

    Raises:
        ConfigError: a file is missing or invalid, the key password is wrong, the cipher
            list is rejected.
    """
    certfile = config.ssl_certfile
    if certfile is None:
        return None
    keyfile = config.ssl_keyfile
    for option, path in (
        ("ssl_certfile", certfile),
        ("ssl_keyfile", keyfile),
        ("ssl_ca_certs", config.ssl_ca_certs),
    ):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{option} not found: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    password = config.ssl_keyfile_password
    try:
        # Never let OpenSSL prompt on the terminal for a missing password.
        context.load_cert_chain(certfile, keyfile, password=password or _no_password)
    except ssl.SSLError as exc:
        raise ConfigError(_cert_chain_error(config, exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read ssl_certfile/ssl_keyfile: {exc}") from None
    except _PasswordNeededError:
        raise ConfigError(
            f"ssl_keyfile {keyfile or certfile} is encrypted: give --ssl-keyfile-password"
        ) from None
    context.verify_mode = ssl.VerifyMode(config.ssl_cert_reqs)
    if config.ssl_ca_certs is not None:
        try:
            context.load_verify_locations(config.ssl_ca_certs)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"invalid ssl_ca_certs {config.ssl_ca_certs}: {exc}") from None
    if config.ssl_ciphers is not None:
        try:
            context.set_ciphers(config.ssl_ciphers)
        except ssl.SSLError:
            raise ConfigError(f"ssl_ciphers: no cipher matches {config.ssl_ciphers!r}") from None
    if config.http2:
        # ALPN (RFC 7301): an HTTP/2 client picks h2, any other keeps HTTP/1.1 on the same
        # port (``connection.edge`` reads the choice after the handshake).
        context.set_alpn_protocols(["h2", "http/1.1"])
    cipher_ids = {c["name"]: c["id"] & 0xFFFF for c in context.get_ciphers()}
    return TLSSettings(context, _first_pem(certfile), cipher_ids)


class _PasswordNeededError(Exception):
    pass


def _no_password() -> str:
    raise _PasswordNeededError


def _cert_chain_error(config: Config, exc: ssl.SSLError) -> str:
    reason = (exc.reason or str(exc)).upper()
    key = config.ssl_keyfile or config.ssl_certfile
    # OpenSSL 3 often reports a wrong password only as "PEM lib": look at the key itself.
    if "DECRYPT" in reason or (config.ssl_keyfile_password and _is_encrypted(key)):
        return f"cannot decrypt ssl_keyfile {key}: wrong --ssl-keyfile-password"
    if "KEY_VALUES_MISMATCH" in reason:
        return f"ssl_keyfile {key} does not match ssl_certfile {config.ssl_certfile}"
    return f"invalid ssl_certfile/ssl_keyfile ({config.ssl_certfile}, {key}): {exc}"


def _is_encrypted(path: str | None) -> bool:
    try:
        with open(path or "", encoding="ascii", errors="replace") as file:
            return "ENCRYPTED" in file.read(1 << 20)
    except OSError:
        return False


def _first_pem(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read()
    except OSError:
        return None
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end_marker = "-----END CERTIFICATE-----"
    end = text.find(end_marker, begin)
    if begin < 0 or end < 0:
        return None
    return text[begin : end + len(end_marker)] + "\n"


def tls_extension(ssl_object: Any, settings: TLSSettings) -> dict[str, Any]:
    """The ASGI TLS extension for a connection whose handshake completed.

    ``client_cert_chain`` holds the verified chain where Python exposes it (3.13+),
    else the client's own certificate. ``client_cert_error`` is always None: with
    ``--ssl-cert-reqs`` 1 or 2 a certificate that fails verification fails the handshake.
    """
    chain: list[str] = []
    name: str | None = None
    leaf = ssl_object.getpeercert(binary_form=True)
    if leaf:
        getter = getattr(ssl_object, "get_verified_chain", None)
        ders = getter() if getter is not None else None
        chain = (
            [ssl.DER_cert_to_PEM_cert(d) for d in ders]
            if ders
            else [ssl.DER_cert_to_PEM_cert(leaf)]
        )
        decoded = ssl_object.getpeercert()
        if decoded:
            name = rfc4514_name(decoded.get("subject", ()))
    cipher = ssl_object.cipher()
    return {
        "server_cert": settings.server_cert,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": settings.cipher_ids.get(cipher[0]) if cipher else None,
    }


def rfc4514_name(subject: Any) -> str:
    """A ``getpeercert()`` subject as an RFC 4514 string (last RDN first)."""
    rdns = []
    for rdn in reversed(subject):
        rdns.append("+".join(f"{_RDN_NAMES.get(k, k)}={_escape_rdn(v)}" for k, v in rdn))
    return ",".join(rdns)


def _escape_rdn(value: str) -> str:
    # RFC 4514 §2.4.
    out = "".join("\\" + ch if ch in ',+"\\<>;' else ch for ch in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out
