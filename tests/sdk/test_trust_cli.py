"""`edgekit keys init --role` and `edgekit trust ...`, run as an operator runs them: two machines
(two EDGEKIT_HOMEs), root keys 2 of 3, a rotation signed on both, a revocation, a publish to a
real Mosquitto."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics
from test_cli import assert_one_line_error, bundle_file, edgekit

__all__ = ["bundle_file"]


def run_json(*args: str, env: dict[str, str] | None = None) -> dict:
    result = edgekit(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def laptop(edgekit_home: Path) -> Path:
    for name in ("root-1", "root-2"):
        assert run_json("keys", "init", "--role", "root", "--name", name)["role"] == "root"
    run_json("keys", "init", "--role", "targets")
    run_json("keys", "init", "--role", "online")
    return edgekit_home


@pytest.fixture
def safe(tmp_path: Path) -> dict[str, str]:
    """A second machine holding the third root key; its public half is copied to the laptop."""
    env = {"EDGEKIT_HOME": str(tmp_path / "safe")}
    run_json("keys", "init", "--role", "root", "--name", "root-3", env=env)
    return env


def test_init_rotate_sign_elsewhere_submit_revoke_status(
    laptop: Path, safe: dict[str, str], tmp_path: Path
) -> None:
    root3_pub = Path(safe["EDGEKIT_HOME"]) / "keys" / "root-3.pub.pem"
    listed = run_json("keys", "list")
    assert {k["name"]: k["role"] for k in listed} == {
        "root-1": "root",
        "root-2": "root",
        "targets": "targets",
        "online": "online",
    }
    created = run_json(
        "trust", "init", "--fleet", "shop", "--root-keys", f"root-1,root-2,{root3_pub}", "--threshold", "2"
    )
    assert created["pending"] == [] and created["roles"]["root"]["threshold"] == 2
    assert len(created["roles"]["root"]["keys"]) == 3 and created["roles"]["root"]["version"] == 1
    status = run_json("trust", "status", "--fleet", "shop")
    assert status["roles"]["timestamp"]["version"] == 1 and status["roles"]["desired"]["threshold"] == 1

    # Rotate root-1 out for a new key: signed by root-2 here and root-3 on the other machine.
    run_json("keys", "init", "--role", "root", "--name", "root-4")
    rotated = run_json("trust", "rotate", "root", "--fleet", "shop", "--add", "root-4", "--remove", "root-1")
    assert rotated["pending"] == ["root"]
    pending = laptop / "trust" / "shop" / "pending" / "root.json"
    run_json("trust", "sign", str(pending), "--key", "root-2")
    # One signature of the old root's two: refused, one line, nothing lost.
    assert_one_line_error(
        edgekit("trust", "submit", "root", "--fleet", "shop"), 17, "1 valid signature(s) of the 2"
    )
    copy = tmp_path / "root-to-sign.json"
    shutil.copy(pending, copy)
    assert run_json("trust", "sign", str(copy), "--key", "root-3", env=safe)["signatures"] == 2
    run_json("trust", "sign", str(pending), "--key", "root-4")
    applied = run_json("trust", "submit", "root", "--fleet", "shop", "--signed", str(copy))
    assert applied["roles"]["root"]["version"] == 2 and applied["pending"] == []

    # Revoke the online key: root (2 of 3) and targets must sign.
    run_json("keys", "init", "--role", "online", "--name", "online-2")
    revoked = run_json("trust", "revoke", "online", "--fleet", "shop", "--replacement", "online-2")
    assert revoked["pending"] == ["root", "targets"]
    for key in ("root-2", "root-4"):
        run_json("trust", "sign", str(pending), "--key", key)
    run_json("trust", "sign", str(laptop / "trust" / "shop" / "pending" / "targets.json"), "--key", "targets")
    run_json("trust", "submit", "root", "--fleet", "shop", "--online-key", "online-2")
    done = run_json("trust", "submit", "targets", "--fleet", "shop", "--online-key", "online-2")
    assert done["roles"]["root"]["version"] == 3
    assert done["roles"]["timestamp"]["keys"] == done["roles"]["desired"]["keys"]
    assert not any(
        k.startswith(created["roles"]["timestamp"]["keys"][0][:16])
        for k in done["roles"]["timestamp"]["keys"]
    )


def test_keys_init_makes_a_root_set_that_trust_init_takes(edgekit_home: Path) -> None:
    made = run_json("keys", "init", "--role", "root", "--threshold", "2")
    names = [k["name"] for k in made["keys"]]
    assert made["threshold"] == 2 and names == ["root-1", "root-2", "root-3"]  # one spare by default
    assert len({k["key_id"] for k in made["keys"]}) == 3 and {k["role"] for k in made["keys"]} == {"root"}
    assert [
        k["name"]
        for k in run_json(
            "keys", "init", "--role", "root", "--name", "r", "--threshold", "1", "--count", "1"
        )["keys"]
    ] == ["r-1"]
    run_json("keys", "init", "--role", "targets")
    run_json("keys", "init", "--role", "online")
    created = run_json("trust", "init", "--fleet", "shop", "--root-keys", ",".join(names), "--threshold", "2")
    assert created["roles"]["root"]["threshold"] == 2 and len(created["roles"]["root"]["keys"]) == 3
    for args, fragment in (
        (("--threshold", "2"), "add --role root"),
        (("--role", "targets", "--threshold", "2"), "add --role root"),
        (("--role", "root", "--threshold", "0"), "use 1 or more"),
        (("--role", "root", "--threshold", "3", "--count", "2"), "below --threshold 3"),
        (("--role", "root", "--count", "2"), "--count needs --threshold"),
    ):
        assert_one_line_error(edgekit("keys", "init", *args), 3, fragment)


def test_bad_input_is_one_line(laptop: Path) -> None:
    assert_one_line_error(edgekit("trust", "status", "--fleet", "nope"), 17, "no trust repository")
    assert_one_line_error(
        edgekit("trust", "init", "--fleet", "shop", "--root-keys", "root-1,root-2", "--threshold", "3"),
        17,
        "threshold of 3 cannot be met by 2 root keys",
    )
    assert_one_line_error(edgekit("keys", "init", "--role", "boss"), 3, "unknown key role")


def test_publish_puts_every_document_retained_on_the_fleets_trust_topics(laptop: Path, mosquitto) -> None:
    run_json("trust", "init", "--fleet", "shop", "--root-keys", "root-1,root-2", "--threshold", "2")
    published = run_json("trust", "publish", "--fleet", "shop", "--broker", mosquitto.url)["published"]
    assert set(published) == {"root/1", "targets", "desired", "snapshot", "timestamp"}
    client = MqttClient(mosquitto.url, client_id="check").connect(timeout=10)
    try:
        got: dict[str, bytes] = {}
        import threading

        done = threading.Event()

        def on(message) -> None:  # type: ignore[no-untyped-def]
            got[message.topic] = message.payload
            if len(got) == 5:
                done.set()

        client.subscribe(Topics().fleet_trust_filter("shop"), on)
        assert done.wait(10)
    finally:
        client.close()
    assert len(got[Topics().fleet_trust("shop", "timestamp")]) == published["timestamp"]


def test_an_operator_drives_a_tuf_device_with_the_cli_alone(
    laptop: Path, bundle_file: Path, mosquitto, tmp_path: Path
) -> None:
    """keys, trust init, authorise, desire, publish, export-root: a real agent with only the
    root it was provisioned with installs what the CLI asked for."""
    from device_fixtures import write_config
    from edgekit import TrustedKeys
    from edgekit.agent import Agent
    from edgekit.agent.daemon import AgentDaemon
    from edgekit.bundle import read_bundle
    from edgekit.keys import load_signing_key
    from edgekit.mqtt import MqttClient
    from edgekit.transfer import publish_bundle

    fleet = ["--fleet", "lab"]
    run_json("trust", "init", *fleet, "--root-keys", "root-1,root-2", "--threshold", "2")
    # The bundle is not authorised yet: `trust desire` refuses it, naming the fix.
    assert_one_line_error(edgekit("trust", "desire", str(bundle_file), *fleet), 17, "trust authorise")
    assert run_json("trust", "authorise", str(bundle_file), *fleet)["pending"] == ["targets"]
    run_json("trust", "sign", str(laptop / "trust" / "lab" / "pending" / "targets.json"), "--key", "targets")
    run_json("trust", "submit", "targets", *fleet)
    run_json("trust", "desire", str(bundle_file), *fleet)
    run_json("trust", "publish", *fleet, "--broker", mosquitto.url)
    root = tmp_path / "root.json"
    assert edgekit("trust", "export-root", *fleet, "-o", str(root)).returncode == 0

    key = load_signing_key(laptop, "default")
    client = MqttClient(mosquitto.url, client_id="pub").connect(timeout=10)
    try:
        publish_bundle(client, read_bundle(bundle_file, TrustedKeys([key.public])))
    finally:
        client.close()
    config = write_config(
        tmp_path / "agent.toml", key, tmp_path / "state", broker=mosquitto.url, trust_root=str(root)
    )
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    try:
        assert daemon.installed.wait(60)
        assert agent.status().version == "1.0.0"
        assert daemon.trust_report is not None and daemon.trust_report.root_version == 1
        daemon.publish_state(wait=10)
        listed = run_json("trust", "status", *fleet, "--devices", "--broker", mosquitto.url)["devices"]
        assert listed["pi-01"]["root"] == 1 and listed["pi-01"]["stuck_on_old_root"] is False
        assert listed["pi-01"]["timestamp_expires"].endswith("Z")
    finally:
        daemon.stop()
        agent.close()


def test_rotating_the_targets_key_re_signs_targets_and_status_shows_current_and_pending(laptop: Path) -> None:
    run_json("trust", "init", "--fleet", "shop", "--root-keys", "root-1,root-2", "--threshold", "2")
    before = run_json("trust", "status", "--fleet", "shop")["roles"]
    # Revoking the online key with a replacement: nothing is signed yet, so devices still check
    # the old key; status says which keys are current and which are pending.
    run_json("keys", "init", "--role", "online", "--name", "online-2")
    run_json("trust", "revoke", "online", "--fleet", "shop", "--replacement", "online-2")
    status = run_json("trust", "status", "--fleet", "shop")["roles"]
    for role in ("desired", "timestamp", "snapshot"):
        assert status[role]["keys"] == before[role]["keys"], role
        assert status[role]["pending_keys"] != before[role]["keys"] and len(status[role]["pending_keys"]) == 1
    text = edgekit("trust", "status", "--fleet", "shop").stdout
    assert "pending: 1 of 1" in text

    # The targets key (fleet shop2): a new root and a re-signed targets the new key must sign.
    run_json("trust", "init", "--fleet", "shop2", "--root-keys", "root-1,root-2", "--threshold", "2")
    before = run_json("trust", "status", "--fleet", "shop2")["roles"]
    run_json("keys", "init", "--role", "targets", "--name", "targets-2")
    revoked = run_json("trust", "revoke", "targets", "--fleet", "shop2", "--replacement", "targets-2")
    assert revoked["pending"] == ["root", "targets"]
    assert revoked["roles"]["targets"]["keys"] == before["targets"]["keys"]
    new_targets = revoked["roles"]["targets"]["pending_keys"]
    pending = laptop / "trust" / "shop2" / "pending"
    for key in ("root-1", "root-2"):
        run_json("trust", "sign", str(pending / "root.json"), "--key", key)
    assert_one_line_error(
        edgekit("trust", "submit", "root", "--fleet", "shop2"), 17, "changes the targets keys"
    )
    run_json("trust", "sign", str(pending / "targets.json"), "--key", "targets-2")
    done = run_json("trust", "submit", "root", "--fleet", "shop2")
    assert done["result"].startswith("Applied the new root and the re-signed targets")
    assert done["pending"] == [] and done["roles"]["targets"]["keys"] == new_targets
    assert done["roles"]["root"]["version"] == 2 and "pending_keys" not in done["roles"]["targets"]


def test_refresh_signs_a_fresh_timestamp_and_upgrade_publishes_the_signed_root(
    laptop: Path, mosquitto
) -> None:
    from edgekit.keys import load_own_public_key
    from edgekit.roles import verify_trust_upgrade
    from edgekit.trust import TrustedKeys

    run_json("keys", "init")  # the single key devices trust today ("default")
    run_json("trust", "init", "--fleet", "shop", "--root-keys", "root-1,root-2", "--threshold", "2")
    first = run_json("trust", "status", "--fleet", "shop")["roles"]["timestamp"]["version"]
    refreshed = run_json("trust", "refresh", "--fleet", "shop")
    assert refreshed["roles"]["timestamp"]["version"] == first + 1
    assert_one_line_error(edgekit("trust", "refresh", "--fleet", "nope"), 17, "no trust repository")

    client = MqttClient(mosquitto.url, client_id="check").connect(timeout=10)
    try:
        import threading

        got: list[bytes] = []
        arrived = threading.Event()

        def on(message) -> None:  # type: ignore[no-untyped-def]
            got.append(message.payload)
            arrived.set()

        client.subscribe(Topics().fleet_trust("shop", "upgrade"), on)
        upgraded = run_json("trust", "upgrade", "--fleet", "shop", "--broker", mosquitto.url)
        assert arrived.wait(10)
    finally:
        client.close()
    single = load_own_public_key(laptop, "default")
    assert upgraded["signer"] == single.key_id and upgraded["bytes"] == len(got[0])
    root = verify_trust_upgrade(got[0], TrustedKeys([single]), "shop")
    assert json.loads(root)["signed"]["version"] == 1
    assert_one_line_error(
        edgekit("trust", "upgrade", "--fleet", "shop", "--key", "nobody", "--broker", mosquitto.url),
        3,  # KeyStoreError
        "nobody",
    )
