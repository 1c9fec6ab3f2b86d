"""The workstation's catalog of bundles: ``$EDGEKIT_HOME/bundles/NAME/VERSION.ekb``.

``edgekit push`` keeps a copy of everything it ships here, so ``edgekit push NAME`` ships the
newest version of NAME and a fleet can be rolled back to a version by name
(``edgekit fleet rollback --to 1.2.0``). Bundles are verified when added and when read.
"""

from __future__ import annotations

import re
from pathlib import Path

from .atomic import atomic_write
from .bundle import Bundle, read_bundle
from .errors import BundleError
from .manifest import parse_version
from .trust import TrustedKeys

__all__ = ["Catalog"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Catalog:
    def __init__(self, home: Path, trusted: TrustedKeys) -> None:
        self.root = home / "bundles"
        self.trusted = trusted

    def add(self, source: Path) -> tuple[Path, Bundle]:
        """Verify the bundle file ``source`` and keep a copy; returns the copy and the bundle."""
        data = Path(source).read_bytes()
        bundle = read_bundle(data, self.trusted)
        path = self.root / bundle.manifest.name / f"{bundle.manifest.version}.ekb"
        if path.exists():
            if read_bundle(path, self.trusted).bundle_id != bundle.bundle_id:
                raise BundleError(
                    f"the catalog already holds a different {bundle.manifest.label} ({path}); "
                    "give the new bundle a new version: versions are never reused"
                )
            return path, bundle
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        return path, bundle

    def read(self, name: str, version: str | None = None) -> tuple[Path, Bundle]:
        path = self.path(name, version)
        return path, read_bundle(path, self.trusted)

    def find(self, bundle_id: str) -> tuple[Path, Bundle] | None:
        """The catalogued bundle whose id is ``bundle_id``, if any."""
        for name in self.names():
            for version in self.versions(name):
                path, bundle = self.read(name, version)
                if bundle.bundle_id == bundle_id:
                    return path, bundle
        return None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[str]:
        """Versions of ``name``, oldest first (semantic version order)."""
        folder = self.root / name
        if not _NAME.match(name) or not folder.is_dir():
            return []
        found = []
        for path in folder.glob("*.ekb"):
            try:
                parse_version(path.stem)
            except ValueError:
                continue
            found.append(path.stem)
        return sorted(found, key=parse_version)

    def path(self, name: str, version: str | None = None) -> Path:
        """The bundle ``name`` at ``version`` (default: the newest); BundleError if absent."""
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise BundleError(f"no bundle named {name!r} in the catalog {self.root} (known: {known})")
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise BundleError(f"the catalog has no {name}@{version} (versions: {', '.join(versions)})")
        return self.root / name / f"{version}.ekb"

    def next_version(self, name: str) -> str:
        """The next patch version after the newest of ``name``, or 1.0.0."""
        versions = self.versions(name)
        if not versions:
            return "1.0.0"
        major, minor, patch, _ = parse_version(versions[-1])
        return f"{major}.{minor}.{patch + 1}"
