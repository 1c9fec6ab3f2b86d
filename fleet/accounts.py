"""Who may use the fleet service: accounts with a role, and the sessions they sign in to.

- ``viewer`` may look (every ``GET`` of the API and the dashboard); ``operator`` may also act
  (push, abort, resume, roll back).
- Passwords are hashed with scrypt (``hashlib.scrypt``, RFC 7914; n=2**14, r=8, p=1, a 16-byte
  salt); only the hash is stored.
- Signing in (``POST /api/v1/login``, ``edgekit login``) opens a session: a random 32-byte
  bearer token, of which the registry keeps only the SHA-256, valid for ``SESSION_DAYS`` days.
  A session of an account that is removed, or whose password changes, ends at once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from base64 import b64decode, b64encode
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

from edgekit.errors import AuthError, ConfigError
from sqlalchemy import delete, select

from .registry import Registry
from .registry.models import Account, ApiSession

__all__ = ["ROLES", "Accounts", "Identity"]

ROLES = ("viewer", "operator")
SESSION_DAYS = 30.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


@dataclass(frozen=True)
class Identity:
    """Who a request comes from."""

    name: str
    role: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64encode(salt).decode()}${b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, b64decode(digest))


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password("no such account")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Accounts:
    """The accounts and sessions of one registry database."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def add(self, name: str, role: str, password: str) -> None:
        """Create ``name``, or change its role and password (its sessions end)."""
        if not _NAME.match(name):
            raise ConfigError(
                f"account name {name!r}: use 1-64 letters, digits and . _ @ - (starting with a letter or digit)"
            )
        if role not in ROLES:
            raise ConfigError(f"role {role!r}: use one of {', '.join(ROLES)}")
        if len(password) < 8:
            raise ConfigError("a password needs at least 8 characters")
        with self.registry.session() as session:
            session.execute(delete(ApiSession).where(ApiSession.account == name))
            row = session.get(Account, name)
            if row is None:
                session.add(
                    Account(
                        name=name,
                        role=role,
                        password_hash=hash_password(password),
                        created_at=datetime.now(timezone.utc),
                    )
                )
            else:
                row.role, row.password_hash = role, hash_password(password)
            session.commit()

    def remove(self, name: str) -> None:
        with self.registry.session() as session:
            if session.get(Account, name) is None:
                raise ConfigError(f"no account named {name!r}; `edgekit fleet user list` shows them")
            session.execute(delete(ApiSession).where(ApiSession.account == name))
            session.execute(delete(Account).where(Account.name == name))
            session.commit()

    def list(self) -> list[Account]:
        with self.registry.session() as session:
            return list(session.scalars(select(Account).order_by(Account.name)))

    def sign_in(self, name: str, password: str, days: float = SESSION_DAYS) -> tuple[str, datetime]:
        """A new session's bearer token and its expiry; AuthError for a wrong name or password
        (the same message for both: the error does not tell which accounts exist)."""
        with self.registry.session() as session:
            account = session.get(Account, name)
            if account is None or not check_password(password, account.password_hash):
                raise AuthError("wrong account name or password")
            token = secrets.token_urlsafe(32)
            now = datetime.now(timezone.utc)
            expires = now + timedelta(days=days)
            session.add(
                ApiSession(token_hash=_token_hash(token), account=name, created_at=now, expires_at=expires)
            )
            session.commit()
        return token, expires

    def identify(self, token: str) -> Identity:
        """The account behind a bearer token; AuthError if it is unknown or expired."""
        with self.registry.session() as session:
            row = session.get(ApiSession, _token_hash(token))
            if row is None:
                raise AuthError(
                    "this session is not known to the fleet service (signed out, or the account changed)"
                )
            expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=timezone.utc)
            if expires <= datetime.now(timezone.utc):
                session.delete(row)
                session.commit()
                raise AuthError("this session expired")
            account = session.get(Account, row.account)
            if account is None:
                raise AuthError("the account of this session was removed")
            return Identity(account.name, account.role)

    def check(self, name: str, password: str) -> Optional[Identity]:
        """Who ``name`` is, if ``password`` is theirs (the dashboard's sign-in; it keeps its own
        cookie session). An unknown name costs the same scrypt as a wrong password."""
        with self.registry.session() as session:
            account = session.get(Account, name)
            stored = account.password_hash if account is not None else _dummy_hash()
        if check_password(password, stored) and account is not None:
            return Identity(account.name, account.role)
        return None

    def role_of(self, name: str) -> Optional[str]:
        """The account's role now (None: no such account), read on every dashboard request, so
        removing an account or changing its role takes effect at once."""
        found = self.find(name)
        return found.role if found is not None else None

    def any(self) -> bool:
        with self.registry.session() as session:
            return session.execute(select(Account.name).limit(1)).first() is not None

    def sign_out(self, token: str) -> None:
        with self.registry.session() as session:
            session.execute(delete(ApiSession).where(ApiSession.token_hash == _token_hash(token)))
            session.commit()

    def count(self) -> int:
        return len(self.list())

    def find(self, name: str) -> Optional[Account]:
        with self.registry.session() as session:
            return session.get(Account, name)
