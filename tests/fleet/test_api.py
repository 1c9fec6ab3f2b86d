"""The fleet service's operator API through the CLI's `--server`: an operator with no signing key
on their machine pushes through `fleet serve` (which holds the key and drives the rollout), a
viewer is refused, and a missing, unknown or expired session is refused with one line."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgekit.agent_config import AgentConfig
from edgekit.fleet.registry import Registry
from edgekit.fleet.registry.models import ApiSession
from edgekit.keys import load_own_public_key
from sqlalchemy import update
from test_push import BIN, Fleet, edgekit, fleet  # noqa: F401 - fleet is a fixture
from test_serve import serve  # noqa: F401 - serve is a fixture
from watcher import Watcher


def laptop(home: Path, server: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`edgekit ARGS` on an operator's laptop: its own EDGEKIT_HOME (no keys), the service's URL."""
    env = {**os.environ, "EDGEKIT_HOME": str(home), "EDGEKIT_SERVER": server, "COLUMNS": "200"}
    env.pop("EDGEKIT_REGISTRY", None)
    return edgekit(*args, env=env, stdin=stdin)


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    line = result.stderr.strip()
    assert "Traceback" not in line and len(line.splitlines()) == 1, line
    assert all(w in line for w in words), line
    return line


def test_an_operator_without_a_key_pushes_through_the_service_and_a_viewer_cannot(
    serve,  # noqa: F811 - the fixture imported above
    fleet: Fleet,  # noqa: F811 - the fixture imported above
    mosquitto,
    digits_models,
    edgekit_home,
    tmp_path,
):
    registry = f"sqlite:///{edgekit_home / 'registry.db'}"
    served = serve("--registry", registry)  # the service's home holds the key (the fleet fixture made it)
    url = served.urls["dashboard"]
    for name, role, password in (("alice", "operator", "alice-secret"), ("vic", "viewer", "vic-secret")):
        added = subprocess.run(
            [str(BIN / "edgekit"), "fleet", "user", "add", name, "--role", role, "--password-stdin"],
            input=password + "\n",
            capture_output=True,
            text=True,
            check=False,
        )
        assert added.returncode == 0, added.stderr
    alice, vic = tmp_path / "alice-laptop", tmp_path / "vic-laptop"
    assert not (alice / "keys").exists()

    one_line(laptop(alice, url, "rollout", "status", "--fleet", "lab"), 16, "not signed in", "edgekit login")
    wrong = laptop(alice, url, "login", "--account", "alice", "--password-stdin", stdin="nope\n")
    one_line(wrong, 16, "wrong account name or password")
    signed = laptop(alice, url, "login", "--account", "alice", "--password-stdin", stdin="alice-secret\n")
    assert signed.returncode == 0 and "as alice (operator)" in signed.stdout, signed.stderr
    assert (alice / "servers.json").stat().st_mode & 0o777 == 0o600
    assert "alice-secret" not in (alice / "servers.json").read_text()

    watcher = Watcher(mosquitto.url)
    try:
        fleet.start("cam-1")
        watcher.wait_for(lambda _: watcher.states("cam-1"))
        pushed = laptop(
            alice,
            url,
            "push",
            str(digits_models.fp32),
            "--fleet",
            "lab",
            "--name",
            "digits",
            "--wait",
            "--json",
        )
        assert pushed.returncode == 0, pushed.stderr  # signed and driven by the service
        watcher.wait_for(watcher.serving("1.0.0", "cam-1"))
    finally:
        watcher.close()
    status = laptop(alice, url, "rollout", "status", "--fleet", "lab", "--json")
    assert '"started_by": "alice"' in status.stdout and '"phase": "done"' in status.stdout

    # Provisioning through the service: its key, its broker account; the laptop writes the config.
    config = tmp_path / "cam-9.toml"
    added = laptop(
        alice, url, "device", "add", "cam-9", "--fleet", "lab", "-o", str(config), "--broker", mosquitto.url
    )
    assert added.returncode == 0, added.stderr
    assert config.stat().st_mode & 0o777 == 0o600 and 'device = "cam-9"' in config.read_text()
    assert load_own_public_key(edgekit_home).pem().decode().strip() in config.read_text()
    assert AgentConfig.load(config).device == "cam-9"

    signed = laptop(vic, url, "login", "--account", "vic", "--password-stdin", stdin="vic-secret\n")
    assert signed.returncode == 0, signed.stderr
    assert laptop(vic, url, "rollout", "status", "--fleet", "lab").returncode == 0  # a viewer may look
    one_line(laptop(vic, url, "push", "digits", "--fleet", "lab"), 16, "vic is a viewer")
    one_line(laptop(vic, url, "fleet", "rollback", "--fleet", "lab", "--to", "1.0.0"), 16, "vic is a viewer")
    refused = laptop(
        vic, url, "device", "add", "cam-10", "--fleet", "lab", "-o", str(tmp_path / "cam-10.toml")
    )
    one_line(refused, 16, "vic is a viewer")
    audit = subprocess.run(
        [str(BIN / "edgekit"), "fleet", "audit", "--json"], capture_output=True, text=True, check=True
    ).stdout
    assert '"actor": "vic"' in audit and '"result": "refused"' in audit and '"actor": "alice"' in audit
    assert '"action": "device-add"' in audit

    # An expired session is refused, and says how to sign in again.
    reg = Registry(registry)
    with reg.session() as session:
        past = datetime.now(timezone.utc) - timedelta(minutes=1)
        session.execute(update(ApiSession).values(expires_at=past))
        session.commit()
    reg.close()
    one_line(
        laptop(alice, url, "rollout", "status", "--fleet", "lab"), 16, "session expired", "edgekit login"
    )
    assert laptop(alice, url, "logout").returncode == 0
    assert served.stop()["stopped"]
