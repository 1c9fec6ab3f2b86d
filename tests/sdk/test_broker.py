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
from edgekit.mqtt import MqttClient, TlsConfig
from edgekit.topics import Topics
from helpers import free_port
from mqtt_helpers import Inbox

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
    with pytest.raises(BrokerError, match="could not connect"):
        MqttClient(secured.tls_url, tls=TlsConfig(ca_file=ca), reconnect_min=0.2).connect(timeout=2)


def test_tls_with_a_certificate_from_another_ca_is_refused(
    secured: Secured, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    ca = secured.devices["wh-1"].ca_file
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "rogue-home"))
    rogue = add_device("wh-1", "warehouse", tls=True)  # same name, signed by a different CA
    tls = TlsConfig(ca_file=ca, cert_file=rogue.cert_file, key_file=rogue.key_file)
    with pytest.raises(BrokerError, match="could not connect"):
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
        main(["broker", "mosquitto-config", "--port", "18883", "-o", str(tmp_path / "conf"), "--json"])
    assert code.value.code == 0
    written = json.loads(capsys.readouterr().out)
    assert written["devices"] == 1 and Path(written["config"]).exists()
    password = json.loads(Path(added["credentials"]).read_text())["password"]
    assert password not in json.dumps(added) + json.dumps(written)
    assert "listener 18883" in Path(written["config"]).read_text()


def test_cli_bad_device_id_is_one_line_error(edgekit_home: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as code:
        main(["broker", "add-device", "a/b", "--fleet", "shop"])
    assert code.value.code == TopicError.exit_code
    err = capsys.readouterr().err
    assert "invalid device id" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
