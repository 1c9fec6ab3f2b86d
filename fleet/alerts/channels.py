"""Alert channels: email over SMTP and webhooks, how they are described, where their secrets
are kept, and how one message is sent through one.

A channel's public settings (addresses, SMTP host and user, the webhook's host) are in the
registry; its secrets (the SMTP password, the whole webhook URL, which for Slack *is* the
token) are in ``$EDGEKIT_HOME/alerts/secrets.json``, mode 0600, and are never printed: the CLI
and the dashboard show :func:`describe`.

SMTP URLs: ``smtp://[user@]host[:port]`` uses STARTTLS (port 587 by default) and refuses a
server that does not offer it; ``smtps://[user@]host[:port]`` is TLS from the first byte (port
465); ``?tls=none`` sends in clear text (a relay on the same machine only). ``?ca=PATH``
trusts that CA file instead of the system's. With a user, the password comes from the URL
(``user:password@``), ``$EDGEKIT_SMTP_PASSWORD`` or a prompt, and is stored as a secret.
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from edgekit.atomic import atomic_write
from edgekit.errors import ConfigError, DeliveryError

__all__ = [
    "ChannelSpec",
    "Secrets",
    "describe",
    "email_channel",
    "send",
    "webhook_channel",
]

EMAIL = "email"
WEBHOOK = "webhook"
#: Seconds one delivery may take (connect, talk, answer) before it counts as failed.
DEFAULT_TIMEOUT = 15.0
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True)
class ChannelSpec:
    """A channel to add: its name, kind, public settings and secrets."""

    name: str
    kind: str
    settings: Mapping[str, Any]
    secrets: Mapping[str, str]


def _check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name.lower()) <= _NAME_CHARS:
        raise ConfigError(f"channel name {name!r}: use up to 64 letters, digits, '-', '_' or '.'")
    return name


def _check_address(address: str, what: str) -> str:
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or "." not in domain or any(c in address for c in " <>,;\r\n"):
        raise ConfigError(f"{what} {address!r} is not an email address; write it like owner@example.com")
    return address


def email_channel(
    name: str,
    recipients: Sequence[str],
    smtp_url: str,
    sender: str | None = None,
    password: str | None = None,
    per_hour: int = 20,
) -> ChannelSpec:
    """An email channel to ``recipients`` through ``smtp_url``; ConfigError names a bad part."""
    if not recipients:
        raise ConfigError("an email channel needs at least one address: --email owner@example.com")
    to = [_check_address(r, "--email") for r in recipients]
    parts = urlsplit(smtp_url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ConfigError(
            f"--smtp {_safe(smtp_url)}: use smtp://[user@]host[:port] (STARTTLS) or smtps://[user@]host[:port] (TLS)"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--smtp {_safe(smtp_url)}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ConfigError(
            f"--smtp {_safe(smtp_url)}: name the mail server, e.g. smtp://user@mail.example.com:587"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    tls = query.pop("tls", "tls" if parts.scheme == "smtps" else "starttls")
    ca = query.pop("ca", None)
    if tls not in ("starttls", "tls", "none") or query:
        raise ConfigError(
            f"--smtp {_safe(smtp_url)}: the only options are ?tls=starttls|tls|none and ?ca=PATH"
        )
    if ca is not None and not Path(ca).is_file():
        raise ConfigError(f"--smtp ...?ca={ca}: no such CA file")
    user = unquote(parts.username) if parts.username else None
    secret = unquote(parts.password) if parts.password else password
    if user and not secret:
        raise ConfigError(
            f"--smtp names the user {user} but no password: set $EDGEKIT_SMTP_PASSWORD (or run on a terminal to be asked)"
        )
    settings = {
        "host": parts.hostname,
        "port": port or (465 if tls == "tls" else 587 if tls == "starttls" else 25),
        "tls": tls,
        "ca": str(Path(ca).resolve()) if ca else None,
        "user": user,
        "from": _check_address(sender, "--from") if sender else f"edgekit@{socket.getfqdn() or 'localhost'}",
        "to": to,
        "per_hour": per_hour,
    }
    return ChannelSpec(_check_name(name), EMAIL, settings, {"password": secret} if user and secret else {})


def webhook_channel(name: str, url: str, form: str | None = None, per_hour: int = 20) -> ChannelSpec:
    """A webhook channel; ``form`` "json" (the edgekit.alert document) or "text" (``{"text":
    ...}``, Slack and Mattermost); None: "text" for hooks.slack.com, else "json"."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--webhook {_safe(url)}: use an http:// or https:// URL, e.g. https://hooks.example.com/edgekit"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--webhook {_safe(url)}: the port must be a number from 1 to 65535") from None
    if form is None:
        form = "text" if parts.hostname.endswith("hooks.slack.com") else "json"
    if form not in ("json", "text"):
        raise ConfigError(
            f"--format {form}: use json (the edgekit.alert document) or text (Slack, Mattermost)"
        )
    settings = {
        "host": parts.hostname,
        "port": port,
        "scheme": parts.scheme,
        "form": form,
        "per_hour": per_hour,
    }
    return ChannelSpec(_check_name(name), WEBHOOK, settings, {"url": url})


def _safe(url: str) -> str:
    """A URL fit to print: no password, no path or query (a webhook's path is its token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(that URL)"
    user = f"{parts.username}@" if parts.username else ""
    tail = "/..." if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{user}{host}{port}{tail}" if parts.scheme else "(that URL)"


def describe(kind: str, settings: Mapping[str, Any]) -> str:
    """One line about a channel, without its secrets."""
    if kind == EMAIL:
        user = f"{settings['user']}@" if settings.get("user") else ""
        scheme = "smtps" if settings.get("tls") == "tls" else "smtp"
        tls = " (no TLS)" if settings.get("tls") == "none" else ""
        return f"mail to {', '.join(settings['to'])} via {scheme}://{user}{settings['host']}:{settings['port']}{tls}"
    form = " (text form)" if settings.get("form") == "text" else ""
    host = str(settings.get("host"))
    host = f"[{host}]" if ":" in host else host  # an IPv6 address, as it is written in a URL
    port = f":{settings['port']}" if settings.get("port") else ""
    return f"webhook to {settings.get('scheme', 'https')}://{host}{port}/...{form}"


class Secrets:
    """``$EDGEKIT_HOME/alerts/secrets.json``: each channel's secrets, readable by its owner only."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "alerts" / "secrets.json"

    def load(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{self.path} holds passwords and can be read by other users (mode {mode:o}); run chmod 600 {self.path}"
            )
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self.path} cannot be read ({exc}); remove it and add the channels again"
            ) from None
        return {str(k): dict(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def put(self, name: str, secrets: Mapping[str, str]) -> None:
        data = self.load()
        if secrets:
            data[name] = dict(secrets)
        else:
            data.pop(name, None)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode=0o600)

    def remove(self, name: str) -> None:
        if name in self.load():
            self.put(name, {})

    def get(self, name: str) -> dict[str, str]:
        return self.load().get(name, {})


def send(
    kind: str,
    settings: Mapping[str, Any],
    secrets: Mapping[str, str],
    message: Mapping[str, Any],
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Send ``message`` (subject, text, json) through one channel; DeliveryError says in one
    line why it did not go."""
    if kind == EMAIL:
        _send_mail(settings, secrets, message, timeout)
    elif kind == WEBHOOK:
        _post(settings, secrets, message, timeout)
    else:
        raise DeliveryError(f"unknown channel kind {kind!r}")


def _send_mail(
    settings: Mapping[str, Any], secrets: Mapping[str, str], message: Mapping[str, Any], timeout: float
) -> None:
    mail = EmailMessage()
    mail["Subject"] = str(message["subject"])
    mail["From"] = str(settings["from"])
    mail["To"] = ", ".join(settings["to"])
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain="edgekit")
    mail.set_content(str(message["text"]))
    host, port, tls = str(settings["host"]), int(settings["port"]), settings.get("tls")
    where = f"the mail server {host}:{port}"
    context = ssl.create_default_context(cafile=settings.get("ca"))
    try:
        smtp: smtplib.SMTP
        if tls == "tls":
            smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
        with smtp:
            if tls == "starttls":
                smtp.ehlo()
                if not smtp.has_extn("starttls"):
                    raise DeliveryError(
                        f"{where} does not offer STARTTLS; use smtps:// (port 465) or, for a local relay, ?tls=none"
                    )
                smtp.starttls(context=context)
                smtp.ehlo()
            if settings.get("user"):
                smtp.login(str(settings["user"]), secrets.get("password", ""))
            smtp.send_message(mail)
    except DeliveryError:
        raise
    except smtplib.SMTPAuthenticationError:
        raise DeliveryError(f"{where} refused the user {settings.get('user')} and its password") from None
    except smtplib.SMTPResponseException as exc:
        if exc.smtp_code < 0:  # not an SMTP reply at all
            raise DeliveryError(f"{where} does not speak SMTP (is it an SMTP server? right port?)") from None
        text = (
            exc.smtp_error.decode(errors="replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        raise DeliveryError(f"{where} refused the mail: {exc.smtp_code} {text.strip()}") from None
    except smtplib.SMTPRecipientsRefused as exc:
        raise DeliveryError(f"{where} refused the recipients {', '.join(exc.recipients)}") from None
    except smtplib.SMTPServerDisconnected as exc:
        if "timed out" in str(exc):
            raise DeliveryError(f"{where} did not answer within {timeout:g}s") from None
        raise DeliveryError(f"{where} closed the connection (is it an SMTP server? right port?)") from None
    except smtplib.SMTPException as exc:
        raise DeliveryError(f"{where} did not take the mail: {exc}") from None
    except ssl.SSLError as exc:
        raise DeliveryError(f"TLS with {where} failed ({exc.reason}); check the port and ?tls=") from None
    except (socket.timeout, TimeoutError):
        raise DeliveryError(f"{where} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise DeliveryError(f"cannot reach {where}: {exc.strerror or exc}") from None


def _post(
    settings: Mapping[str, Any], secrets: Mapping[str, str], message: Mapping[str, Any], timeout: float
) -> None:
    url = secrets.get("url")
    if not url:
        raise DeliveryError(
            "the webhook's URL is missing from the secrets file; remove the channel and add it again"
        )
    doc = {"text": message["json"]["text"]} if settings.get("form") == "text" else message["json"]
    request = urllib.request.Request(
        url,
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "edgekit-alerts"},
        method="POST",
    )
    where = f"the webhook {_safe(url)}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"{where} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise DeliveryError(f"{where} did not answer within {timeout:g}s") from None
        text = getattr(reason, "strerror", None) or str(reason)
        raise DeliveryError(f"cannot reach {where}: {text}") from None
    except (socket.timeout, TimeoutError):
        raise DeliveryError(f"{where} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise DeliveryError(f"{where} failed: {exc.strerror or exc}") from None
