"""A workstation-side client for tests that watch devices through a real broker: it records
every message under ``edgekit/devices/#`` and lets a test wait (on a condition, never a sleep)
for what the devices say; it also publishes bundles and signed desired states."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from edgekit import SigningKey, TrustedKeys
from edgekit.bundle import read_bundle
from edgekit.desired import new_desired_state, sign_desired_state
from edgekit.mqtt import Message, MqttClient
from edgekit.reports import DeviceStateReport
from edgekit.topics import Topics
from edgekit.transfer import publish_bundle

TOPICS = Topics()
#: Seconds between re-checks of a wait_for predicate when no message arrives.
RECHECK = 0.1


class Watcher:
    """A workstation-side client that records every message under edgekit/# as it arrives."""

    def __init__(self, url: str) -> None:
        self.client = MqttClient(url, client_id="test-watcher").connect(timeout=10)
        self.messages: list[Message] = []
        self._changed = threading.Condition()
        self.client.subscribe("edgekit/devices/#", self._on_message)

    def _on_message(self, message: Message) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Message]], object], timeout: float = 30.0) -> object:
        """Wait until ``predicate(messages)`` is truthy: woken by each message that arrives, and
        every :data:`RECHECK` seconds besides, for predicates that read a device's own state
        (an in-process daemon's counters or trust metadata), which no message announces."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (result := predicate(self.messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, RECHECK))
        assert result, f"timed out; last messages: {[m.topic for m in self.messages[-5:]]}"
        return result

    def states(self, device: str = "pi-01") -> list[DeviceStateReport]:
        topic = TOPICS.device_state(device)
        return [
            DeviceStateReport.from_json(m.payload) for m in self.messages if m.topic == topic and m.payload
        ]

    def serving(self, version: str, device: str = "pi-01") -> Callable[[list[Message]], bool]:
        def check(_: list[Message]) -> bool:
            states = self.states(device)
            return bool(states) and states[-1].status == "serving" and states[-1].bundle_version == version

        return check

    def records(self, leaf: str, device: str = "pi-01") -> list[dict]:
        topic = f"edgekit/devices/{device}/{leaf}"
        return [json.loads(m.payload) for m in self.messages if m.topic == topic]

    def publish_bundle(self, path: Path, key: SigningKey) -> str:
        return publish_bundle(self.client, read_bundle(path, TrustedKeys([key.public])))

    def desire(
        self,
        key: SigningKey,
        path: Path,
        seq: int,
        fleet: str = "lab",
        device: str | None = None,
        **kwargs: object,
    ) -> None:
        bundle = read_bundle(path, TrustedKeys([key.public]))
        state = new_desired_state(
            fleet,
            bundle_sha256=bundle.bundle_id,
            bundle_name=bundle.manifest.name,
            bundle_version=bundle.manifest.version,
            seq=seq,
            device=device,
            **kwargs,
        )
        topic = TOPICS.device_desired(device) if device else TOPICS.fleet_desired(fleet)
        self.client.publish(topic, sign_desired_state(state, key), retain=True).wait(10)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def watcher(mosquitto) -> Iterator[Watcher]:
    w = Watcher(mosquitto.url)
    yield w
    w.close()
