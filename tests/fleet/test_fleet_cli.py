"""`edgekit fleet status|events` read the registry named by flag, environment or config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def edgekit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "edgekit"), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


def test_status_and_events_from_the_registry(registry, registry_url):
    status = json.loads(edgekit("fleet", "status", "--registry", registry_url, "--json").stdout)
    assert [(d["device"], d["online"], d["version"]) for d in status] == [
        ("door-1", True, "1.1.0"),
        ("cam-1", True, "1.1.0"),
        ("cam-2", False, "1.0.0"),
    ]  # ordered by fleet, then device
    shop = json.loads(
        edgekit("fleet", "status", "--fleet", "shop", "--json", env={"EDGEKIT_REGISTRY": registry_url}).stdout
    )
    assert {d["device"] for d in shop} == {"cam-1", "cam-2"}
    assert next(d for d in shop if d["device"] == "cam-1")["drifted"] is True
    table = edgekit("fleet", "status", "--registry", registry_url)
    assert table.returncode == 0 and "offline" in table.stdout and "drifted" in table.stdout
    assert "model affected: estimated accuracy 61% (52-70%)" in table.stdout
    door = next(d for d in status if d["device"] == "door-1")
    assert door["drift_severity"] == "model affected" and door["accuracy"]["estimate"] == 0.61
    events = json.loads(
        edgekit("fleet", "events", "--device", "cam-1", "--registry", registry_url, "--json").stdout
    )
    assert [e["message"] for e in events] == ["installed digits@1.1.0"]


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_registry_from_the_config_file(registry, edgekit_home):
    (edgekit_home / "config.toml").write_text(f'registry = "{registry.url}"\n')
    assert len(json.loads(edgekit("fleet", "status", "--json").stdout)) == 3
    (edgekit_home / "config.toml").write_text("registry = 5\n")
    bad = edgekit("fleet", "status")
    assert bad.returncode == 2 and "registry must be a string" in bad.stderr and "Traceback" not in bad.stderr


def test_unreachable_registries_are_one_line_errors(tmp_path):
    result = edgekit("fleet", "status", "--registry", "mysql://x@localhost/db")
    assert (
        result.returncode == 2
        and result.stderr.count("\n") == 1
        and "only SQLite and PostgreSQL" in result.stderr
    )
    result = edgekit("fleet", "status", "--registry", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    assert (
        result.returncode == 2
        and "cannot open the registry" in result.stderr
        and "Traceback" not in result.stderr
    )
