"""Broker credentials and a ready Mosquitto configuration for a fleet.

Everything lives under ``$EDGEKIT_HOME/broker/`` (directories 0700, secrets 0600)::

    operator.json              the operator account (workstation, registry): username, password
    devices/{device}.json      a device's username (= its device id), password and fleet
    devices/{device}.pem       with TLS: the device's client certificate (CN = device id)
    devices/{device}.key.pem   ... and its private key
    ca/ca.pem, ca/ca.key.pem   the fleet CA that signs client and server certificates
    server/server.pem, .key.pem  the broker's certificate (signed by the fleet CA)

:func:`write_mosquitto_config` turns that store into ``mosquitto.conf``, ``passwd`` (PBKDF2-
SHA512 ``$7$`` hashes: by ``mosquitto_passwd`` when installed, else computed here in the same
format) and ``acl``: no anonymous access; a device may publish only its own state, telemetry
and events, and read only its fleet's desired state, its own desired state and state, and the
bundles; the operator may read and write everything under the prefix. On a TLS listener with
client certificates, the certificate's CN is the username, so the same ACL applies.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .atomic import atomic_write
from .config import edgekit_home
from .errors import ConfigError
from .manifest import MAX_MESSAGE_SIZE
from .topics import DEFAULT_PREFIX, Topics, check_device_id, check_fleet_id

if TYPE_CHECKING:
    import pwd

__all__ = [
    "OPERATOR_USERNAME",
    "Credentials",
    "DeviceCredentials",
    "MosquittoConfig",
    "add_device",
    "ensure_fleet_ca",
    "ensure_server_certificate",
    "list_devices",
    "mosquitto_password_hash",
    "operator_credentials",
    "render_acl",
    "write_mosquitto_config",
]

log = logging.getLogger(__name__)

OPERATOR_USERNAME = "edgekit-operator"
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
SALT_BYTES = 12
CA_DAYS = 3650
CERT_DAYS = 825


@dataclass(frozen=True)
class Credentials:
    """A broker account. ``password`` is a secret: never log or print it."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, password=***)"


@dataclass(frozen=True)
class DeviceCredentials:
    """A device's broker account and, with TLS, its client certificate files."""

    device: str
    fleet: str
    username: str
    password: str
    path: Path
    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None
    ca_file: Optional[Path] = None

    def __repr__(self) -> str:
        return f"DeviceCredentials({self.device!r}, fleet={self.fleet!r}, password=***)"


@dataclass(frozen=True)
class MosquittoConfig:
    """What :func:`write_mosquitto_config` wrote."""

    config: Path
    password_file: Path
    acl_file: Path
    port: int
    tls_port: Optional[int]
    devices: int
    hasher: str
    operator_file: Path


def _store(home: Optional[Path]) -> Path:
    root = (home or edgekit_home()) / "broker"
    for sub in (root, root / "devices", root / "ca", root / "server"):
        sub.mkdir(parents=True, exist_ok=True)
        os.chmod(sub, 0o700)
    return root


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def _read_json(path: Path) -> dict[str, str]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read broker credentials {path} ({exc}); delete it and create it again"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"broker credentials {path} are malformed; delete the file and create it again")
    return {str(k): str(v) for k, v in doc.items()}


def operator_credentials(home: Optional[Path] = None) -> Credentials:
    """The operator account, created with a random password on first use."""
    path = _store(home) / "operator.json"
    if not path.exists():
        doc = {"username": OPERATOR_USERNAME, "password": _new_password()}
        atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)
    doc = _read_json(path)
    return Credentials(doc["username"], doc["password"])


# -- password file ----------------------------------------------------------------------------


def mosquitto_password_hash(
    password: str, salt: Optional[bytes] = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """A Mosquitto ``$7$`` password hash: PBKDF2-HMAC-SHA512, base64 salt and digest."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _write_password_file(path: Path, accounts: list[Credentials], hasher: str) -> str:
    """Write the password file; returns which hasher was used (mosquitto_passwd or python)."""
    tool = shutil.which("mosquitto_passwd") if hasher in ("auto", "mosquitto_passwd") else None
    if hasher == "mosquitto_passwd" and tool is None:
        raise ConfigError("mosquitto_passwd is not installed; install mosquitto or use --hasher python")
    if tool is not None:
        # Plain "user:password" lines, hashed in place by `mosquitto_passwd -U`, so no password
        # ever appears on a command line.
        plain = "".join(f"{a.username}:{a.password}\n" for a in accounts).encode()
        atomic_write(path, plain, mode=0o600)
        result = subprocess.run([tool, "-U", str(path)], capture_output=True, text=True, check=False)
        if result.returncode != 0 or b"$7$" not in path.read_bytes():
            path.unlink(missing_ok=True)
            raise ConfigError(f"mosquitto_passwd failed: {result.stderr.strip() or result.stdout.strip()}")
        return "mosquitto_passwd"
    lines = "".join(f"{a.username}:{mosquitto_password_hash(a.password)}\n" for a in accounts)
    atomic_write(path, lines.encode(), mode=0o600)
    return "python"


# -- ACL ----------------------------------------------------------------------------------------


def render_acl(
    devices: list[DeviceCredentials], prefix: str = DEFAULT_PREFIX, operator: str = OPERATOR_USERNAME
) -> str:
    """The Mosquitto ACL text for these devices (username = device id)."""
    Topics(prefix)  # validates the prefix
    lines = [
        "# edgekit broker ACL, generated by `edgekit broker mosquitto-config`; do not edit by hand.",
        "# Every device's username is its device id (%u), also on TLS listeners (certificate CN).",
        "# What every device may do with its own topics:",
        f"pattern write {prefix}/devices/%u/state",
        f"pattern write {prefix}/devices/%u/telemetry",
        f"pattern write {prefix}/devices/%u/events",
        f"pattern write {prefix}/devices/%u/capture",
        f"pattern write {prefix}/devices/%u/bench",
        f"pattern read {prefix}/devices/%u/capture_ack",
        f"pattern read {prefix}/devices/%u/state",
        f"pattern read {prefix}/devices/%u/desired",
        f"pattern read {prefix}/bundles/#",
        "",
        "# The operator (workstation, registry) reads and writes everything under the prefix.",
        f"user {operator}",
        f"topic readwrite {prefix}/#",
        "",
        "# Each device reads its own fleet's desired state, capture policy, bench request and TUF metadata.",
    ]
    for cred in sorted(devices, key=lambda c: c.device):
        lines += [
            f"user {cred.username}",
            f"topic read {prefix}/fleets/{cred.fleet}/desired",
            f"topic read {prefix}/fleets/{cred.fleet}/capture",
            f"topic read {prefix}/fleets/{cred.fleet}/bench",
            f"topic read {prefix}/fleets/{cred.fleet}/trust/#",
            "",
        ]
    return "\n".join(lines) + "\n"


# -- certificates -------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_fleet_ca(home: Optional[Path] = None) -> tuple[Path, Path]:
    """The fleet CA (certificate, key), created on first use (ECDSA P-256, 10 years)."""
    root = _store(home) / "ca"
    cert_path, key_path = root / "ca.pem", root / "ca.key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgekit fleet CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write(key_path, _key_pem(key), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.info("created the fleet CA at %s", cert_path)
    return cert_path, key_path


def _issue(
    home: Optional[Path],
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    out: Path,
) -> tuple[Path, Path]:
    ca_cert_path, ca_key_path = ensure_fleet_ca(home)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"the fleet CA key {ca_key_path} is not an EC key; delete the CA and create it again"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = out.with_name(out.name + ".pem"), out.with_name(out.name + ".key.pem")
    atomic_write(key_path, _key_pem(key), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def ensure_server_certificate(hosts: list[str], home: Optional[Path] = None) -> tuple[Path, Path]:
    """The broker's TLS certificate for ``hosts`` (names or IPs), signed by the fleet CA;
    re-issued when the host list changes."""
    if not hosts:
        raise ConfigError("the broker certificate needs at least one host name or IP (--tls-host)")
    root = _store(home) / "server"
    cert_path, key_path = root / "server.pem", root / "server.key.pem"
    hosts_path = root / "hosts.json"
    if (
        cert_path.exists()
        and key_path.exists()
        and hosts_path.exists()
        and json.loads(hosts_path.read_text()) == hosts
    ):
        return cert_path, key_path
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    result = _issue(home, hosts[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, root / "server")
    atomic_write(hosts_path, json.dumps(hosts).encode())
    return result


# -- devices ------------------------------------------------------------------------------------


def _device_from(path: Path) -> DeviceCredentials:
    doc = _read_json(path)
    root = path.parent
    cert, key = root / f"{doc['device']}.pem", root / f"{doc['device']}.key.pem"
    has_tls = cert.exists() and key.exists()
    return DeviceCredentials(
        device=doc["device"],
        fleet=doc["fleet"],
        username=doc["username"],
        password=doc["password"],
        path=path,
        cert_file=cert if has_tls else None,
        key_file=key if has_tls else None,
        ca_file=root.parent / "ca" / "ca.pem" if has_tls else None,
    )


def add_device(
    device: str, fleet: str, *, home: Optional[Path] = None, tls: bool = False, force: bool = False
) -> DeviceCredentials:
    """Create a device's broker account (username = device id, random password) and, with
    ``tls``, a client certificate signed by the fleet CA. Refuses to replace an existing
    device unless ``force`` (which issues a new password, invalidating the old one once the
    broker config is regenerated). Re-run :func:`write_mosquitto_config` afterwards."""
    check_device_id(device)
    check_fleet_id(fleet)
    if device == OPERATOR_USERNAME:
        raise ConfigError(f"{device!r} is the operator's username; choose another device id")
    root = _store(home) / "devices"
    path = root / f"{device}.json"
    if path.exists() and not force:
        existing = _device_from(path)
        raise ConfigError(
            f"device {device} already has broker credentials (fleet {existing.fleet}) in {path}; "
            "pass --force to issue new ones"
        )
    doc = {"device": device, "fleet": fleet, "username": device, "password": _new_password()}
    atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)
    if tls:
        _issue(home, device, [], ExtendedKeyUsageOID.CLIENT_AUTH, root / device)
    else:
        for stale in (root / f"{device}.pem", root / f"{device}.key.pem"):
            stale.unlink(missing_ok=True)
    log.info("created broker credentials for device %s of fleet %s", device, fleet, extra={"device": device})
    return _device_from(path)


def list_devices(home: Optional[Path] = None) -> list[DeviceCredentials]:
    """Every device with broker credentials, by device id."""
    return [_device_from(p) for p in sorted((_store(home) / "devices").glob("*.json"))]


# -- mosquitto.conf -----------------------------------------------------------------------------


def _mosquitto_account(run_as: Optional[str], output: Path) -> Optional[pwd.struct_passwd]:
    """The account Mosquitto will drop to when it is started by root (this process is root),
    checked: it exists and can reach ``output``. None when not root (Mosquitto stays who it is)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd  # POSIX only, and only root gets here

    name = run_as or "mosquitto"
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"Mosquitto, started as root, runs as user {name}, and there is no such account; "
            "pass --user with an account that exists (--user root keeps it root)"
        ) from None
    if account.pw_uid == 0:
        return account
    for parent in reversed(output.parents):
        try:
            info = parent.stat()
        except FileNotFoundError:
            break  # created below by root, 0755 (the umask permitting): reachable
        if not (
            info.st_mode & stat.S_IXOTH
            or (info.st_gid == account.pw_gid and info.st_mode & stat.S_IXGRP)
            or (info.st_uid == account.pw_uid and info.st_mode & stat.S_IXUSR)
        ):
            raise ConfigError(
                f"Mosquitto, started as root, runs as user {name}, which cannot open {output} "
                f"({parent} is closed to it); write the config where it can (e.g. -o "
                "/etc/mosquitto/edgekit), or pass --user root"
            )
    return account


def write_mosquitto_config(
    output: Path,
    port: int,
    *,
    home: Optional[Path] = None,
    host: str = "0.0.0.0",
    tls_port: Optional[int] = None,
    tls_hosts: Optional[list[str]] = None,
    prefix: str = DEFAULT_PREFIX,
    run_as: Optional[str] = None,
    hasher: str = "auto",
    persistence: bool = True,
    log_file: Optional[Path] = None,
) -> MosquittoConfig:
    """Write ``mosquitto.conf``, ``passwd`` and ``acl`` into ``output`` for every device in
    the store. ``tls_port`` adds a TLS listener that requires a client certificate signed by
    the fleet CA (CN = username). ``run_as`` sets Mosquitto's ``user``: started as root,
    Mosquitto drops to that account (default ``mosquitto``) before it reads the password file
    and ACL. So when this runs as root, ``output`` and what is in it are given to that account,
    and a ConfigError says so if the account cannot reach ``output`` (a parent directory closed
    to it, such as ``/root``): ``mosquitto -c output/mosquitto.conf`` then works as root too.
    ``hasher``: ``auto`` (mosquitto_passwd if installed), ``mosquitto_passwd`` or ``python``."""
    if not 1 <= port <= 65535 or (tls_port is not None and not 1 <= tls_port <= 65535):
        raise ConfigError("ports must be between 1 and 65535")
    if tls_port == port:
        raise ConfigError("--tls-port must differ from --port")
    if hasher not in ("auto", "mosquitto_passwd", "python"):
        raise ConfigError(f"unknown hasher {hasher!r}; use auto, mosquitto_passwd or python")
    output = Path(output).resolve()
    owner = _mosquitto_account(run_as, output)
    if owner is not None:
        run_as = owner.pw_name
    output.mkdir(parents=True, exist_ok=True)
    devices = list_devices(home)
    operator = operator_credentials(home)
    password_file, acl_file, config = output / "passwd", output / "acl", output / "mosquitto.conf"
    used = _write_password_file(
        password_file, [operator] + [Credentials(d.username, d.password) for d in devices], hasher
    )
    atomic_write(acl_file, render_acl(devices, prefix, operator.username).encode(), mode=0o600)
    lines = [
        "# Generated by `edgekit broker mosquitto-config`; re-run it after `edgekit broker add-device`",
        "# and reload Mosquitto (kill -HUP) to pick up new devices.",
        "per_listener_settings false",
        "allow_anonymous false",
        "# No client may send a larger packet (the largest chunk edgekit makes, with its topic).",
        f"max_packet_size {MAX_MESSAGE_SIZE}",
        "# Send every packet at once: MQTT answers small packets with small packets (a SUBACK, then",
        "# the retained manifest), which Nagle's algorithm would hold up to 40 ms each.",
        "set_tcp_nodelay true",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
    ]
    if run_as:
        lines.append(f"user {run_as}")
    if persistence:
        data = output / "data"
        data.mkdir(exist_ok=True)
        # Save retained bundles and desired states every minute, not only at a clean shutdown.
        lines += ["persistence true", f"persistence_location {data}/", "autosave_interval 60"]
    else:
        lines.append("persistence false")
    if log_file is not None:
        lines += [f"log_dest file {log_file}", "log_type error", "log_type warning", "log_type notice"]
    lines += ["", f"listener {port} {host}", "protocol mqtt"]
    if tls_port is not None:
        ca, _ = ensure_fleet_ca(home)
        cert, key = ensure_server_certificate(tls_hosts or ["localhost", "127.0.0.1"], home)
        lines += [
            "",
            "# TLS: clients must present a certificate signed by the fleet CA; its CN is the username.",
            f"listener {tls_port} {host}",
            "protocol mqtt",
            f"cafile {ca}",
            f"certfile {cert}",
            f"keyfile {key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    atomic_write(config, ("\n".join(lines) + "\n").encode(), mode=0o600)
    if owner is not None and owner.pw_uid != 0:
        for path in (output, password_file, acl_file, config, *([output / "data"] if persistence else [])):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return MosquittoConfig(
        config, password_file, acl_file, port, tls_port, len(devices), used, _store(home) / "operator.json"
    )
