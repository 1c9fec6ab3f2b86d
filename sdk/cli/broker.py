"""``edgekit broker``: Mosquitto configuration and per-device broker credentials."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..broker import OPERATOR_USERNAME, add_device, write_mosquitto_config
from ..config import WorkstationConfig
from ..topics import DEFAULT_PREFIX
from ._app import console, new_app, print_json
from .push import REGISTRY_HELP

app = new_app("Configure an MQTT broker (Mosquitto) for a fleet: accounts, ACLs, TLS.")


@app.command("mosquitto-config")
def mosquitto_config(
    port: int = typer.Option(1883, "--port", help="Port of the plain MQTT listener (username/password)."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Directory to write mosquitto.conf, passwd and acl into."
    ),
    host: str = typer.Option("0.0.0.0", "--host", help="Address the listeners bind to."),
    tls_port: Optional[int] = typer.Option(
        None, "--tls-port", help="Also listen with TLS on this port, requiring client certificates."
    ),
    tls_host: Optional[List[str]] = typer.Option(
        None,
        "--tls-host",
        help="Host name or IP the broker's certificate is valid for (repeat; default localhost, 127.0.0.1).",
    ),
    prefix: str = typer.Option(DEFAULT_PREFIX, "--prefix", help="Topic prefix the ACL covers."),
    user: Optional[str] = typer.Option(
        None, "--user", help="System account Mosquitto runs as when started as root (its `user` option)."
    ),
    hasher: str = typer.Option(
        "auto",
        "--hasher",
        help="Password hashing: auto (mosquitto_passwd if installed), mosquitto_passwd or python.",
    ),
    no_persistence: bool = typer.Option(
        False, "--no-persistence", help="Do not persist retained messages (bundles) across broker restarts."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the written paths as JSON (never passwords)."),
) -> None:
    """Write a ready mosquitto.conf, password file and ACL for every device with credentials.

    No anonymous access; each device may publish only its own state, telemetry and events and
    read only its fleet's and its own desired state and the bundles; the operator account
    (credentials in $EDGEKIT_HOME/broker/operator.json) may do everything under the prefix.
    Start it with `mosquitto -c DIR/mosquitto.conf`.
    """
    result = write_mosquitto_config(
        output,
        port,
        host=host,
        tls_port=tls_port,
        tls_hosts=tls_host or None,
        prefix=prefix,
        run_as=user,
        hasher=hasher,
        persistence=not no_persistence,
    )
    if json_out:
        print_json(
            {
                "config": str(result.config),
                "password_file": str(result.password_file),
                "acl_file": str(result.acl_file),
                "port": result.port,
                "tls_port": result.tls_port,
                "devices": result.devices,
                "hasher": result.hasher,
                "operator_credentials": str(result.operator_file),
            }
        )
        return
    console.print(f"Wrote {result.config} ({result.devices} devices, passwords hashed by {result.hasher}).")
    console.print(f"Operator account: {OPERATOR_USERNAME} (password in {result.operator_file})")
    console.print(f"Start the broker with: mosquitto -c {result.config}")


@app.command("add-device")
def add_device_command(
    device: str = typer.Argument(..., help="Device id (also its broker username)."),
    fleet: str = typer.Option(..., "--fleet", help="Fleet the device belongs to."),
    tls: bool = typer.Option(False, "--tls", help="Also issue a client certificate signed by the fleet CA."),
    force: bool = typer.Option(False, "--force", help="Replace the device's existing credentials."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(
        False, "--json", help="Print where the credentials are, as JSON (never the password)."
    ),
) -> None:
    """Create a device's broker username and password (and with --tls a client certificate).

    Stored under $EDGEKIT_HOME/broker/devices/ (mode 0600) and recorded in the registry as
    provisioned for the fleet (so `edgekit push` asks for it by name on brokers that need it).
    Re-run `edgekit broker mosquitto-config` and reload Mosquitto afterwards.
    """
    from edgekit.fleet.control import ControlPlane

    cred = add_device(device, fleet, tls=tls, force=force)
    cfg = WorkstationConfig.load(registry=registry)
    with ControlPlane.open(cfg.registry) as control:
        control.record_provisioned(cred.device, cred.fleet, cred.username, cred.cert_file is not None)
    info = {
        "device": cred.device,
        "fleet": cred.fleet,
        "username": cred.username,
        "credentials": str(cred.path),
        "cert_file": str(cred.cert_file) if cred.cert_file else None,
        "key_file": str(cred.key_file) if cred.key_file else None,
        "ca_file": str(cred.ca_file) if cred.ca_file else None,
    }
    if json_out:
        print_json(info)
        return
    console.print(
        f"Created broker credentials for device [bold]{cred.device}[/] (fleet {cred.fleet}) in {cred.path}"
    )
    if cred.cert_file:
        console.print(f"Client certificate: {cred.cert_file}")
    console.print("Now re-run `edgekit broker mosquitto-config` and reload Mosquitto.")
