"""``edgekit capture``: field data from the devices, under the owner's signed policy (docs/capture.md)."""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from ..capture import TRIGGERS, init_capture_key, load_capture_key, load_capture_public
from ..config import WorkstationConfig, edgekit_home
from ..errors import ConfigError, KeyStoreError, TrustMetadataError
from ..schema import refuse
from ..topics import check_device_id, check_fleet_id
from ._app import console, err_console, new_app, print_json, signing_key
from .push import BROKER_HELP, REGISTRY_HELP, _connect, open_control

app = new_app("Capture field data from devices, encrypted to you, under a signed policy (docs/capture.md).")
keys_app = new_app("The owner's capture key pair: devices encrypt to its public half.")
policy_app = new_app("Set, show or turn off a fleet's signed capture policy.")
app.add_typer(keys_app, name="keys")
app.add_typer(policy_app, name="policy")

PASSPHRASE_ENV = "EDGEKIT_CAPTURE_PASSPHRASE"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.I)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.I)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_BYTES = {"b": 1, "kb": 1000, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_duration(text: str, flag: str) -> int:
    """Seconds in ``14d``, ``12h``, ``90m``, ``3600`` (seconds); ConfigError naming the flag."""
    found = _DURATION.match(text)
    if not found or float(found.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r} is not a duration; write e.g. 14d, 12h, 30m")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "s").lower()])


def parse_size(text: str, flag: str) -> int:
    found = _SIZE.match(text)
    if not found or float(found.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r} is not a size; write e.g. 50MB, 200MiB, 1GB")
    return int(float(found.group(1)) * _BYTES[(found.group(2) or "b").lower()])


def parse_moment(text: str, flag: str) -> datetime:
    """A date (2026-01-31), a UTC time (2026-01-31T12:00) or an age (2d: two days ago)."""
    if _DURATION.match(text) and not text.strip().isdigit():
        return datetime.now(timezone.utc) - timedelta(seconds=parse_duration(text, flag))
    try:
        moment = datetime.fromisoformat(text.strip().rstrip("Z"))
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is neither a date (2026-01-31) nor an age (2d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _passphrase(confirm: bool) -> Optional[bytes]:
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if sys.stdin.isatty():
        secret = typer.prompt("Capture key passphrase", hide_input=True, confirmation_prompt=confirm)
        return str(secret).encode() or None
    return None


@keys_app.command("init")
def keys_init(
    passphrase: bool = typer.Option(
        True,
        "--passphrase/--no-passphrase",
        help=f"Protect the private key with a passphrase (prompted, or ${PASSPHRASE_ENV}).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing capture key (records sealed to it are then unreadable)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Make the capture key pair under $EDGEKIT_HOME/keys (capture.key.pem 0600, capture.pub.pem)."""
    secret = _passphrase(confirm=True) if passphrase else None
    if passphrase and not secret:
        raise ConfigError(
            f"a capture key needs a passphrase: set {PASSPHRASE_ENV}, run on a terminal, or pass --no-passphrase"
        )
    key = init_capture_key(edgekit_home(), secret, force=force)
    if json_out:
        print_json({"key_id": key.key_id, "encrypted": bool(secret)})
    else:
        console.print(
            f"Created capture key {key.key_id[:16]}; keep {edgekit_home() / 'keys' / 'capture.key.pem'} safe"
        )


def _policy_signer(fleet: str, key: Any) -> Any:
    """The key that signs fleet F's capture policy: on a fleet with a TUF key hierarchy, its
    online key (devices on TUF accept a policy from the desired role's keys only), else ``key``."""
    from edgekit.fleet.trustrepo import has_repository, load_repository

    home = edgekit_home()
    if not has_repository(home, fleet):
        return key
    online = load_repository(home / "trust" / fleet).online_key
    if online is None:
        raise refuse(
            TrustMetadataError,
            "malformed",
            f"fleet {fleet}'s trust repository names no online key to sign the capture policy with; "
            "re-create it with `edgekit trust init`",
        )
    try:
        return signing_key(online)
    except KeyStoreError as exc:
        raise KeyStoreError(
            f"{exc}; on fleet {fleet} (TUF keys) the capture policy is signed by the fleet's online key, "
            "which must be on this machine"
        ) from None


@policy_app.command("set")
def policy_set(
    fleet: str = typer.Option(..., "--fleet", help="The fleet whose devices may capture."),
    on: list[str] = typer.Option(
        ["drift"], "--on", help=f"Trigger(s): {', '.join(TRIGGERS)} (repeat the flag)."
    ),
    confidence_below: float = typer.Option(
        0.6, "--confidence-below", min=0.0, max=1.0, help="low-confidence: top output below this."
    ),
    sample_rate: float = typer.Option(
        0.001, "--sample-rate", min=0.0, max=1.0, help="sample: this fraction of predictions."
    ),
    max_per_hour: int = typer.Option(
        20, "--max-per-hour", min=0, help="Captures per device per hour, at most."
    ),
    max_bytes: str = typer.Option(
        "50MB", "--max-bytes", help="Bytes held per device, at most (oldest dropped first)."
    ),
    retain: str = typer.Option(
        "14d", "--retain", help="Each capture is deleted on the device this long after it was taken."
    ),
    labels_only: bool = typer.Option(
        False, "--labels-only", help="Keep the model's outputs and provenance only, no inputs."
    ),
    note: str = typer.Option(
        "", "--note", help="Why, and for whom: shown with the policy and in the dataset's README."
    ),
    valid_for: str = typer.Option(
        "365d", "--valid-for", help="The policy expires after this; devices then stop capturing."
    ),
    key_name: str = typer.Option(
        "default",
        "--key-name",
        help="Signing key under $EDGEKIT_HOME/keys (a fleet with TUF keys: its online key signs instead).",
    ),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the policy as JSON."),
) -> None:
    """Sign and publish a capture policy: devices of the fleet capture within it, nothing more."""
    from edgekit.fleet.capture import set_policy

    check_fleet_id(fleet)
    bad = [t for t in on if t not in TRIGGERS]
    if bad:
        raise ConfigError(f"--on {bad[0]!r} is not a trigger; use {', '.join(TRIGGERS)}")
    options: dict[str, Any] = {
        "triggers": tuple(dict.fromkeys(on)),
        "confidence_below": confidence_below,
        "sample_rate": sample_rate,
        "max_per_hour": max_per_hour,
        "max_bytes": parse_size(max_bytes, "--max-bytes"),
        "retain_s": parse_duration(retain, "--retain"),
        "labels_only": labels_only,
        "note": note,
        "ttl": parse_duration(valid_for, "--valid-for"),
    }
    recipient = load_capture_public(edgekit_home())
    cfg = WorkstationConfig.load(broker=broker, registry=registry)
    key = signing_key(key_name)
    with open_control(cfg, key) as control:
        client = _connect(cfg)
        try:
            policy = set_policy(control, client, _policy_signer(fleet, key), fleet, recipient, **options)
        finally:
            client.close()
    if json_out:
        print_json(policy.to_dict())
    else:
        console.print(f"policy {policy.seq}: {policy.describe()}")


@policy_app.command("off")
def policy_off(
    fleet: str = typer.Option(..., "--fleet", help="The fleet."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the policy as JSON."),
) -> None:
    """Turn capture off: a newer signed policy; devices stop at once (what they hold still uploads)."""
    from edgekit.fleet.capture import turn_off

    check_fleet_id(fleet)
    cfg = WorkstationConfig.load(broker=broker, registry=registry)
    key = signing_key(key_name)
    with open_control(cfg, key) as control:
        client = _connect(cfg)
        try:
            policy = turn_off(control, client, _policy_signer(fleet, key), fleet)
        finally:
            client.close()
    if json_out:
        print_json(policy.to_dict())
    else:
        console.print(policy.describe())


@policy_app.command("show")
def policy_show(
    fleet: str = typer.Option(..., "--fleet", help="The fleet."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the policy as JSON."),
) -> None:
    """Show the capture policy set last for a fleet."""
    from edgekit.fleet.capture import current_policy

    check_fleet_id(fleet)
    cfg = WorkstationConfig.load(registry=registry)
    with open_control(cfg, None) as control:
        policy = current_policy(control, fleet)
    if json_out:
        print_json(policy.to_dict() if policy is not None else None)
    elif policy is None:
        console.print(f"fleet {fleet} has no capture policy: its devices capture nothing")
    else:
        expires = datetime.fromtimestamp(policy.expires_at, timezone.utc)
        console.print(f"policy {policy.seq}: {policy.describe()}; expires {expires:%Y-%m-%d %H:%M} UTC")
        if policy.note:
            console.print(f"note: {policy.note}")


@app.command("pull")
def pull(
    fleet: str = typer.Option(..., "--fleet", help="The fleet."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Dataset folder to write (created; records already there are kept)."
    ),
    since: Optional[str] = typer.Option(
        None, "--since", help="Only records received since: an age (2d) or a date."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="Only this device's records."),
    trigger: Optional[str] = typer.Option(
        None, "--trigger", help=f"Only this trigger: {', '.join(TRIGGERS)}."
    ),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Decrypt the fleet's captured records into a dataset folder (inputs, records.jsonl, README.md)."""
    from edgekit.fleet.capture import pull as pull_records

    check_fleet_id(fleet)
    if device is not None:
        check_device_id(device)
    if trigger is not None and trigger not in TRIGGERS:
        raise ConfigError(f"--trigger {trigger!r} is not a trigger; use {', '.join(TRIGGERS)}")
    moment = parse_moment(since, "--since") if since else None
    key = load_capture_key(edgekit_home(), _passphrase(confirm=False))
    cfg = WorkstationConfig.load(registry=registry)
    with open_control(cfg, None) as control:
        result = pull_records(control, key, fleet, output, since=moment, device=device, trigger=trigger)
    if json_out:
        print_json(result.to_dict())
        return
    for line in result.refused:
        err_console.print(f"[yellow]refused:[/] {escape(line)}", highlight=False)
    console.print(
        f"{result.written} new records in {output} ({result.already} already there, "
        f"{len(result.refused)} refused); to label them, copy {output / 'labels-template.csv'} to "
        f"labels.csv and correct the model's guesses (see README.md)"
    )


@app.command("purge")
def purge(
    fleet: str = typer.Option(..., "--fleet", help="The fleet."),
    before: Optional[str] = typer.Option(
        None, "--before", help="Only records received before: a date, or an age (30d)."
    ),
    device: list[str] = typer.Option(
        [], "--device", help="Also ask this device to delete what it holds (repeat)."
    ),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Delete captured records kept by the fleet (and, with --device, on those devices)."""
    from edgekit.fleet.capture import purge as purge_records

    check_fleet_id(fleet)
    for name in device:
        check_device_id(name)
    moment = parse_moment(before, "--before") if before else None
    cfg = WorkstationConfig.load(broker=broker, registry=registry)
    with open_control(cfg, None) as control:
        client = _connect(cfg) if device else None
        try:
            deleted = purge_records(control, fleet, before=moment, client=client, devices=device)
        finally:
            if client is not None:
                client.close()
    if json_out:
        print_json({"fleet": fleet, "deleted": deleted, "devices_asked": device})
    else:
        asked = f"; asked {', '.join(device)} to delete what they hold" if device else ""
        console.print(f"deleted {deleted} captured records of fleet {fleet}{asked}")
