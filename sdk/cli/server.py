"""``edgekit login|logout``, and the thin client of a fleet service's operator API (``--server URL`` / ``EDGEKIT_SERVER``).

Sessions opened by ``edgekit login`` are kept in ``$EDGEKIT_HOME/servers.json`` (mode 0600), one
per server URL; ``EDGEKIT_TOKEN`` (a session token, or the service's ``--token``) takes their
place for scripts. Every refusal of the service comes back as its one-line error.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

import typer

from ..atomic import atomic_write
from ..config import edgekit_home
from ..errors import AuthError, ConfigError, EdgekitError, PromotionRefusedError
from ._app import console, print_json

SERVER_ENV = "EDGEKIT_SERVER"
TOKEN_ENV = "EDGEKIT_TOKEN"
SERVER_HELP = (
    "A fleet service to act through (http://host:8765/): it holds the signing key and the registry; "
    "else $EDGEKIT_SERVER, else act here."
)


def _sessions_path() -> Path:
    return edgekit_home() / "servers.json"


def _normal(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"server URL {url!r}: use http://HOST:PORT/ or https://HOST/")
    return f"{parsed.scheme}://{parsed.netloc}/"


def _sessions() -> dict[str, Any]:
    try:
        doc = json.loads(_sessions_path().read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def remember(url: str, token: str, account: str, expires_at: str) -> None:
    doc = _sessions()
    doc[_normal(url)] = {"token": token, "account": account, "expires_at": expires_at}
    _sessions_path().parent.mkdir(parents=True, exist_ok=True)
    atomic_write(_sessions_path(), (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)


def forget(url: str) -> Optional[str]:
    doc = _sessions()
    gone = doc.pop(_normal(url), None)
    if gone is not None:
        atomic_write(_sessions_path(), (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)
    return None if gone is None else str(gone.get("token"))


class ServerClient:
    """Requests to one fleet service, signed in with the remembered session (or EDGEKIT_TOKEN)."""

    def __init__(self, url: str, token: Optional[str] = None) -> None:
        self.url = _normal(url)
        self.token = token or os.environ.get(TOKEN_ENV) or (_sessions().get(self.url) or {}).get("token")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Optional[dict[str, Any]] = None,
        body: Optional[bytes] = None,
        json_body: Any = None,
        timeout: float = 600.0,
        signed_in: bool = True,
    ) -> Any:
        if signed_in and not self.token:
            raise AuthError(f"not signed in to {self.url}; run `edgekit login --server {self.url}`")
        url = self.url + path.lstrip("/")
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        if signed_in and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise _refusal(exc, self.url) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(
                f"cannot reach the fleet service at {self.url} ({reason}); check --server or {SERVER_ENV}"
            ) from None


def _refusal(exc: urllib.error.HTTPError, url: str) -> EdgekitError:
    try:
        doc = json.loads(exc.read())
        message, code = str(doc["error"]), int(doc.get("exit_code", 1))
    except (ValueError, KeyError, TypeError):
        doc, message, code = {}, f"the fleet service at {url} answered {exc.code} {exc.reason}", 1
    if isinstance(doc.get("verdict"), dict):  # `shadow promote` refused: its verdict, for --json
        return PromotionRefusedError(message, doc["verdict"])
    if exc.code in (401, 403):
        hint = f"; run `edgekit login --server {url}`" if exc.code == 401 and "login" not in message else ""
        return AuthError(message + hint)
    error = EdgekitError(message)
    error.exit_code = code
    return error


def server_client(server: Optional[str]) -> Optional[ServerClient]:
    """The client of ``--server``, else ``$EDGEKIT_SERVER``; None to act here."""
    url = server or os.environ.get(SERVER_ENV)
    return ServerClient(url) if url else None


def read_password(prompt: str, from_stdin: bool, confirm: bool = False) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise ConfigError("no terminal to ask for the password on; pipe it in with --password-stdin")
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


def login(
    server: Optional[str] = typer.Option(
        None, "--server", help="The fleet service (http://host:8765/); else $EDGEKIT_SERVER."
    ),
    account: str = typer.Option(
        ..., "--account", help="Your account on it (`edgekit fleet user add` made it)."
    ),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from stdin (scripts)."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print the session's account, role and expiry as JSON."
    ),
) -> None:
    """Sign in to a fleet service; later commands with --server (or $EDGEKIT_SERVER) act through it."""
    url = server or os.environ.get(SERVER_ENV)
    if not url:
        raise ConfigError(f"which fleet service? give --server URL or set {SERVER_ENV}")
    client = ServerClient(url)
    password = read_password(f"Password for {account} on {client.url}", password_stdin)
    doc = client.request(
        "POST", "api/v1/login", json_body={"account": account, "password": password}, signed_in=False
    )
    remember(client.url, doc["token"], doc["account"], doc["expires_at"])
    if json_out:
        print_json(
            {
                "server": client.url,
                "account": doc["account"],
                "role": doc["role"],
                "expires_at": doc["expires_at"],
            }
        )
    else:
        console.print(
            f"signed in to {client.url} as {doc['account']} ({doc['role']}) until {doc['expires_at'][:10]}"
        )


def logout(
    server: Optional[str] = typer.Option(None, "--server", help="The fleet service; else $EDGEKIT_SERVER."),
) -> None:
    """End your session on a fleet service and forget it here."""
    url = server or os.environ.get(SERVER_ENV)
    if not url:
        raise ConfigError(f"which fleet service? give --server URL or set {SERVER_ENV}")
    client = ServerClient(url)
    token = forget(client.url)
    if token is None:
        console.print(f"not signed in to {client.url}")
        return
    with contextlib.suppress(EdgekitError):  # an expired or removed session: forgotten here all the same
        ServerClient(url, token).request("POST", "api/v1/logout")
    console.print(f"signed out of {client.url}")
