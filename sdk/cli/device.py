"""``edgekit device``: provision devices (agent configs with the fleet's trusted keys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..atomic import atomic_write
from ..broker import DeviceCredentials, add_device, list_devices
from ..config import edgekit_home
from ..errors import ConfigError
from ..keys import list_keys, load_own_public_key
from ._app import console, new_app, print_json

app = new_app("Provision devices: write the agent config a device runs with.")

DEFAULT_STATE_DIR = "/var/lib/edgekit"


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value)


def agent_config_text(
    device: str,
    fleet: str,
    broker: str,
    state_dir: str,
    trusted_pem: str,
    mqtt: Optional[dict[str, str]] = None,
) -> str:
    """The text of an agent config (see docs/agent.md for every key)."""
    mqtt_table = "".join(f"{key} = {_toml_string(value)}\n" for key, value in (mqtt or {}).items())
    return (
        "# edgekit agent config, written by `edgekit device add`. See docs/agent.md.\n"
        f"device = {_toml_string(device)}\n"
        f"fleet = {_toml_string(fleet)}\n"
        f"state_dir = {_toml_string(state_dir)}\n"
        f"broker = {_toml_string(broker)}\n"
        'runtime = "auto"\n'
        "threads = 0  # 0: one interpreter thread per CPU core\n"
        "# Public keys this device trusts: it installs only bundles they signed.\n"
        f"trusted_keys = '''\n{trusted_pem.strip()}\n'''\n"
        "\n[drift]\n"
        "sample_rate = 0.05\n"
        "window = 200\n"
        "psi_threshold = 0.1\n"
        "ks_threshold = 0.1\n"
        "\n[telemetry]\n"
        "interval = 60\n"
        "queue_max = 10000\n"
        + (
            "\n# The device's own broker account; keep this file private.\n[mqtt]\n" + mqtt_table
            if mqtt_table
            else ""
        )
    )


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
    from edgekit.agent.config import AgentConfig  # validates what we write, exactly as the device will

    home = edgekit_home()
    names = key or [info.name for info in list_keys(home)] or ["default"]
    keys = [load_own_public_key(home, name) for name in names]
    pem = "".join(k.pem().decode() for k in keys)
    if output.exists() and not force:
        raise ConfigError(f"{output} already exists; pass --force to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    creds = _credentials(home, device, fleet, tls, force)
    mqtt = {"username": creds.username, "password": creds.password}
    if tls:
        # The device needs the CA and its certificate and key beside the config it is given.
        for name, source in (("ca", creds.ca_file), ("cert", creds.cert_file), ("key", creds.key_file)):
            if source is None:
                raise ConfigError(
                    f"device {device} has no TLS {name} file; run with --tls --force to issue one"
                )
            target = output.parent / f"{device}.{name}.pem"
            atomic_write(target, Path(source).read_bytes(), mode=0o600)
            mqtt[name] = target.name
    text = agent_config_text(device, fleet, broker, state_dir, pem, mqtt)
    atomic_write(output, text.encode(), mode=0o600)  # it holds the device's broker password
    try:
        AgentConfig.load(output)
    except ConfigError:
        output.unlink()
        raise
    if json_out:
        print_json(
            {
                "device": device,
                "fleet": fleet,
                "path": str(output),
                "broker": broker,
                "state_dir": state_dir,
                "trusted_key_ids": [k.key_id for k in keys],
                "username": creds.username,
                "tls": tls,
            }
        )
    else:
        console.print(
            f"Wrote agent config for [bold]{device}[/] (fleet {fleet}) to {output}, "
            f"trusting {len(keys)} key(s): {', '.join(k.key_id[:16] for k in keys)}; broker account "
            f"{creds.username}{' with a client certificate' if tls else ''}. Run `edgekit broker mosquitto-config` "
            "again so the broker knows it."
        )


def _credentials(home: Path, device: str, fleet: str, tls: bool, force: bool) -> DeviceCredentials:
    """The device's broker account: reused if it exists (same fleet), new with ``force``."""
    existing = {c.device: c for c in list_devices(home)}.get(device)
    if existing is not None and not force:
        if existing.fleet != fleet:
            raise ConfigError(
                f"device {device} already has broker credentials for fleet {existing.fleet}; "
                "pass --force to move it to this fleet with new credentials"
            )
        if not tls or existing.cert_file is not None:
            return existing
    return add_device(device, fleet, home=home, tls=tls, force=existing is not None)
