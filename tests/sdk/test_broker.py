"""Broker credentials and the generated Mosquitto config, enforced by a real Mosquitto."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from edgekit.broker import (
    OPERATOR_USERNAME,
    DeviceCredentials,
    add_device,
    list_devices,
    mosquitto_password_hash,
    operator_credentials,
    write_mosquitto_config,
)
from edgekit.cli import main
from edgekit.errors import BrokerError, ConfigError, TopicError
from edgekit.manifest import MAX_MESSAGE_SIZE
from edgekit.mqtt import MqttClient, TlsConfig
from edgekit.topics import Topics
from helpers import free_port
from mqtt_helpers import Events, Inbox

T = Topics()


@dataclass
class Secured:
    url: str
    tls_url: str
    operator: MqttClient
    devices: dict[str, DeviceCredentials]
    directory: Path

    def device(self, name: str, protocol: str = "5") -> MqttClient:
        cred = self.devices[name]
        return MqttClient(
            self.url, client_id=name, username=cred.username, password=cred.password, protocol=protocol
        )


def secure(mosquitto, edgekit_home: Path, hasher: str = "auto") -> tuple[str, dict[str, DeviceCredentials]]:  # type: ignore[no-untyped-def]
    devices = {
        "cam-1": add_device("cam-1", "shop"),
        "cam-2": add_device("cam-2", "shop"),
        "wh-1": add_device("wh-1", "warehouse", tls=True),
    }
    tls_port = free_port()
    write_mosquitto_config(
        mosquitto.directory,
        mosquitto.port,
        host="127.0.0.1",
        tls_port=tls_port,
        run_as="root" if os.geteuid() == 0 else None,
        hasher=hasher,
        persistence=False,
        log_file=mosquitto.directory / "mosquitto.log",
    )
    mosquitto.stop()
    mosquitto.start()
    return f"mqtts://127.0.0.1:{tls_port}", devices


@pytest.fixture
def secured(mosquitto, edgekit_home: Path) -> Secured:  # type: ignore[no-untyped-def]
    tls_url, devices = secure(mosquitto, edgekit_home)
    op = operator_credentials()
    operator = MqttClient(mosquitto.url, username=op.username, password=op.password).connect()
    yield Secured(mosquitto.url, tls_url, operator, devices, mosquitto.directory)  # type: ignore[misc]
    operator.close()


# -- credentials store ------------------------------------------------------------------------------


def test_device_credentials_are_stored_privately_and_never_shown(edgekit_home: Path) -> None:
    cred = add_device("cam-1", "shop", tls=True)
    assert cred.username == "cam-1" and len(cred.password) >= 24
    assert stat.S_IMODE(cred.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((edgekit_home / "broker" / "devices").stat().st_mode) == 0o700
    assert cred.key_file is not None and stat.S_IMODE(cred.key_file.stat().st_mode) == 0o600
    assert cred.password not in repr(cred) and "***" in repr(cred)
    assert [d.device for d in list_devices()] == ["cam-1"]


def test_existing_device_is_not_replaced_without_force(edgekit_home: Path) -> None:
    first = add_device("cam-1", "shop")
    with pytest.raises(ConfigError, match="--force"):
        add_device("cam-1", "shop")
    assert add_device("cam-1", "shop", force=True).password != first.password


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", OPERATOR_USERNAME])
def test_bad_device_ids_are_refused(edgekit_home: Path, bad: str) -> None:
    with pytest.raises((TopicError, ConfigError)):
        add_device(bad, "shop")


def test_client_certificate_is_signed_by_the_fleet_ca(edgekit_home: Path) -> None:
    cred = add_device("cam-9", "shop", tls=True)
    assert cred.cert_file and cred.ca_file
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(cred.ca_file), "-purpose", "sslclient", str(cred.cert_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    subject = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(cred.cert_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CN = cam-9" in subject or "CN=cam-9" in subject


@pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="compares with mosquitto_passwd's output"
)
def test_python_password_hash_is_mosquitto_passwds_format(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("alice:correct horse\n")
    subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True)
    line = path.read_text().strip()
    _, _, iterations, salt, _ = line.split(":", 1)[1].split("$")
    ours = mosquitto_password_hash("correct horse", base64.b64decode(salt), int(iterations))
    assert line == f"alice:{ours}"


# -- the ACL matrix, enforced by Mosquitto -----------------------------------------------------------


def test_anonymous_and_wrong_passwords_are_refused(secured: Secured) -> None:
    with pytest.raises(BrokerError, match="refused the connection"):
        MqttClient(secured.url).connect(timeout=5)
    cred = secured.devices["cam-1"]
    with pytest.raises(BrokerError, match="refused the connection"):
        MqttClient(secured.url, username=cred.username, password="wrong").connect(timeout=5)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_device_publishes_only_its_own_state_telemetry_and_events(secured: Secured, protocol: str) -> None:
    seen = Inbox()
    secured.operator.subscribe(f"{T.prefix}/#", seen)
    forbidden = [
        T.device_state("cam-2"),
        T.device_telemetry("cam-2"),
        T.device_events("cam-2"),
        T.fleet_desired("shop"),
        T.device_desired("cam-1"),
        T.bundle_manifest("0" * 64),
    ]
    allowed = [T.device_state("cam-1"), T.device_telemetry("cam-1"), T.device_events("cam-1")]
    with secured.device("cam-1", protocol) as cam:
        for topic in forbidden:
            delivery = cam.publish(topic, b"impersonation", qos=1)
            if protocol == "5":  # MQTT 5 tells the publisher; 3.1.1 drops silently
                with pytest.raises(BrokerError, match="refused the message"):
                    delivery.wait(5)
            else:
                delivery.wait(5)
        for topic in allowed:
            cam.publish(topic, b"mine", qos=1).wait(5)
    # Messages from one client arrive in order, so the last allowed one closes the window.
    seen.wait_topic(allowed[-1])
    assert seen.topics() == allowed


def test_device_reads_only_its_fleet_and_own_desired_state_and_bundles(secured: Secured) -> None:
    op = secured.operator
    for topic in [
        T.fleet_desired("warehouse"),
        T.device_desired("cam-2"),
        T.device_telemetry("cam-2"),
        T.fleet_desired("shop"),
        T.device_desired("cam-1"),
        T.bundle_manifest("a" * 64),
    ]:
        op.publish(topic, topic.encode(), retain=True).wait(5)
    got = Inbox()
    with secured.device("cam-1") as cam:
        for topic_filter in [
            f"{T.prefix}/fleets/+/desired",
            f"{T.prefix}/devices/#",
            f"{T.prefix}/bundles/#",
        ]:
            cam.subscribe(topic_filter, got)
        got.wait_topic(T.bundle_manifest("a" * 64))
    assert sorted(got.topics()) == sorted(
        [T.fleet_desired("shop"), T.device_desired("cam-1"), T.bundle_manifest("a" * 64)]
    )


def test_device_cannot_read_another_fleets_desired_state_even_by_name(secured: Secured) -> None:
    secured.operator.publish(T.fleet_desired("warehouse"), b"secret plan", retain=True).wait(5)
    secured.operator.publish(T.fleet_desired("shop"), b"ours", retain=True).wait(5)
    got = Inbox()
    with secured.device("cam-1") as cam:
        # A broker may refuse the subscription outright; Mosquitto accepts it and filters on delivery.
        with contextlib.suppress(BrokerError):
            cam.subscribe(T.fleet_desired("warehouse"), got)
        cam.subscribe(T.fleet_desired("shop"), got)
        got.wait_topic(T.fleet_desired("shop"))
    assert got.topics() == [T.fleet_desired("shop")]


def test_device_reads_its_fleets_trust_metadata_and_not_another_fleets_and_cannot_write_it(
    secured: Secured,
) -> None:
    secured.operator.publish(T.fleet_trust("warehouse", "timestamp"), b"theirs", retain=True).wait(5)
    secured.operator.publish(T.fleet_trust("shop", "root/2"), b"our root", retain=True).wait(5)
    secured.operator.publish(T.fleet_trust("shop", "timestamp"), b"ours", retain=True).wait(5)
    got = Inbox()
    with secured.device("cam-1") as cam:
        with contextlib.suppress(BrokerError):
            cam.subscribe(T.fleet_trust_filter("warehouse"), got)
        cam.subscribe(T.fleet_trust_filter("shop"), got)
        got.wait_topic(T.fleet_trust("shop", "timestamp"))
        got.wait_topic(T.fleet_trust("shop", "root/2"))
        with pytest.raises(BrokerError, match="refused the message"):
            cam.publish(T.fleet_trust("shop", "timestamp"), b"forged", retain=True).wait(5)
    assert sorted(got.topics()) == [T.fleet_trust("shop", "root/2"), T.fleet_trust("shop", "timestamp")]


def test_operator_reads_and_writes_everything_under_the_prefix(secured: Secured) -> None:
    seen = Inbox()
    secured.operator.subscribe(T.all_devices_filter("state"), seen)
    with secured.device("cam-2") as cam:
        cam.publish(T.device_state("cam-2"), b"serving", retain=True).wait(5)
    assert seen.wait_topic(T.device_state("cam-2")).payload == b"serving"
    secured.operator.publish(T.fleet_desired("shop"), b"doc", retain=True).wait(5)


# -- TLS with client certificates ---------------------------------------------------------------------


def test_device_with_a_fleet_ca_certificate_connects_over_tls_under_its_acl(secured: Secured) -> None:
    cred = secured.devices["wh-1"]
    tls = TlsConfig(ca_file=cred.ca_file, cert_file=cred.cert_file, key_file=cred.key_file)
    seen = Inbox()
    secured.operator.subscribe(T.all_devices_filter("state"), seen)
    secured.operator.publish(T.fleet_desired("warehouse"), b"wh plan", retain=True).wait(5)
    got = Inbox()
    with MqttClient(secured.tls_url, client_id="wh-1", tls=tls) as device:
        device.subscribe(T.fleet_desired("warehouse"), got)
        assert got.wait_topic(T.fleet_desired("warehouse")).payload == b"wh plan"
        with pytest.raises(BrokerError, match="refused the message"):
            device.publish(T.device_state("cam-1"), b"impersonation").wait(5)
        device.publish(T.device_state("wh-1"), b"online").wait(5)
    seen.wait_topic(T.device_state("wh-1"))
    assert seen.topics() == [T.device_state("wh-1")]


def test_tls_without_a_client_certificate_is_refused(secured: Secured) -> None:
    ca = secured.devices["wh-1"].ca_file
    with pytest.raises(BrokerError, match="could not connect .*TLS failed .*certificate required"):
        MqttClient(secured.tls_url, tls=TlsConfig(ca_file=ca), reconnect_min=0.2).connect(timeout=2)


def test_tls_with_a_certificate_from_another_ca_is_refused(
    secured: Secured, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    ca = secured.devices["wh-1"].ca_file
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "rogue-home"))
    rogue = add_device("wh-1", "warehouse", tls=True)  # same name, signed by a different CA
    tls = TlsConfig(ca_file=ca, cert_file=rogue.cert_file, key_file=rogue.key_file)
    with pytest.raises(BrokerError, match="could not connect .*TLS failed .*unknown ca"):
        MqttClient(secured.tls_url, tls=tls, reconnect_min=0.2).connect(timeout=2)


# -- the python $7$ hasher, accepted by Mosquitto ---------------------------------------------------


def test_python_hashed_password_file_is_accepted_by_mosquitto(mosquitto, edgekit_home: Path) -> None:
    _, devices = secure(mosquitto, edgekit_home, hasher="python")
    assert "$7$101$" in (mosquitto.directory / "passwd").read_text()
    cred = devices["cam-1"]
    with MqttClient(mosquitto.url, username=cred.username, password=cred.password) as cam:
        cam.publish(T.device_state("cam-1"), b"ok").wait(5)
    with pytest.raises(BrokerError, match="refused the connection"):
        MqttClient(mosquitto.url, username=cred.username, password=cred.password + "x").connect(timeout=5)


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_writes_config_and_never_prints_passwords(edgekit_home: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as code:
        main(["broker", "add-device", "cam-1", "--fleet", "shop", "--tls", "--json"])
    assert code.value.code == 0
    added = json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit) as code:
        main(
            [
                "broker",
                "mosquitto-config",
                "--port",
                "18883",
                "-o",
                str(tmp_path / "conf"),
                "--user",
                "root",
                "--json",
            ]
        )
    assert code.value.code == 0
    written = json.loads(capsys.readouterr().out)
    assert written["devices"] == 1 and Path(written["config"]).exists()
    password = json.loads(Path(added["credentials"]).read_text())["password"]
    assert password not in json.dumps(added) + json.dumps(written)
    assert "listener 18883" in Path(written["config"]).read_text()


def test_cli_add_device_records_the_device_where_push_looks_for_it(edgekit_home: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`push` asks for the devices it knows by exact topic (brokers that send retained states to
    exact topics only): those of the fleet record and the registry's provisioning records. A
    device given a broker account with `broker add-device` must be one of them."""
    from edgekit.fleet.control import ControlPlane

    for device, fleet in (("cam-1", "shop"), ("cam-2", "shop"), ("wh-1", "warehouse")):
        with pytest.raises(SystemExit) as code:
            main(["broker", "add-device", device, "--fleet", fleet, "--json"])
        assert code.value.code == 0
    capsys.readouterr()
    with ControlPlane.open(f"sqlite:///{edgekit_home / 'registry.db'}") as control:
        rows = control.provisioned("shop")
        assert [(p.device, p.fleet, p.username, p.tls) for p in rows] == [
            ("cam-1", "shop", "cam-1", False),
            ("cam-2", "shop", "cam-2", False),
        ]
        assert [e.target for e in control.audit_log() if e.action == "device-add"] == [
            "wh-1",
            "cam-2",
            "cam-1",
        ]  # newest first


def test_cli_bad_device_id_is_one_line_error(edgekit_home: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as code:
        main(["broker", "add-device", "a/b", "--fleet", "shop"])
    assert code.value.code == TopicError.exit_code
    err = capsys.readouterr().err
    assert "invalid device id" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- the whole ACL matrix: every topic x every principal, publish and subscribe ---------------------

DIGEST = "d" * 64
FLEET_OF = {"cam-1": "shop", "cam-2": "shop", "wh-1": "warehouse"}
MATRIX_TOPICS = [
    T.fleet_desired("shop"),
    T.fleet_desired("warehouse"),
    *[T.device_desired(d) for d in FLEET_OF],
    *[getattr(T, f"device_{leaf}")(d) for d in FLEET_OF for leaf in ("state", "telemetry", "events")],
    T.bundle_manifest(DIGEST),
    T.bundle_chunk(DIGEST, 0),
]
WILDCARDS = ["#", f"{T.prefix}/#", f"{T.prefix}/+/+/+", f"{T.prefix}/devices/+/telemetry", "$SYS/#"]


def may(principal: str, topic: str) -> tuple[bool, bool]:
    """(read, write) as the generated ACL means it: docs/security.md, "MQTT"."""
    if principal == OPERATOR_USERNAME:
        return True, True
    parts = T.parse(topic)
    own = parts.device == principal
    write = own and parts.kind in ("device_state", "device_telemetry", "device_events")
    read = (
        (parts.kind == "fleet_desired" and parts.fleet == FLEET_OF[principal])
        or (own and parts.kind in ("device_desired", "device_state"))
        or parts.kind in ("bundle_manifest", "bundle_chunk")
    )
    return read, write


def connect_as(secured: Secured, principal: str) -> MqttClient:
    if principal == OPERATOR_USERNAME:
        op = operator_credentials()
        return MqttClient(secured.url, client_id="matrix-op", username=op.username, password=op.password)
    cred = secured.devices[principal]
    if cred.cert_file is not None:  # wh-1: its identity is its client certificate's CN, over TLS
        tls = TlsConfig(ca_file=cred.ca_file, cert_file=cred.cert_file, key_file=cred.key_file)
        return MqttClient(secured.tls_url, client_id=f"matrix-{principal}", tls=tls)
    return MqttClient(
        secured.url, client_id=f"matrix-{principal}", username=principal, password=cred.password
    )


@pytest.mark.parametrize("principal", ["cam-1", "cam-2", "wh-1", OPERATOR_USERNAME])
def test_acl_matrix_publish_every_topic(secured: Secured, principal: str) -> None:
    """Each principal publishes (retained, so a refused message could also poison later
    subscribers) on every topic: what the ACL forbids is refused to the publisher (MQTT 5) and
    never reaches the operator's ``#`` subscription nor the retained store."""
    seen = Inbox()
    secured.operator.subscribe(f"{T.prefix}/#", seen)
    control = T.device_events(principal) if principal in FLEET_OF else T.device_events("cam-9")
    with connect_as(secured, principal).connect() as client:
        for topic in MATRIX_TOPICS:
            delivery = client.publish(topic, f"{principal}>{topic}".encode(), qos=1, retain=True)
            if may(principal, topic)[1]:
                delivery.wait(5)
            else:
                with pytest.raises(BrokerError, match="refused the message"):
                    delivery.wait(5)
        client.publish(control, f"{principal}>control".encode(), qos=1).wait(5)
    # One publisher's messages arrive in order: the control closes the window (no sleep).
    seen.wait_for(lambda ms: any(m.payload == f"{principal}>control".encode() for m in ms))
    mine = {
        m.topic
        for m in seen.messages
        if m.payload.startswith(f"{principal}>".encode()) and not m.payload.endswith(b">control")
    }
    assert mine == {t for t in MATRIX_TOPICS if may(principal, t)[1]}
    # The retained store holds only what the principal was allowed to write.
    retained = Inbox()
    with connect_as(secured, OPERATOR_USERNAME).connect() as op:
        op.subscribe(f"{T.prefix}/#", retained)
        op.publish(T.device_events("cam-9"), b"end", qos=1).wait(5)
        retained.wait_for(lambda ms: any(m.payload == b"end" for m in ms))
    assert {m.topic for m in retained.messages if m.retain} == {
        t for t in MATRIX_TOPICS if may(principal, t)[1]
    }


@pytest.mark.parametrize("principal", ["cam-1", "cam-2", "wh-1", OPERATOR_USERNAME])
def test_acl_matrix_subscribe_every_topic_and_wildcard(secured: Secured, principal: str) -> None:
    """Each principal subscribes to every topic by name and to the broadest wildcards it can
    write; it gets (retained, then live) exactly what the ACL lets it read, nothing else.
    The last subscription and the last live message are on a topic it may read: their arrival
    closes the window, since a client's messages are delivered in order."""
    op = secured.operator
    for topic in MATRIX_TOPICS:
        op.publish(topic, f"retained>{topic}".encode(), qos=1, retain=True).wait(5)
    control = T.bundle_chunk(DIGEST, 0)
    readable = {t for t in MATRIX_TOPICS if may(principal, t)[0]}
    got = Inbox()
    with connect_as(secured, principal).connect() as client:
        for topic_filter in [*WILDCARDS, *MATRIX_TOPICS, control]:
            with contextlib.suppress(BrokerError):  # a broker may refuse a subscription outright
                client.subscribe(topic_filter, got)
        got.wait_for(lambda ms: {m.topic for m in ms} >= readable)
        for topic in MATRIX_TOPICS:
            op.publish(topic, f"live>{topic}".encode(), qos=1).wait(5)
        op.publish(control, b"live>end", qos=1).wait(5)
        got.wait_for(lambda ms: any(m.payload == b"live>end" for m in ms))
    ours = [m for m in got.messages if m.topic.startswith(f"{T.prefix}/")]
    assert {m.topic for m in ours if m.payload.startswith(b"retained>")} == readable
    assert {m.topic for m in ours if m.payload.startswith(b"live>") and m.payload != b"live>end"} == readable
    assert not [m for m in got.messages if m.topic.startswith("$SYS")]


def test_anonymous_clients_can_neither_publish_nor_subscribe(secured: Secured) -> None:
    """Anonymous: no connection at all, on the plain listener and on TLS without a certificate."""
    with pytest.raises(BrokerError, match="refused the connection"):
        MqttClient(secured.url, protocol="3.1.1").connect(timeout=5)
    ca = secured.devices["wh-1"].ca_file
    with pytest.raises(BrokerError, match="could not connect"):
        MqttClient(secured.tls_url, tls=TlsConfig(ca_file=ca), reconnect_min=0.2).connect(timeout=2)


def test_a_device_using_another_devices_client_id_still_acts_only_as_itself(secured: Secured) -> None:
    """Identity is the account (or certificate CN), never the client id: cam-2 connecting as
    client id ``edgekit-cam-1`` may not speak for cam-1. (It does take over that session:
    Mosquitto drops the older connection with the same client id; docs/security.md.)"""
    cred = secured.devices["cam-2"]
    seen = Inbox()
    secured.operator.subscribe(T.all_devices_filter("state"), seen)
    with MqttClient(
        secured.url, client_id="edgekit-cam-1", username=cred.username, password=cred.password
    ).connect() as spoof:
        with pytest.raises(BrokerError, match="refused the message"):
            spoof.publish(T.device_state("cam-1"), b"serving evil", qos=1).wait(5)
        spoof.publish(T.device_state("cam-2"), b"mine", qos=1).wait(5)
    seen.wait_topic(T.device_state("cam-2"))
    assert seen.topics() == [T.device_state("cam-2")]


# -- endless messages: cut off at the broker ------------------------------------------------------------


def test_the_broker_refuses_a_packet_larger_than_any_edgekit_sends(secured: Secured) -> None:
    """The generated config caps packets at MAX_MESSAGE_SIZE: a client that sends more is
    disconnected and its message goes nowhere."""
    config = (secured.directory / "mosquitto.conf").read_text()
    assert f"max_packet_size {MAX_MESSAGE_SIZE}" in config
    assert "set_tcp_nodelay true" in config  # small packets (SUBACK, then the manifest) go out at once
    seen = Inbox()
    secured.operator.subscribe(T.all_devices_filter("telemetry"), seen)
    drops = Events()
    with secured.device("cam-1") as cam:
        cam.on_connection_change(drops)
        cam.publish(T.device_telemetry("cam-1"), b"x" * (MAX_MESSAGE_SIZE + 1), qos=0)
        drops.wait_count(False, 1)
        cam.wait_connected(10)
        cam.publish(T.device_telemetry("cam-1"), b"small", qos=1).wait(10)
    seen.wait_topic(T.device_telemetry("cam-1"))
    assert [m.payload for m in seen.messages] == [b"small"]


def test_a_device_is_never_sent_a_packet_over_its_own_limit(mosquitto) -> None:
    """Devices connect with an MQTT 5 Maximum Packet Size (MAX_MESSAGE_SIZE in the daemon):
    the broker drops a larger message for them instead of delivering it. Shown with 64 KiB."""
    got = Inbox()
    with (
        MqttClient(mosquitto.url, max_packet_size=64 * 1024) as device,
        MqttClient(mosquitto.url) as other,
    ):
        device.subscribe(T.device_desired("cam-1"), got)
        other.publish(T.device_desired("cam-1"), b"x" * (256 * 1024), qos=1).wait(5)
        other.publish(T.device_desired("cam-1"), b"fits", qos=1).wait(5)
        got.wait_for(lambda ms: any(m.payload == b"fits" for m in ms))
    assert [m.payload for m in got.messages] == [b"fits"]


# -- run as root ------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="what root gets: run the tests as root (CI does)")
def test_run_as_root_the_printed_start_command_works_as_printed(edgekit_home: Path) -> None:
    """Started as root, Mosquitto drops to user mosquitto before reading the password file:
    the files are given to that account, and the command printed starts a working broker."""
    import pwd
    import shlex
    import sys
    import tempfile

    account = pwd.getpwnam("mosquitto")
    cam = add_device("cam-1", "shop")
    parent = Path(tempfile.mkdtemp(prefix="edgekit-broker-"))  # under /tmp, so reachable by all
    os.chmod(parent, 0o755)
    port = free_port()
    mosquitto = None
    try:
        edgekit = Path(sys.executable).with_name("edgekit")
        out = subprocess.run(
            [
                str(edgekit),
                "broker",
                "mosquitto-config",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "-o",
                str(parent / "conf"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        command = next(line for line in out.splitlines() if line.startswith("Start the broker with: "))
        argv = shlex.split(command.removeprefix("Start the broker with: "))
        assert argv[0] == "mosquitto"
        argv[0] = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        assert (parent / "conf" / "passwd").stat().st_uid == account.pw_uid
        mosquitto = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        operator = operator_credentials()
        with MqttClient(
            f"mqtt://127.0.0.1:{port}", username=operator.username, password=operator.password
        ) as op:
            op.publish(T.fleet_desired("shop"), b"kept", retain=True).wait(10)
        inbox = Inbox()
        with MqttClient(f"mqtt://127.0.0.1:{port}", username=cam.username, password=cam.password) as device:
            device.subscribe(T.fleet_desired("shop"), inbox)
            assert inbox.wait_topic(T.fleet_desired("shop")).payload == b"kept"
        assert mosquitto.poll() is None
    finally:
        if mosquitto is not None:
            mosquitto.terminate()
            mosquitto.wait(10)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="what root gets: run the tests as root (CI does)")
def test_run_as_root_a_directory_mosquitto_cannot_reach_is_one_line_naming_the_fix(
    edgekit_home: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(SystemExit) as code:
        main(["broker", "mosquitto-config", "-o", str(closed / "conf")])
    assert code.value.code == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert "runs as user mosquitto, which cannot open" in err and "--user root" in err
    assert len(err.splitlines()) == 1 and not (closed / "conf").exists()
