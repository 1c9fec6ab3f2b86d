"""Dashboard accounts, sign-in sessions, CSRF tokens, and the audit log of actions.

- **Accounts** live in the registry (``dashboard_users``): a name, a role (``viewer`` reads,
  ``operator`` also acts) and a scrypt hash of the password (``hashlib.scrypt``, n=2**14, r=8,
  p=1, a random 16-byte salt); the password itself is never stored. ``edgekit fleet user add``.
- **Sessions** are a cookie ``NAME|EXPIRES|MAC``, the MAC an HMAC-SHA256 under a secret key
  kept in ``$EDGEKIT_HOME/dashboard/session.key`` (mode 0600; a fresh random key per process
  when there is no home, so sessions end with the service). A session carries no role: the
  role is read from the registry on each request, so removing an account or changing its role
  takes effect at once.
- **CSRF**: every state-changing request from a session must carry ``X-CSRF-Token``, an HMAC
  of the session cookie under the same key, which the page gets from ``/api/session``. A
  cross-site form cannot read it, and cannot send the header.
- **Audit log** (``audit_log``): every action asked for, from the dashboard or the CLI, with
  who, when, what, and the result (``ok``, ``refused``, ``failed``), refusals included.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgekit.atomic import atomic_write
from edgekit.errors import ConfigError
from sqlalchemy import delete, select

from .registry import Registry
from .registry.models import AuditEntry, DashboardUser
from .registry.views import iso

__all__ = ["ROLES", "Accounts", "Sessions", "audit", "audit_json", "audit_log"]

ROLES = ("viewer", "operator")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
SESSION_SECONDS = 12 * 3600


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, dklen=32, maxmem=64 * 2**20, **_SCRYPT)


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    encode = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${encode(salt).decode()}${encode(_hash(password, salt)).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, _n, salt, digest = stored.split("$")
        wanted = base64.b64decode(digest)
        return kind == "scrypt" and hmac.compare_digest(_hash(password, base64.b64decode(salt)), wanted)
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class User:
    name: str
    role: str


class Accounts:
    """The dashboard's accounts in one registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def add(self, name: str, role: str, password: str, now: datetime) -> User:
        if role not in ROLES:
            raise ConfigError(f"--role {role}: use viewer (sees the fleet) or operator (also acts on it)")
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_.@" for c in name):
            raise ConfigError(f"user name {name!r}: use up to 64 letters, digits, '-', '_', '.' or '@'")
        if len(password) < 10:
            raise ConfigError("the password is too short: use at least 10 characters")
        with self.registry.session() as session, session.begin():
            if session.get(DashboardUser, name) is not None:
                raise ConfigError(f"there is already a user {name}; remove it first to change it")
            session.add(
                DashboardUser(name=name, role=role, password_hash=hash_password(password), created_at=now)
            )
        return User(name, role)

    def remove(self, name: str) -> None:
        with self.registry.session() as session, session.begin():
            if session.execute(delete(DashboardUser).where(DashboardUser.name == name)).rowcount == 0:  # type: ignore[attr-defined]
                raise ConfigError(f"no user {name!r}; `edgekit fleet user list` shows them")

    def users(self) -> list[User]:
        with self.registry.session() as session:
            rows = session.execute(
                select(DashboardUser.name, DashboardUser.role).order_by(DashboardUser.name)
            )
            return [User(name, role) for name, role in rows]

    def any(self) -> bool:
        with self.registry.session() as session:
            return session.execute(select(DashboardUser.name).limit(1)).first() is not None

    def role_of(self, name: str) -> str | None:
        with self.registry.session() as session:
            row = session.get(DashboardUser, name)
            return row.role if row is not None else None

    def check(self, name: str, password: str) -> User | None:
        """The user, if ``password`` is theirs (a missing user costs the same time)."""
        with self.registry.session() as session:
            row = session.get(DashboardUser, name)
            stored = row.password_hash if row is not None else hash_password("timing")
        if verify_password(password, stored) and row is not None:
            return User(row.name, row.role)
        return None


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
        """The user a session cookie names, if it is genuine and not expired."""
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


def audit(
    registry: Registry,
    now: datetime,
    actor: str,
    via: str,
    action: str,
    target: str | None,
    result: str,
    detail: str | None = None,
) -> None:
    """Add one line to the audit log."""
    with registry.session() as session, session.begin():
        session.add(
            AuditEntry(
                at=now, actor=actor[:64], via=via, action=action, target=target, result=result, detail=detail
            )
        )


def audit_log(registry: Registry, limit: int = 100) -> list[AuditEntry]:
    with registry.session() as session:
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        return list(session.execute(query).scalars())


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": iso(entry.at),
        "actor": entry.actor,
        "via": entry.via,
        "action": entry.action,
        "target": entry.target,
        "result": entry.result,
        "detail": entry.detail,
    }
