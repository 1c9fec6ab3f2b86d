"""``edgekit trust``: a fleet's TUF keys and metadata (see docs/security.md).

The repository of fleet F lives in ``$EDGEKIT_HOME/trust/F/`` (edgekit.fleet.trustrepo). Keys
are named as in ``edgekit keys`` (or given as a ``.pub.pem`` file); a key held on another
machine signs a copy of the pending document there (``trust sign``), and ``trust submit``
collects the signatures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..atomic import atomic_write
from ..config import WorkstationConfig, edgekit_home
from ..errors import KeyStoreError, TrustMetadataError
from ..keys import PublicKey, list_keys, load_own_public_key
from ..schema import refuse
from ._app import console, new_app, print_json, signing_key

if TYPE_CHECKING:
    from edgekit.fleet.trustrepo import TrustRepository

app = new_app("A fleet's TUF keys: root (k of n), targets, the online key; rotate, revoke, sign, publish.")

FLEET = typer.Option(..., "--fleet", help="The fleet whose trust repository to use.")
JSON = typer.Option(False, "--json", help="Print the result as JSON.")


def _dir(fleet: str) -> Path:
    return edgekit_home() / "trust" / fleet


_HELD: list[Any] = []  # the repository locks this command holds, until it exits


def _load(fleet: str, *, edit: bool = True) -> TrustRepository:
    """Fleet F's repository; with ``edit``, locked until this command exits (so `fleet serve`
    re-signing the timestamp meanwhile cannot make the same version)."""
    from edgekit.fleet.trustrepo import load_repository, repository_lock

    if edit and (_dir(fleet) / "fleet.json").exists():
        lock = repository_lock(_dir(fleet))
        lock.__enter__()
        _HELD.append(lock)
    return load_repository(_dir(fleet))


def _public(ref: str) -> PublicKey:
    """A key by name (``edgekit keys list``) or a public key file."""
    path = Path(ref)
    if ref.endswith(".pem") and path.exists():
        return PublicKey.from_pem(path.read_bytes())
    return load_own_public_key(edgekit_home(), ref)


def _key_id(ref: str) -> str:
    """A key id (or a prefix of 16+ hex digits, as `trust status` shows it), or a key name."""
    if len(ref) >= 16 and all(c in "0123456789abcdef" for c in ref):
        return ref
    return _public(ref).key_id


def _full_id(repo: TrustRepository, ref: str) -> str:
    wanted = _key_id(ref)
    from edgekit.roles import ROLES

    for role in ROLES:
        try:
            ids, _ = repo.keys_of(role)
        except (KeyError, AssertionError, TrustMetadataError):
            continue
        for keyid in ids:
            if keyid.startswith(wanted):
                return keyid
    return wanted


def _local_signers(names: list[str]) -> list[Any]:
    """The private keys of ``names`` that this machine holds."""
    here = {k.name for k in list_keys(edgekit_home())}
    return [signing_key(name) for name in names if name in here]


def _online(name: str) -> list[Any]:
    try:
        return [signing_key(name)]
    except KeyStoreError as exc:
        raise KeyStoreError(
            f"{exc}; the online key signs desired, snapshot and timestamp, and must be on this machine"
        ) from None


def _report(repo: TrustRepository, json_out: bool, what: str) -> None:
    from edgekit.fleet.trustrepo import role_summary

    summary = role_summary(repo)
    if json_out:
        print_json({"result": what, **summary})
        return
    console.print(what)
    for role in summary["pending"]:
        console.print(
            f"  waiting for signatures: {role} ({_dir(repo.fleet) / 'pending' / (role + '.json')}); "
            f"sign with `edgekit trust sign FILE --key K`, then `edgekit trust submit {role} --fleet {repo.fleet}`"
        )


@app.command("init")
def init(
    fleet: str = FLEET,
    root_keys: str = typer.Option(
        ..., "--root-keys", help="Root keys, comma-separated names or .pub.pem files."
    ),
    threshold: int = typer.Option(..., "--threshold", help="How many root keys must sign a root."),
    targets_key: str = typer.Option("targets", "--targets-key", help="The key that authorises bundles."),
    online_key: str = typer.Option("online", "--online-key", help="The fleet service's key (desired state)."),
    json_out: bool = JSON,
) -> None:
    """Create fleet F's trust: root v1 (signed here by the root keys this machine holds), targets."""
    from edgekit.fleet.trustrepo import TrustRepository

    if (_dir(fleet) / "fleet.json").exists():
        raise refuse(
            TrustMetadataError,
            "malformed",
            f"fleet {fleet} already has a trust repository at {_dir(fleet)}; "
            "change its keys with `edgekit trust rotate`",
        )
    names = [n.strip() for n in root_keys.split(",") if n.strip()]
    now = time.time()
    repo = TrustRepository.create(
        fleet,
        root_keys=[_public(n) for n in names],
        threshold=threshold,
        targets_keys=[_public(targets_key)],
        online_keys=[_public(online_key)],
        now=now,
    )
    repo.online_key = online_key  # `fleet serve` re-signs the online roles with it
    for key in _local_signers(names):
        repo.sign("root", key)
    for key in _local_signers([targets_key]):
        repo.sign("targets", key)
    _try_submit(repo, online_key, now)
    repo.save(_dir(fleet))
    _report(repo, json_out, f"Created the trust repository of fleet {fleet} in {_dir(fleet)}")


def _try_submit(repo: TrustRepository, online_key: str, now: float) -> None:
    for role in ("root", "targets"):
        if role in repo.pending:
            try:
                online = _online(online_key) if role == "targets" or "targets" not in repo.pending else []
                repo.submit(role, online=online, now=now)
            except TrustMetadataError as exc:
                if exc.reason != "threshold":
                    raise
                return


@app.command("sign")
def sign(
    file: Path = typer.Argument(..., help="A pending document (pending/root.json or a copy of it)."),
    key: str = typer.Option(..., "--key", help="Name of the signing key (this machine's)."),
    json_out: bool = JSON,
) -> None:
    """Add this machine's signature to a pending document, in place (for `trust submit`)."""
    from edgekit.fleet.trustrepo import _signer
    from tuf.api.metadata import Metadata
    from tuf.api.serialization import DeserializationError

    try:
        md: Metadata[Any] = Metadata.from_bytes(file.read_bytes())
    except (OSError, DeserializationError) as exc:
        raise refuse(TrustMetadataError, "malformed", f"cannot read {file} as TUF metadata ({exc})") from None
    signer = signing_key(key)
    md.sign(_signer(signer), append=True)
    from edgekit.fleet.trustrepo import _bytes

    atomic_write(file, _bytes(md))
    if json_out:
        print_json({"file": str(file), "key_id": signer.key_id, "signatures": len(md.signatures)})
    else:
        console.print(
            f"Signed {file} with {key} ({signer.key_id[:16]}); it has {len(md.signatures)} signature(s)"
        )


@app.command("submit")
def submit(
    role: str = typer.Argument(..., help="root or targets."),
    fleet: str = FLEET,
    signed: list[Path] = typer.Option(
        [], "--signed", help="Copies signed elsewhere, to collect (repeatable)."
    ),
    online_key: Optional[str] = typer.Option(
        None, "--online-key", help="The online key, to re-sign what depends on it (default: the fleet's)."
    ),
    json_out: bool = JSON,
) -> None:
    """Collect signatures on the pending ROLE and apply it once its thresholds are met."""
    repo = _load(fleet)
    online_key = online_key or repo.online_key or "online"
    for path in signed:
        try:
            repo.add_signature(role, path.read_bytes())
        except OSError as exc:
            raise refuse(TrustMetadataError, "malformed", f"cannot read {path}: {exc.strerror}") from None
    now = time.time()
    repo.save(_dir(fleet))  # the signatures are kept even if the threshold is not met yet
    with_targets = role == "root" and "targets" in repo.pending
    repo.submit(role, online=_online(online_key) if repo.roots else [], now=now)
    repo.save(_dir(fleet))
    what = "root and the re-signed targets" if with_targets and "targets" not in repo.pending else role
    _report(
        repo, json_out, f"Applied the new {what} of fleet {fleet}; publish it with `edgekit trust publish`"
    )


@app.command("rotate")
def rotate(
    role: str = typer.Argument(..., help="root, targets, desired, snapshot or timestamp."),
    fleet: str = FLEET,
    add: list[str] = typer.Option([], "--add", help="A key to add (name or .pub.pem; repeatable)."),
    remove: list[str] = typer.Option(
        [], "--remove", help="A key to remove (id, id prefix or name; repeatable)."
    ),
    threshold: Optional[int] = typer.Option(None, "--threshold", help="The role's new threshold."),
    json_out: bool = JSON,
) -> None:
    """Start a key change of ROLE: writes the pending root (or targets, for desired) to sign."""
    repo = _load(fleet)
    pending = repo.rotate(
        role,
        add=[_public(a) for a in add],
        remove=[_full_id(repo, r) for r in remove],
        threshold=threshold,
        now=time.time(),
    )
    repo.save(_dir(fleet))
    _report(repo, json_out, f"The key change of {role} waits for signatures on the pending {pending}")


@app.command("revoke")
def revoke(
    key: str = typer.Argument(..., help="The key to revoke (id, id prefix or name)."),
    fleet: str = FLEET,
    replacement: Optional[str] = typer.Option(None, "--replacement", help="A key to take its place."),
    json_out: bool = JSON,
) -> None:
    """Remove a (lost or stolen) key from every role of fleet F; the change needs the root and/or
    targets thresholds (`trust sign`, `trust submit`)."""
    repo = _load(fleet)
    keyid = _full_id(repo, key)
    pending = repo.revoke(keyid, replacement=_public(replacement) if replacement else None, now=time.time())
    if replacement and repo.online_key and _public(repo.online_key).key_id == keyid:
        repo.online_key = replacement  # what `fleet serve` re-signs with from now on
    repo.save(_dir(fleet))
    _report(repo, json_out, f"Revoking {key} waits for signatures on the pending {', '.join(pending)}")


@app.command("authorise")
def authorise(
    bundle_file: Path = typer.Argument(..., help="A signed bundle (.ekb) the fleet may run."),
    fleet: str = FLEET,
    json_out: bool = JSON,
) -> None:
    """List a bundle in the pending targets (the targets key signs it; then `trust submit targets`)."""
    from ..bundle import read_bundle
    from ..trust import TrustedKeys

    keys = [load_own_public_key(edgekit_home(), k.name) for k in list_keys(edgekit_home())]
    bundle = read_bundle(bundle_file, TrustedKeys(keys))
    repo = _load(fleet)
    repo.authorise_bundle(
        bundle.bundle_id,
        name=bundle.manifest.name,
        version=bundle.manifest.version,
        length=len(bundle.manifest_bytes),
        now=time.time(),
    )
    repo.save(_dir(fleet))
    _report(repo, json_out, f"{bundle.manifest.name}@{bundle.manifest.version} waits in the pending targets")


@app.command("desire")
def desire(
    bundle_file: Path = typer.Argument(..., help="The bundle (.ekb) the fleet (or --device) should run."),
    fleet: str = FLEET,
    device: Optional[str] = typer.Option(None, "--device", help="Only this device (a canary)."),
    seq: Optional[int] = typer.Option(None, "--seq", help="Sequence number (default: one above the last)."),
    online_key: str = typer.Option("online", "--online-key", help="The online key that signs it."),
    json_out: bool = JSON,
) -> None:
    """Sign a desired state into fleet F's desired role (with snapshot and timestamp); then
    `edgekit trust publish`. The bundle must be authorised by targets (`trust authorise`)."""
    from ..bundle import read_bundle
    from ..desired import new_desired_state
    from ..trust import TrustedKeys

    keys = [load_own_public_key(edgekit_home(), k.name) for k in list_keys(edgekit_home())]
    bundle = read_bundle(bundle_file, TrustedKeys(keys))
    repo = _load(fleet)
    if bundle.bundle_id not in repo.authorised():
        raise refuse(
            TrustMetadataError,
            "unauthorised",
            f"{bundle.manifest.name}@{bundle.manifest.version} is not authorised for fleet {fleet}: devices would "
            f"refuse it; `edgekit trust authorise {bundle_file} --fleet {fleet}` (signed by the targets key) first",
        )
    state = new_desired_state(
        fleet,
        bundle_sha256=bundle.bundle_id,
        bundle_name=bundle.manifest.name,
        bundle_version=bundle.manifest.version,
        seq=seq if seq is not None else repo.last_seq() + 1,
        device=device,
    )
    repo.set_desired([state], _online(online_key), now=time.time())
    repo.save(_dir(fleet))
    _report(
        repo,
        json_out,
        f"Fleet {fleet} desires {state.bundle_name}@{state.bundle_version} (seq {state.seq}); "
        "`edgekit trust publish` sends it",
    )


@app.command("refresh")
def refresh(
    fleet: str = FLEET,
    online_key: str = typer.Option("online", "--online-key", help="The online key that signs it."),
    json_out: bool = JSON,
) -> None:
    """Sign a fresh timestamp (devices raise freeze_suspected when it expires); then publish."""
    repo = _load(fleet)
    repo.refresh_timestamp(_online(online_key), now=time.time())
    repo.save(_dir(fleet))
    _report(repo, json_out, f"Signed a fresh timestamp for fleet {fleet}")


def _device_trust(
    fleet: str, broker: Optional[str], settle: float = 1.0, limit: float = 10.0
) -> dict[str, Any]:
    """Each device's root version and timestamp expiry, from its retained state on the broker
    (collected until none arrived for ``settle`` seconds, ``limit`` at most)."""
    import threading

    from edgekit.fleet.push import connect_operator

    from ..errors import MessageError
    from ..reports import DeviceStateReport
    from ..topics import Topics

    found: dict[str, DeviceStateReport] = {}
    changed = threading.Condition()

    def on_state(message: Any) -> None:
        try:
            report = DeviceStateReport.from_json(message.payload) if message.payload else None
        except MessageError:
            return  # a malformed state: not this command's to judge
        if report is not None and report.fleet == fleet:
            with changed:
                found[report.device] = report
                changed.notify_all()

    cfg = WorkstationConfig.load(broker=broker)
    client = connect_operator(cfg.broker, home=cfg.home)
    try:
        client.subscribe(Topics().all_devices_filter("state"), on_state, timeout=10)
        deadline = time.monotonic() + limit
        with changed:
            while time.monotonic() < deadline:
                if not _wait_for_more(changed, found, min(settle, deadline - time.monotonic())):
                    break
    finally:
        client.close()
    return {
        device: {
            "root": report.trust_root,
            "timestamp_expires": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report.trust_expires))
                if report.trust_expires is not None
                else None
            ),
            "status": report.status,
        }
        for device, report in sorted(found.items())
    }


def _wait_for_more(changed: Any, found: dict[str, Any], timeout: float) -> bool:
    seen = len(found)
    return bool(changed.wait_for(lambda: len(found) != seen, timeout))


@app.command("status")
def status(
    fleet: str = FLEET,
    devices: bool = typer.Option(
        False, "--devices", help="Also list each device's root version and expiry (from the broker)."
    ),
    broker: Optional[str] = typer.Option(
        None, "--broker", help="Broker URL for --devices (default: config)."
    ),
    json_out: bool = JSON,
) -> None:
    """Roles, keys, thresholds, versions and expiries of fleet F; what waits for signatures;
    with --devices, which device trusts which root."""
    from edgekit.fleet.trustrepo import role_summary

    repo = _load(fleet, edit=False)
    summary = role_summary(repo)
    current = repo.roots[-1].signed.version if repo.roots else None
    if devices:
        summary["devices"] = _device_trust(fleet, broker)
        for entry in summary["devices"].values():
            entry["stuck_on_old_root"] = (
                entry["root"] is not None and current is not None and entry["root"] < current
            )
    if json_out:
        print_json(summary)
        return
    for role, entry in summary["roles"].items():
        keys = ", ".join(k[:16] for k in entry["keys"])
        when = f"v{entry['version']}, expires {entry['expires']}" if "version" in entry else "not signed yet"
        console.print(f"{role:<10} {entry['threshold']} of {len(entry['keys'])}: {keys}  ({when})")
        if "pending_keys" in entry:
            new = ", ".join(k[:16] for k in entry["pending_keys"])
            console.print(
                f"{'':<10} pending: {entry['pending_threshold']} of {len(entry['pending_keys'])}: {new}  "
                "(once the change waiting for signatures is submitted)"
            )
    for role in summary["pending"]:
        console.print(
            f"pending    {role}: waiting for signatures (`edgekit trust sign`, `edgekit trust submit`)"
        )
    for device, entry in summary.get("devices", {}).items():
        if entry["root"] is None:
            console.print(f"device {device}: not on the key hierarchy yet (`edgekit trust upgrade`)")
        else:
            stuck = f"  STUCK: the fleet is on root v{current}" if entry["stuck_on_old_root"] else ""
            console.print(
                f"device {device}: root v{entry['root']}, timestamp expires {entry['timestamp_expires']}{stuck}"
            )


@app.command("export-root")
def export_root(
    fleet: str = FLEET,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here (default: stdout)."),
) -> None:
    """The fleet's first root, to provision devices with (agent.toml: trust_root)."""
    data = _load(fleet, edit=False).files().get("root/1")
    if data is None:
        raise refuse(
            TrustMetadataError, "threshold", f"fleet {fleet} has no signed root yet; `trust submit root`"
        )
    if output is None:
        typer.echo(data.decode())
    else:
        atomic_write(output, data)
        console.print(f"Wrote root v1 of fleet {fleet} to {output}")


@app.command("publish")
def publish(
    fleet: str = FLEET,
    broker: Optional[str] = typer.Option(None, "--broker", help="Broker URL (default: config)."),
    json_out: bool = JSON,
) -> None:
    """Publish fleet F's metadata, retained, for its devices: every root, then the roles."""
    from edgekit.fleet.push import connect_operator

    from ..topics import Topics

    files = _load(fleet, edit=False).files()
    order = sorted((n for n in files if n.startswith("root/")), key=lambda n: int(n.split("/")[1]))
    order += [n for n in ("targets", "desired", "snapshot", "timestamp") if n in files]
    cfg = WorkstationConfig.load(broker=broker)
    client = connect_operator(cfg.broker, home=cfg.home)
    try:
        for name in order:
            client.publish(Topics().fleet_trust(fleet, name), files[name], retain=True).wait(30)
    finally:
        client.close()
    sizes = {name: len(files[name]) for name in order}
    if json_out:
        print_json({"fleet": fleet, "published": sizes})
    else:
        console.print(f"Published {len(order)} documents ({sum(sizes.values())} bytes) for fleet {fleet}")


@app.command("upgrade")
def upgrade(
    fleet: str = FLEET,
    key: str = typer.Option("default", "--key", help="The single key devices trust today."),
    broker: Optional[str] = typer.Option(None, "--broker", help="Broker URL (default: config)."),
    json_out: bool = JSON,
) -> None:
    """Move fleet F's devices from single-key trust to its TUF root, once (signed by --key)."""
    from edgekit.fleet.push import connect_operator

    from ..roles import sign_trust_upgrade
    from ..topics import Topics

    root = _load(fleet, edit=False).files().get("root/1")
    if root is None:
        raise refuse(
            TrustMetadataError, "threshold", f"fleet {fleet} has no signed root yet; `trust submit root`"
        )
    signer = signing_key(key)
    message = sign_trust_upgrade(fleet, root, signer)
    cfg = WorkstationConfig.load(broker=broker)
    client = connect_operator(cfg.broker, home=cfg.home)
    try:
        client.publish(Topics().fleet_trust(fleet, "upgrade"), message, retain=True).wait(30)
    finally:
        client.close()
    if json_out:
        print_json(
            {
                "fleet": fleet,
                "published": "upgrade",
                "root_version": 1,
                "signer": signer.key_id,
                "bytes": len(message),
            }
        )
        return
    console.print(
        f"Published the trust upgrade of fleet {fleet}; publish its metadata with `edgekit trust publish`"
    )
