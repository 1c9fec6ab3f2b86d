"""``edgekit device``: provision devices (agent configs with the fleet's trusted keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..atomic import atomic_write
from ..config import WorkstationConfig
from ..errors import ConfigError
from ..provision import DEFAULT_STATE_DIR, provision_device
from ._app import console, new_app, print_json
from .push import REGISTRY_HELP
from .server import SERVER_HELP, server_client

app = new_app("Provision devices: write the agent config a device runs with.")


@app.command("add")
def add(
    device: str = typer.Argument(..., help="Device id (letters, digits, '.', '_', '-')."),
    fleet: str = typer.Option(..., "--fleet", help="Fleet the device belongs to."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the agent config (DEVICE.toml)."),
    broker: str = typer.Option(
        "",
        "--broker",
        envvar="EDGEKIT_BROKER",
        help="MQTT broker URL the device connects to (mqtt://host:port).",
    ),
    state_dir: str = typer.Option(
        DEFAULT_STATE_DIR, "--state-dir", help="Where the device keeps installed bundles and queued reports."
    ),
    key: Optional[list[str]] = typer.Option(
        None,
        "--key-name",
        help="Signing key(s) whose public half the device trusts (repeatable); default: all.",
    ),
    tls: bool = typer.Option(
        False, "--tls", help="Also issue a client certificate signed by the fleet CA (for mqtts:// brokers)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite an existing config file and issue new broker credentials."
    ),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON (never the password)."),
) -> None:
    """Write an agent config for DEVICE: this workstation's public key(s) and the device's own
    broker account (username and password; with --tls a client certificate too). With --server
    the fleet service provisions it with its keys and accounts. Recorded in the registry."""
    remote = server_client(server)
    if remote is not None:
        if output.exists() and not force:
            raise ConfigError(f"{output} already exists; pass --force to overwrite it")
        doc = remote.request(
            "POST",
            "api/v1/devices",
            json_body={
                "device": device,
                "fleet": fleet,
                "broker": broker,
                "state_dir": state_dir,
                "tls": tls,
                "force": force,
            },
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        for name, text in doc["files"].items():  # TLS files, named in the config beside it
            atomic_write(output.parent / Path(name).name, text.encode(), mode=0o600)
        atomic_write(output, doc["config"].encode(), mode=0o600)  # it holds the device's broker password
        trusted, username = doc["trusted_key_ids"], doc["username"]
    else:
        from edgekit.fleet.control import ControlPlane

        done = provision_device(
            device, fleet, output, broker=broker, state_dir=state_dir, key_names=key, tls=tls, force=force
        )
        cfg = WorkstationConfig.load(registry=registry)
        cfg.home.mkdir(parents=True, exist_ok=True)
        with ControlPlane.open(cfg.registry) as control:
            control.record_provisioned(device, fleet, done.username, tls)
        trusted, username = list(done.trusted_key_ids), done.username
    if json_out:
        print_json(
            {
                "device": device,
                "fleet": fleet,
                "path": str(output),
                "broker": broker,
                "state_dir": state_dir,
                "trusted_key_ids": trusted,
                "username": username,
                "tls": tls,
            }
        )
    else:
        console.print(
            f"Wrote agent config for [bold]{device}[/] (fleet {fleet}) to {output}, "
            f"trusting {len(trusted)} key(s): {', '.join(k[:16] for k in trusted)}; "
            f"broker account {username}{' with a client certificate' if tls else ''}. Run "
            "`edgekit broker mosquitto-config` again"
            + (" on the fleet service's machine" if remote is not None else "")
            + " so the broker knows it."
        )
