"""Where the broker is: ``mqtt://`` / ``mqtts://`` URLs and TLS settings. No paho here."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import BrokerError

__all__ = ["DEFAULT_PORT", "DEFAULT_TLS_PORT", "PROTOCOLS", "BrokerAddress", "TlsConfig", "parse_broker_url"]

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
#: The MQTT versions edgekit speaks, as written in ``?protocol=`` and ``MqttClient(protocol=)``.
PROTOCOLS = ("5", "3.1.1")


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings for ``mqtts://``: a CA bundle to trust (None: the system's), and an
    optional client certificate and key (PEM) for brokers that require one."""

    ca_file: Optional[Path] = None
    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            ctx.check_hostname = self.check_hostname
            if self.cert_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(
                f"cannot load the TLS files ({exc}); check the CA, certificate and key paths"
            ) from None
        return ctx


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    protocol: Optional[str] = None  # "5" or "3.1.1" when the URL says (``?protocol=3.1.1``)


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port][?protocol=5|3.1.1]`` or ``mqtts://...``;
    BrokerError if malformed."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BrokerError(
            f"invalid broker URL {url!r} ({exc}); use mqtt://host:1883 or mqtts://host:8883"
        ) from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise BrokerError(f"invalid broker URL {url!r}; use mqtt://host:1883 or mqtts://host:8883")
    if parts.path not in ("", "/") or parts.fragment:
        raise BrokerError(f"invalid broker URL {url!r}: it must not have a path")
    protocol = _url_protocol(url, parts.query)
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        protocol=protocol,
    )


def _url_protocol(url: str, query: str) -> Optional[str]:
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        params = [("", "")]
    if any(key != "protocol" for key, _ in params) or len(params) > 1:
        raise BrokerError(
            f"invalid broker URL {url!r}: the only query it may have is ?protocol=5 or ?protocol=3.1.1"
        )
    if not params:
        return None
    value = params[0][1]
    if value not in PROTOCOLS:
        raise BrokerError(f"invalid broker URL {url!r}: protocol must be 5 or 3.1.1, not {value!r}")
    return value
