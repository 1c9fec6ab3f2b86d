"""``edgekit device``: provision devices (agent configs with the fleet's trusted keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..provision import DEFAULT_STATE_DIR, provision_device
from ._app import console, new_app, print_json

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
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON (never the password)."),
) -> None:
    """Write an agent config for DEVICE: this workstation's public key(s) and the device's own
    broker account (username and password; with --tls a client certificate too)."""
    done = provision_device(
        device, fleet, output, broker=broker, state_dir=state_dir, key_names=key, tls=tls, force=force
    )
    if json_out:
        print_json(
            {
                "device": device,
                "fleet": fleet,
                "path": str(output),
                "broker": broker,
                "state_dir": state_dir,
                "trusted_key_ids": list(done.trusted_key_ids),
                "username": done.username,
                "tls": tls,
            }
        )
    else:
        console.print(
            f"Wrote agent config for [bold]{device}[/] (fleet {fleet}) to {output}, "
            f"trusting {len(done.trusted_key_ids)} key(s): {', '.join(k[:16] for k in done.trusted_key_ids)}; "
            f"broker account {done.username}{' with a client certificate' if tls else ''}. Run "
            "`edgekit broker mosquitto-config` again so the broker knows it."
        )
