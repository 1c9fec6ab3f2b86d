"""The broker matrix: on every broker edgekit supports, `edgekit push --wait` reaches three agents,
a late joiner gets the bundle from the broker alone, and a broker restart in the middle of a
download does not stop the rollout. Real agent processes (`edgekit-agent run`), the real CLI,
real brokers:

- Mosquitto 2, the agents and the CLI negotiating MQTT 5; and the same pinned to MQTT 3.1.1;
- the embedded broker of `fleet up` (amqtt, MQTT 3.1.1, negotiated);
- RabbitMQ's MQTT plugin (MQTT 3.1.1, retained messages sent to exact-topic subscriptions only),
  with a broker account per device (`rabbitmqctl add_user`); SKIPPED, saying so, where
  RabbitMQ is not installed (`make rabbitmq` installs and starts it).

And `fleet up` running Mosquitto: devices provisioned with `edgekit device add` get accounts
and ACLs while it runs; an anonymous client and a device writing another's topic are refused.

docs/broker.md has the table of what each broker supports.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from edgekit import SigningKey, create_bundle
from edgekit.broker import list_devices
from edgekit.keys import load_signing_key
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics
from test_push import Fleet, edgekit
from watcher import Watcher

T = Topics()


@dataclass
class Lane:
    """A broker under test: the URL everyone is given, and how to restart it."""

    url: str
    restart: Callable[[], None]
    fleet: str = "lab"
    devices: list[str] = field(default_factory=lambda: [f"cam-{i}" for i in range(1, 5)])
    #: Device -> (username, password), for brokers with an account per device.
    accounts: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Whether a subscription to edgekit/devices/# gets the retained states (not on RabbitMQ).
    wildcard_retained: bool = True
    #: Mosquitto's log, and what it logs for the protocol every client must have used (p5: MQTT 5, p2: 3.1.1).
    log: Path | None = None
    level: str = ""


class AccountFleet(Fleet):
    """`edgekit-agent run` processes of ``fleet``, with their broker accounts in their configs."""

    def __init__(self, root: Path, lane: Lane, home: Path) -> None:
        super().__init__(root, lane.url, home)
        self.lane = lane

    def config(self, device: str) -> Path:
        path = super().config(device)
        text = path.read_text().replace('fleet = "lab"', f'fleet = "{self.lane.fleet}"')
        if device in self.lane.accounts:
            username, password = self.lane.accounts[device]
            text += f'[mqtt]\nusername = "{username}"\npassword = "{password}"\n'
        path.write_text(text)
        return path


def push(target: Path, lane: Lane, *extra: str) -> dict:
    result = edgekit(
        "push",
        str(target),
        "--fleet",
        lane.fleet,
        "--wait",
        "--timeout",
        "180",
        "--broker",
        lane.url,
        "--json",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def restart_mosquitto(mosquitto) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    mosquitto.persist()

    def restart() -> None:
        mosquitto.stop(graceful=True)  # as `systemctl restart`: retained messages are saved
        mosquitto.start()

    return restart


@pytest.fixture(params=["mosquitto-5", "mosquitto-3.1.1", "embedded-amqtt", "rabbitmq"])
def lane(request: pytest.FixtureRequest, edgekit_home: Path, tmp_path: Path) -> Iterator[Lane]:
    kind = request.param
    assert edgekit("keys", "init").returncode == 0  # the fleet's signing key (and devices trust it)
    if kind.startswith("mosquitto"):
        mosquitto = request.getfixturevalue("mosquitto")
        restart = restart_mosquitto(mosquitto)
        pinned = kind.endswith("3.1.1")
        url = mosquitto.url + ("?protocol=3.1.1" if pinned else "")
        yield Lane(url, restart, log=mosquitto.directory / "mosquitto.log", level="p2" if pinned else "p5")
    elif kind == "embedded-amqtt":
        embedded = request.getfixturevalue("embedded")

        def restart() -> None:
            embedded.stop()  # retained messages are in its data_dir
            embedded.start()

        yield Lane(embedded.url, restart)
    else:
        rabbitmq = request.getfixturevalue("rabbitmq")
        run = uuid.uuid4().hex[:6]  # the node outlives the test: names of this run only
        devices = [f"cam-{run}-{i}" for i in range(1, 5)]
        lane = Lane(rabbitmq.url, rabbitmq.restart_mqtt, f"lab-{run}", devices, wildcard_retained=False)
        for device in devices:
            # Provisioned as a user does it: the workstation knows the device (push asks for its
            # state by name), and its account goes to RabbitMQ.
            added = edgekit(
                "device", "add", device, "--fleet", lane.fleet, "--broker", lane.url,
                "--state-dir", str(tmp_path / device), "-o", str(tmp_path / f"{device}.provisioned.toml"),
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            cred = next(c for c in list_devices(edgekit_home) if c.device == device)
            rabbitmq.add_user(cred.username, cred.password)
            lane.accounts[device] = (cred.username, cred.password)
        yield lane
        # RabbitMQ keeps retained messages on disk: take this run's away.
        with MqttClient(rabbitmq.url) as client:
            client.publish(T.fleet_desired(lane.fleet), b"", retain=True).wait(10)
            for device in devices:
                client.publish(T.device_state(device), b"", retain=True).wait(10)


def test_push_wait_a_late_joiner_and_a_restart_mid_download_on_every_broker(
    lane: Lane, edgekit_home: Path, tmp_path: Path, digits_models
):  # type: ignore[no-untyped-def]
    key: SigningKey = load_signing_key(edgekit_home)
    first, late = lane.devices[:3], lane.devices[3]
    fleet = AccountFleet(tmp_path, lane, edgekit_home)
    watcher = Watcher(lane.url)
    pool = ThreadPoolExecutor(1)
    try:
        for device in first:
            fleet.start(device)
        watcher.wait_for(lambda _: all(watcher.states(d) for d in first), timeout=60)
        outcome = push(digits_models.fp32, lane, "--version", "1.0.0")
        assert outcome["phase"] == "done" and outcome["failed"] == {}
        assert {d: s["version"] for d, s in outcome["devices"].items()} == dict.fromkeys(first, "1.0.0")

        # A device that joins now gets the desired state and the bundle from the broker alone.
        fleet.start(late)
        watcher.wait_for(watcher.serving("1.0.0", late), timeout=60)

        # A bigger bundle (its padding is outside the model; the interpreter ignores it), so the
        # restart lands while the devices are fetching it.
        padded = tmp_path / "padded.tflite"
        padded.write_bytes(digits_models.fp32.read_bytes() + bytes(range(256)) * 48 * 1024)  # +12 MiB
        bundle = tmp_path / "digits-2.0.0.ekb"
        create_bundle(padded, name="digits", version="2.0.0", key=key, output=bundle, chunk_size=64 * 1024)
        pending = pool.submit(push, bundle, lane)
        watcher.wait_for(
            lambda _: any(s.status == "downloading" for d in lane.devices for s in watcher.states(d)),
            timeout=60,
        )
        lane.restart()
        outcome = pending.result(timeout=240)
        assert outcome["phase"] == "done" and outcome["failed"] == {}
        assert {d: s["version"] for d, s in outcome["devices"].items()} == dict.fromkeys(
            lane.devices, "2.0.0"
        )
        if lane.log is not None:  # every client (agents, push, watcher) spoke the lane's protocol
            levels = {
                line.split(" (")[1][:2]
                for line in lane.log.read_text().splitlines()
                if "New client connected" in line
            }
            assert levels == {lane.level}, levels
        if lane.wildcard_retained:  # the broker kept the states across its restart
            watcher.close()
            watcher = Watcher(lane.url)
            watcher.wait_for(lambda _: all(watcher.serving("2.0.0", d)(_) for d in lane.devices))
    finally:
        pool.shutdown(wait=True)  # the push times out on its own (--timeout 180)
        watcher.close()
        fleet.stop()


def test_fleet_up_runs_mosquitto_with_an_account_and_acl_for_each_device_added_while_it_runs(
    edgekit_home: Path, tmp_path: Path, digits_models
):  # type: ignore[no-untyped-def]
    import subprocess

    from edgekit.errors import BrokerError
    from helpers import free_port
    from test_fleet_cli import BIN
    from test_serve import Served

    assert edgekit("keys", "init").returncode == 0
    up = Served(["--port", str(free_port())], tmp_path / "up.log", command="up")
    agent = None
    try:
        assert (up.urls["broker_kind"], up.urls["broker_acl"]) == ("mosquitto", True)
        url = up.urls["broker"]
        with pytest.raises(BrokerError, match="refused the connection: Not authorized"):
            MqttClient(url).connect(timeout=5)  # no anonymous access
        config = tmp_path / "cam-1.toml"
        added = edgekit(
            "device",
            "add",
            "cam-1",
            "--fleet",
            "lab",
            "--broker",
            url,
            "--state-dir",
            str(tmp_path / "cam-1"),
            "-o",
            str(config),
        )
        assert added.returncode == 0, added.stderr
        agent = subprocess.Popen(
            [str(BIN / "edgekit-agent"), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "cam-1.log").open("wb"),
        )
        fleet = Lane(url, lambda: None, devices=["cam-1"])
        outcome = push(digits_models.fp32, fleet, "--version", "1.0.0")  # the operator account
        assert outcome["phase"] == "done" and outcome["devices"]["cam-1"]["version"] == "1.0.0"
        # The device's account may write its own topics only (MQTT 5: the broker says no).
        cam = next(d for d in list_devices(edgekit_home) if d.device == "cam-1")
        with MqttClient(url, username=cam.username, password=cam.password) as device:
            assert device.protocol == "5"
            device.publish(T.device_events("cam-1"), b"{}", qos=1).wait(10)
            with pytest.raises(BrokerError, match="[Nn]ot authori[sz]ed"):
                device.publish(T.device_state("cam-2"), b"{}", qos=1).wait(10)
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(30)
        final = up.stop()
    assert final["stopped"] and final["rejected"] == 1  # the "{}" event above: counted, dropped
    # Mosquitto saved the retained messages (desired state, bundle) in the fleet's data dir.
    assert (edgekit_home / "mosquitto" / "data" / "mosquitto.db").stat().st_size > 0
