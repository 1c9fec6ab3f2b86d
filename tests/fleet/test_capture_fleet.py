"""Capture end to end on a real Mosquitto, real agents and a real registry (SQLite and
PostgreSQL): a drifted device's inputs come back to the owner, sealed all the way, as a dataset
that converts; refusals are events; a bad record is refused on pull and the rest kept."""

# ruff: noqa: F811 - the device and serve fixtures are imported into this module by name
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from device_fixtures import bundles, key, make_config, models, other_key  # noqa: F401 - fixtures
from edgekit import SigningKey, TrustedKeys, create_bundle
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.broker import operator_credentials
from edgekit.capture import (
    CaptureKey,
    init_capture_key,
    new_capture_policy,
    seal_record,
    sign_capture_policy,
)
from edgekit.data import load_data
from edgekit.fleet.capture import CaptureSink, current_policy, pull, purge, set_policy, turn_off
from edgekit.fleet.control import ControlPlane
from edgekit.fleet.push import connect_operator
from edgekit.fleet.registry.models import CaptureRecordRow
from edgekit.keys import load_signing_key
from edgekit.mqtt import Message, MqttClient
from edgekit.topics import Topics
from helpers import device_on_generated_broker, edgekit
from test_serve import serve  # noqa: F401 - a fixture

TOPICS = Topics()


class Spy:
    """Every message on the broker, as an operator-level account sees it (on a broker with
    accounts, logged in as the operator: everything under the prefix)."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None) -> None:
        self.client = MqttClient(url, client_id="capture-spy", username=username, password=password).connect(
            timeout=10
        )
        self.messages: list[Message] = []
        self.changed = threading.Condition()
        self.client.subscribe("#" if username is None else "edgekit/#", self._on)

    def _on(self, message: Message) -> None:
        with self.changed:
            self.messages.append(message)
            self.changed.notify_all()

    def events(self, kind: str) -> list[dict]:
        return [
            json.loads(m.payload)
            for m in list(self.messages)
            if m.topic.endswith("/events") and json.loads(m.payload)["kind"] == kind
        ]

    def wait_events(self, kind: str, count: int, timeout: float = 30.0) -> list[dict]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.events(kind)) >= count, timeout), (
                f"never saw {count} {kind} events; saw {[m.topic for m in self.messages[-8:]]}"
            )
        return self.events(kind)


@dataclass
class Rig:
    control: ControlPlane
    operator: MqttClient
    device: AgentDaemon
    sink: CaptureSink
    spy: Spy
    owner: CaptureKey


@pytest.fixture
def rig(mosquitto, registry_url, make_config, bundles, key, edgekit_home) -> Iterator[Rig]:
    control = ControlPlane.open(registry_url, TrustedKeys([key.public]))
    spy = Spy(mosquitto.url)
    operator = MqttClient(mosquitto.url, client_id="capture-operator").connect(timeout=10)
    sink = CaptureSink(control.registry, MqttClient(mosquitto.url, client_id="capture-sink")).start()
    config = make_config(
        "pi-01", broker=mosquitto.url, telemetry_interval=3600, drift_window=100, drift_sample_rate=1.0
    )
    agent = Agent.from_config(config, background=False)
    agent.install(bundles.v1)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    owner = init_capture_key(edgekit_home, b"owner passphrase")
    yield Rig(control, operator, daemon, sink, spy, owner)
    daemon.stop()
    agent.close()
    sink.stop()
    operator.close()
    spy.client.close()
    control.close()


@dataclass
class Shop(Rig):
    """A fleet as an owner sets it up: `edgekit keys init`, `device add`, the broker's own config
    (`broker mosquitto-config`: accounts and ACLs, no anonymous access), the device's agent with its
    daemon, the fleet's capture sink and a spy, both logged in as the operator."""

    key: SigningKey
    broker: str
    registry: str


@pytest.fixture
def shop(mosquitto, registry_url, edgekit_home, tmp_path, models) -> Iterator[Shop]:
    assert edgekit("keys", "init").returncode == 0
    config = device_on_generated_broker(mosquitto, tmp_path, "pi-01")
    mosquitto.stop()
    mosquitto.start()
    # Every sampled input judged, in windows of 100; telemetry flushed by hand.
    text = config.read_text()
    for old, new in (("sample_rate = 0.05", "sample_rate = 1.0"), ("window = 200", "window = 100"),
                     ("interval = 60", "interval = 3600"), ("threads = 0", "threads = 1")):  # fmt: skip
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)
    signer = load_signing_key(edgekit_home)
    v1 = tmp_path / "digits-1.0.0.ekb"
    create_bundle(
        models.fp32, name="digits", version="1.0.0", key=signer, output=v1, baseline=models.data_npz
    )
    account = operator_credentials(edgekit_home)
    control = ControlPlane.open(registry_url, TrustedKeys([signer.public]), home=edgekit_home)
    spy = Spy(mosquitto.url, account.username, account.password)
    operator = connect_operator(mosquitto.url, home=edgekit_home)
    sink = CaptureSink(
        control.registry,
        MqttClient(
            mosquitto.url, client_id="capture-sink", username=account.username, password=account.password
        ),
    ).start()
    agent = Agent.from_config(config, background=False)
    agent.install(v1)  # what the device served before it drifted
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    owner = init_capture_key(edgekit_home, b"owner passphrase")
    yield Shop(control, operator, daemon, sink, spy, owner, signer, mosquitto.url, registry_url)
    daemon.stop()
    agent.close()
    sink.stop()
    operator.close()
    spy.client.close()
    control.close()


def _windows(data: bytes, size: int = 16) -> set[bytes]:
    return {data[i : i + size] for i in range(len(data) - size + 1)}


def _accuracy(agent: Agent, xs: np.ndarray, ys: np.ndarray) -> float:
    return float(np.mean([int(np.argmax(agent.predict(x)[0])) == int(y) for x, y in zip(xs, ys)]))


def test_drift_capture_pull_label_finetune_convert_push_and_drift_clears(
    shop, models, digits_models, tmp_path
):
    """The issue's round trip: a drifted device -> capture -> pull -> label -> fine-tune ->
    convert -> `edgekit push --wait` -> the device no longer drifts, and answers the drifted
    inputs better than before."""
    agent = shop.device.agent
    set_policy(
        shop.control,
        shop.operator,
        shop.key,
        "lab",
        shop.owner.public_raw,
        triggers=("drift",),
        max_per_hour=1000,
        note="retrain the shelf model after the lights changed",
    )
    assert agent.capture.wait_for(lambda c: c.armed, 30)
    inverted = (1.0 - models.x_test).astype(np.float32)  # the device's camera now sees this
    seen, held_out, truth_out = inverted[:200], inverted[200:], models.y_test[200:]
    for x in seen:  # two windows of 100, both flagged: their inputs are captured
        agent.predict(x)
    assert agent.drift().drifted
    assert agent.capture.stats.by_trigger == {"drift": 200}
    # Uploaded in chunks, stored by the fleet (ciphertext), acknowledged, deleted on the device.
    assert shop.sink.wait_for(200, timeout=120)
    assert agent.capture.wait_for(lambda c: len(c) == 0, 60)
    # Nobody on the broker, not even the operator's account, saw a byte of what the camera saw:
    # no 16-byte run of any captured input (nor the whole input) is in any message.
    messages = list(shop.spy.messages)
    assert any(m.topic == TOPICS.device_capture("pi-01") for m in messages)
    on_the_wire: set[bytes] = set()
    for message in messages:
        on_the_wire |= _windows(message.payload)
    for x in seen:
        raw = x[None].tobytes()
        assert not any(raw in m.payload for m in messages)
        assert not (_windows(raw) & on_the_wire)
    turn_off(shop.control, shop.operator, shop.key, "lab")  # enough: the owner turns it off
    assert agent.capture.wait_for(lambda c: not c.armed, 30)

    # The owner pulls them into a dataset and labels it.
    out = tmp_path / "field"
    result = pull(shop.control, shop.owner, "lab", out)
    assert result.written == 200 and result.refused == []
    lines = [json.loads(t) for t in (out / "records.jsonl").read_text().splitlines()]
    assert {line["trigger"] for line in lines} == {"drift"} and lines[0]["bundle"]["version"] == "1.0.0"
    assert {np.load(out / line["input"]).tobytes() for line in lines} == {x.tobytes() for x in seen}
    assert (out / lines[0]["image"]).exists()
    readme = (out / "README.md").read_text()
    assert "retrain the shelf model" in readme and "when drift is flagged" in readme
    truth = {x.tobytes(): int(y) for x, y in zip(inverted, models.y_test)}
    rows = ["id,label"] + [f"{line['id']},{truth[np.load(out / line['input']).tobytes()]}" for line in lines]
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_data(out)
    assert data.x.shape == (200, 8, 8, 1) and data.y is not None and len(set(data.y.tolist())) > 5

    # Fine-tuned on the labelled field data, converted with it as the drift baseline, bundled.
    import keras

    keras.utils.set_random_seed(0)
    model = keras.models.load_model(digits_models.keras_path)
    model.fit(data.x, data.y, epochs=6, batch_size=1, verbose=0)
    tuned = tmp_path / "digits-field.keras"
    model.save(tuned)
    from edgekit.converters import ConvertOptions, convert

    report = convert(
        ConvertOptions(
            model=tuned, output=tmp_path / "v2.tflite", eval=out, baseline=out, bundle="digits:2.0.0"
        ),
        signing_key=shop.key,
    )
    assert report.eval_source == str(out) and report.converted.accuracy is not None
    before = _accuracy(agent, held_out, truth_out)  # inputs the fine-tuning never saw

    # Pushed to the device like any release: the real CLI, the real broker, the real agent.
    pushed = edgekit(
        "push", str(report.bundle["path"]), "--fleet", "lab", "--wait", "--timeout", "120",  # type: ignore[index]
        "--broker", shop.broker, "--json",
        env={**os.environ, "EDGEKIT_REGISTRY": shop.registry, "COLUMNS": "200"},
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["devices"]["pi-01"]["version"] == "2.0.0"
    assert agent.status().version == "2.0.0"
    after = _accuracy(agent, held_out, truth_out)
    drift = agent.drift()
    assert drift is not None and drift.complete and not drift.drifted  # the drift cleared
    assert after >= before + 0.3, (before, after)  # and the device answers what it now sees
    actions = [e.action for e in shop.control.audit_log("lab")]
    assert "capture-policy" in actions and "capture-pull" in actions and "push" in actions


def test_refused_policies_capture_nothing_and_are_events(rig, models, key, other_key, mosquitto):
    agent = rig.device.agent
    topic = TOPICS.fleet_capture("lab")
    publish = lambda payload: rig.operator.publish(topic, payload, retain=True).wait(10)  # noqa: E731
    good = new_capture_policy(
        "lab", seq=10, recipient=rig.owner.public_raw, triggers=("sample",), sample_rate=1.0
    )
    publish(good.to_json())  # unsigned
    publish(sign_capture_policy(good, other_key))  # untrusted
    publish(sign_capture_policy(new_capture_policy("cafe", seq=11, recipient=rig.owner.public_raw), key))
    publish(
        sign_capture_policy(
            new_capture_policy("lab", seq=12, recipient=rig.owner.public_raw, ttl=1, now=1e9), key
        )
    )
    events = rig.spy.wait_events("capture_policy_refused", 4)
    for word in ("unsigned", "does not trust", "not this device's fleet", "expired"):
        assert any(word in e["message"] for e in events), word
    for x in models.x_test[:50]:
        agent.predict(x)
    assert len(agent.capture) == 0 and not agent.capture.armed
    publish(sign_capture_policy(good, key))
    assert agent.capture.wait_for(lambda c: c.armed, 30)
    older = new_capture_policy(
        "lab", seq=9, recipient=rig.owner.public_raw, triggers=("sample",), sample_rate=1.0
    )
    rig.operator.publish(topic, sign_capture_policy(older, key)).wait(10)  # someone replays an older one
    assert "replay" in rig.spy.wait_events("capture_policy_refused", 5)[-1]["message"]
    turn_off(rig.control, rig.operator, key, "lab")
    assert agent.capture.wait_for(lambda c: not c.armed, 30)
    for x in models.x_test[:50]:
        agent.predict(x)
    assert len(agent.capture) == 0
    assert current_policy(rig.control, "lab").enabled is False  # type: ignore[union-attr]


def _store(control: ControlPlane, record: bytes, seq: int) -> None:
    from datetime import datetime, timezone

    with control.registry.session() as session:
        session.add(
            CaptureRecordRow(
                device="pi-09",
                seq=seq,
                fleet="lab",
                key_id="0" * 64,
                size=len(record),
                received_at=datetime.now(timezone.utc),
                data=record,
            )
        )
        session.commit()


def test_pull_refuses_a_bad_record_with_one_line_and_keeps_the_rest(rig, tmp_path):
    policy = new_capture_policy("lab", seq=1, recipient=rig.owner.public_raw, triggers=("sample",))
    stranger = CaptureKey.generate()
    to_stranger = new_capture_policy("lab", seq=1, recipient=stranger.public_raw, triggers=("sample",))

    def sealed(p, seq: int) -> bytes:
        return seal_record(
            p,
            device="pi-09",
            seq=seq,
            time=1.8e9,
            trigger="sample",
            bundle={"name": "digits", "version": "1.0.0"},
            outputs=[[0.2, 0.8]],
            input_array=np.full((224, 224, 3), seq, np.uint8),
        )

    for seq in (1, 2, 3):
        _store(rig.control, sealed(policy, seq), seq)
    _store(rig.control, sealed(to_stranger, 4), 4)
    tampered = bytearray(sealed(policy, 5))
    tampered[-100] ^= 0x40
    _store(rig.control, bytes(tampered), 5)
    _store(rig.control, sealed(policy, 6)[:-1000], 6)
    result = pull(rig.control, rig.owner, "lab", tmp_path / "ds")
    assert result.written == 3 and len(result.refused) == 3
    for seq, word in ((4, "capture key"), (5, "does not open"), (6, "cut short")):
        (line,) = [r for r in result.refused if f"record {seq} of device pi-09" in r]
        assert word in line and "\n" not in line
    assert sorted(p.name for p in (tmp_path / "ds" / "images").iterdir()) == [
        f"pi-09-{s}.png" for s in (1, 2, 3)
    ]
    again = pull(rig.control, rig.owner, "lab", tmp_path / "ds")
    assert again.written == 0 and again.already == 3
    assert purge(rig.control, "lab") == 6
    assert [e.action for e in rig.control.audit_log("lab")][:2] == ["capture-purge", "capture-pull"]


def test_purge_asks_devices_to_drop_what_they_hold(rig, models, key):
    agent = rig.device.agent
    rig.device.capture.resend_after = 1e9  # keep them held: the fleet's sink is not told of them
    rig.sink.stop()
    set_policy(
        rig.control, rig.operator, key, "lab", rig.owner.public_raw, triggers=("sample",), sample_rate=1.0
    )
    assert agent.capture.wait_for(lambda c: c.armed, 30)
    for x in models.x_test[:5]:
        agent.predict(x)
    assert len(agent.capture) == 5
    purge(rig.control, "lab", client=rig.operator, devices=["pi-01"])
    assert agent.capture.wait_for(lambda c: len(c) == 0, 30)
    assert rig.spy.wait_events("capture_purged", 1)[0]["device"] == "pi-01"


def test_fleet_serve_stores_and_acknowledges_what_devices_capture(
    serve,
    mosquitto,
    make_config,
    bundles,
    models,
    key,
    edgekit_home,
    tmp_path,
):
    from sqlalchemy import func, select

    registry = f"sqlite:///{tmp_path / 'serve.db'}"
    served = serve("--registry", registry)
    control = ControlPlane.open(registry, TrustedKeys([key.public]))
    operator = MqttClient(mosquitto.url, client_id="capture-operator").connect(timeout=10)
    agent = Agent.from_config(
        make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600), background=False
    )
    agent.install(bundles.v1)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    try:
        owner = init_capture_key(edgekit_home, None)
        set_policy(control, operator, key, "lab", owner.public_raw, triggers=("sample",), sample_rate=1.0)
        assert agent.capture.wait_for(lambda c: c.armed, 30)
        for x in models.x_test[:5]:
            agent.predict(x)
        assert agent.capture.wait_for(lambda c: c.stats.uploaded == 5 and len(c) == 0, 60)
        with control.registry.session() as session:
            assert session.scalar(select(func.count()).select_from(CaptureRecordRow)) == 5
        assert pull(control, owner, "lab", tmp_path / "ds").written == 5
    finally:
        daemon.stop()
        agent.close()
        operator.close()
        control.close()
        served.stop()


def test_the_dataset_readme_names_every_policy_its_records_were_collected_under(rig, models, key, tmp_path):
    agent = rig.device.agent

    def collect(note: str, count: int, cap: int) -> int:
        policy = set_policy(
            rig.control, rig.operator, key, "lab", rig.owner.public_raw,
            triggers=("sample",), sample_rate=1.0, max_per_hour=cap, note=note,
        )  # fmt: skip
        assert agent.capture.wait_for(lambda c: c.policy is not None and c.policy.seq == policy.seq, 30)
        for x in models.x_test[:count]:
            agent.predict(x)
        return policy.seq

    first = collect("policy A: count shelf gaps, staff only", 3, cap=3)
    second = collect("policy B: check the new lighting, faces blurred", 4, cap=7)  # the hour holds 3
    off = turn_off(rig.control, rig.operator, key, "lab")
    assert agent.capture.wait_for(lambda c: not c.armed, 30)
    assert rig.sink.wait_for(7, timeout=60)
    result = pull(rig.control, rig.owner, "lab", tmp_path / "ds")
    assert result.written == 7
    lines = [json.loads(t) for t in (tmp_path / "ds" / "records.jsonl").read_text().splitlines()]
    assert sorted(line["policy_seq"] for line in lines) == [first] * 3 + [second] * 4
    readme = (tmp_path / "ds" / "README.md").read_text()
    for seq, count, note in (
        (first, 3, "policy A: count shelf gaps"),
        (second, 4, "policy B: check the new"),
    ):
        (entry,) = [
            i
            for i, t in enumerate(readme.splitlines())
            if t.startswith(f"- **Policy {seq}** ({count} records)")
        ]
        assert "a random 1 of predictions" in readme.splitlines()[entry]
        assert note in readme.splitlines()[entry + 1]
    assert f"The fleet's policy now (policy {off.seq}): capture is off." in readme
    assert f"Policy {off.seq}**" not in readme  # it collected nothing
