"""Provisioning a device: the agent config it runs with, its trusted keys and broker account.

:func:`provision_device` is what ``edgekit device add`` does, as a library function (``edgekit
fleet simulate`` provisions its devices with it too): it writes ``DEVICE.toml`` holding the
device id, fleet, broker URL, state directory, the public halves of this workstation's signing
keys, and the device's own broker account (username and password; with ``tls`` a client
certificate signed by the fleet CA, copied beside the config). The file is written atomically,
readable by its owner only (it holds the password), and loaded back as the device will load it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .agent_config import AgentConfig  # validates what we write, exactly as the device will
from .atomic import atomic_write
from .broker import DeviceCredentials, add_device, list_devices
from .config import edgekit_home
from .errors import ConfigError
from .keys import list_keys, load_own_public_key

__all__ = ["ProvisionedDevice", "agent_config_text", "provision_device"]

DEFAULT_STATE_DIR = "/var/lib/edgekit"


@dataclass(frozen=True)
class ProvisionedDevice:
    """What :func:`provision_device` wrote (never the password)."""

    device: str
    fleet: str
    path: Path
    broker: str
    state_dir: str
    trusted_key_ids: tuple[str, ...]
    username: str
    tls: bool


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


def provision_device(
    device: str,
    fleet: str,
    output: str | os.PathLike[str],
    *,
    broker: str = "",
    state_dir: str = DEFAULT_STATE_DIR,
    key_names: Optional[list[str]] = None,
    tls: bool = False,
    force: bool = False,
    home: str | os.PathLike[str] | None = None,
) -> ProvisionedDevice:
    """Write the agent config of ``device`` to ``output``: this workstation's public key(s)
    (``key_names``, default all) and the device's broker account, reused if it exists for the
    same fleet (new with ``force``). ConfigError if ``output`` exists and not ``force``."""
    home = Path(home) if home is not None else edgekit_home()
    output = Path(output)
    names = key_names or [info.name for info in list_keys(home)] or ["default"]
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
    return ProvisionedDevice(
        device=device,
        fleet=fleet,
        path=output,
        broker=broker,
        state_dir=state_dir,
        trusted_key_ids=tuple(k.key_id for k in keys),
        username=creds.username,
        tls=tls,
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
