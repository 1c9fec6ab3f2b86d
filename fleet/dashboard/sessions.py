"""The dashboard's sign-in cookies and CSRF tokens (the accounts themselves, and their
passwords, are :mod:`edgekit.fleet.accounts`, shared with the operator API).

- A session is a cookie ``NAME|EXPIRES|MAC``, the MAC an HMAC-SHA256 under a secret key kept
  in ``$EDGEKIT_HOME/dashboard/session.key`` (mode 0600; a fresh random key per process when
  there is no home, so sessions end with the service). It carries no role: the role is read
  from the registry on each request, so removing an account or changing its role takes effect
  at once.
- **CSRF**: every state-changing request from a session must carry ``X-CSRF-Token``, an HMAC
  of the session cookie under the same key, which the page gets from ``/api/session``. A
  cross-site form cannot read it, and cannot send the header.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

from edgekit.atomic import atomic_write

__all__ = ["SESSION_SECONDS", "Sessions"]

SESSION_SECONDS = 12 * 3600


class Sessions:
    """Signed session cookies and their CSRF tokens."""

    def __init__(self, home: Path | None) -> None:
        self.key = self._key(home)

    @staticmethod
    def _key(home: Path | None) -> bytes:
        if home is None:
            return secrets.token_bytes(32)
        path = Path(home) / "dashboard" / "session.key"
        if path.exists():
            return path.read_bytes()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(32)
        atomic_write(path, key, mode=0o600)
        return key

    def _mac(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, name: str, now: float | None = None) -> str:
        body = f"{name}|{int((now or time.time()) + SESSION_SECONDS)}"
        return f"{body}|{self._mac(body)}"

    def user(self, cookie: str | None, now: float | None = None) -> str | None:
        """The account a session cookie names, if it is genuine and not expired."""
        if not cookie or cookie.count("|") != 2:
            return None
        name, expires, mac = cookie.split("|")
        if not hmac.compare_digest(mac, self._mac(f"{name}|{expires}")):
            return None
        try:
            if int(expires) < (now or time.time()):
                return None
        except ValueError:
            return None
        return name

    def csrf(self, cookie: str) -> str:
        return self._mac(f"csrf|{cookie}")

    def csrf_ok(self, cookie: str | None, token: str | None) -> bool:
        return bool(cookie and token) and hmac.compare_digest(self.csrf(cookie or ""), token or "")
