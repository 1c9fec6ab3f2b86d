"""Where the workstation keeps its state, and TOML loading with errors that name the file.

``EDGEKIT_HOME`` (default ``~/.edgekit``) holds the signing keys (``keys/``) and, in later
components, the local bundle store and the workstation config.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the 3.9 device interpreter
    import tomli as tomllib

__all__ = ["HOME_ENV", "WorkstationConfig", "edgekit_home", "load_toml"]

HOME_ENV = "EDGEKIT_HOME"


def edgekit_home() -> Path:
    """``$EDGEKIT_HOME``, else ``~/.edgekit``."""
    return Path(os.environ.get(HOME_ENV) or "~/.edgekit").expanduser()


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a ConfigError naming it."""
    try:
        with open(path, "rb") as handle:
            doc: dict[str, Any] = tomllib.load(handle)
            return doc
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


BROKER_ENV = "EDGEKIT_BROKER"
REGISTRY_ENV = "EDGEKIT_REGISTRY"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True)
class WorkstationConfig:
    """Where the workstation finds the fleet: flags, else ``EDGEKIT_*`` variables, else
    ``$EDGEKIT_HOME/config.toml`` (``broker = "..."``, ``registry = "..."``), else defaults
    (a local broker; a SQLite registry under ``$EDGEKIT_HOME``)."""

    home: Path
    broker: str
    registry: str

    @classmethod
    def load(cls, broker: str | None = None, registry: str | None = None) -> WorkstationConfig:
        home = edgekit_home()
        path = home / "config.toml"
        file: dict[str, Any] = load_toml(path) if path.exists() else {}
        for key in ("broker", "registry"):
            if key in file and not isinstance(file[key], str):
                raise ConfigError(f"{path}: {key} must be a string URL")
        return cls(
            home=home,
            broker=broker or os.environ.get(BROKER_ENV) or file.get("broker") or DEFAULT_BROKER,
            registry=registry
            or os.environ.get(REGISTRY_ENV)
            or file.get("registry")
            or f"sqlite:///{home / 'registry.db'}",
        )
