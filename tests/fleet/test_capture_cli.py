"""`edgekit capture` as an owner runs it: keys, policy set/show/off, pull, purge; audited; bad
input is one line and a non-zero exit."""

from __future__ import annotations

import json
import os

import numpy as np
from device_fixtures import key  # noqa: F401 - a fixture
from edgekit.capture import load_capture_key, new_capture_policy, seal_record
from edgekit.fleet.control import ControlPlane
from edgekit.fleet.registry.models import CaptureRecordRow
from test_push import edgekit

PASS = "correct horse battery"


def test_capture_commands_end_to_end(mosquitto, edgekit_home, tmp_path):
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    env = {
        **os.environ,
        "COLUMNS": "200",
        "EDGEKIT_REGISTRY": registry,
        "EDGEKIT_BROKER": mosquitto.url,
        "EDGEKIT_CAPTURE_PASSPHRASE": PASS,
    }
    assert edgekit("keys", "init", env=env).returncode == 0
    made = edgekit("capture", "keys", "init", "--json", env=env)
    assert made.returncode == 0, made.stderr
    key_id = json.loads(made.stdout)["key_id"]
    assert json.loads(made.stdout)["encrypted"] is True
    assert b"ENCRYPTED" in (edgekit_home / "keys" / "capture.key.pem").read_bytes()
    again = edgekit("capture", "keys", "init", env=env)
    assert (
        again.returncode == 18 and len(again.stderr.strip().splitlines()) == 1 and "--force" in again.stderr
    )

    shown = edgekit("capture", "policy", "show", "--fleet", "shop", env=env)
    assert "capture nothing" in shown.stdout
    set_ = edgekit(
        "capture",
        "policy",
        "set",
        "--fleet",
        "shop",
        "--on",
        "sample",
        "--on",
        "drift",
        "--sample-rate",
        "0.01",
        "--max-per-hour",
        "5",
        "--max-bytes",
        "2MB",
        "--retain",
        "7d",
        "--note",
        "count shelf gaps",
        "--json",
        env=env,
    )
    assert set_.returncode == 0, set_.stderr
    policy = json.loads(set_.stdout)
    assert policy["triggers"] == ["sample", "drift"] and policy["max_bytes"] == 2_000_000
    assert policy["retain_s"] == 7 * 86400 and policy["seq"] >= 1
    shown = json.loads(edgekit("capture", "policy", "show", "--fleet", "shop", "--json", env=env).stdout)
    assert shown["seq"] == policy["seq"] and shown["note"] == "count shelf gaps"
    bad = edgekit("capture", "policy", "set", "--fleet", "shop", "--retain", "forever", env=env)
    assert bad.returncode == 2 and "--retain" in bad.stderr and "Traceback" not in bad.stderr
    bad = edgekit("capture", "policy", "set", "--fleet", "shop", "--on", "motion", env=env)
    assert bad.returncode == 2 and "not a trigger" in bad.stderr

    # Two records arrive (stored as the fleet's sink stores them); one is damaged.
    owner = load_capture_key(edgekit_home, PASS.encode())
    assert owner.key_id == key_id
    sealer = new_capture_policy("shop", seq=1, recipient=owner.public_raw, triggers=("sample",))
    with ControlPlane.open(registry) as control, control.registry.session() as session:
        from datetime import datetime, timezone

        for seq in (1, 2):
            record = seal_record(
                sealer,
                device="cam-1",
                seq=seq,
                time=1.8e9,
                trigger="sample",
                bundle={"name": "shelf", "version": "1.0.0"},
                outputs=[[0.1, 0.9]],
                input_array=np.zeros((32, 32, 3), np.uint8),
            )
            if seq == 2:
                record = record[:-10]
            session.add(
                CaptureRecordRow(
                    device="cam-1",
                    seq=seq,
                    fleet="shop",
                    key_id=owner.key_id,
                    size=len(record),
                    received_at=datetime.now(timezone.utc),
                    data=record,
                )
            )
        session.commit()
    out = tmp_path / "shelf-data"
    pulled = edgekit("capture", "pull", "--fleet", "shop", "-o", str(out), env=env)
    assert pulled.returncode == 0, pulled.stderr
    refusals = [line for line in pulled.stderr.splitlines() if "refused" in line]
    assert len(refusals) == 1 and "record 2 of device cam-1" in refusals[0]
    assert (out / "images" / "cam-1-1.png").exists() and (out / "README.md").exists()
    wrong = edgekit(
        "capture",
        "pull",
        "--fleet",
        "shop",
        "-o",
        str(out),
        env={**env, "EDGEKIT_CAPTURE_PASSPHRASE": "nope"},
    )
    assert (
        wrong.returncode == 18
        and "wrong passphrase" in wrong.stderr
        and len(wrong.stderr.strip().splitlines()) == 1
    )

    purged = json.loads(edgekit("capture", "purge", "--fleet", "shop", "--json", env=env).stdout)
    assert purged["deleted"] == 2
    assert edgekit("capture", "policy", "off", "--fleet", "shop", env=env).returncode == 0
    audit = json.loads(edgekit("fleet", "audit", "--fleet", "shop", "--json", env=env).stdout)
    actions = [entry["action"] for entry in audit]
    for action in ("capture-policy", "capture-pull", "capture-purge", "capture-off"):
        assert action in actions
