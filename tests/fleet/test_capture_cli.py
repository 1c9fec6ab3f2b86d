"""`edgekit capture` as an owner runs it: keys, policy set/show/off, pull, purge; audited; bad
input is one line and a non-zero exit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from device_fixtures import key  # noqa: F401 - a fixture
from edgekit.capture import load_capture_key, new_capture_policy, seal_record
from edgekit.fleet.control import ControlPlane
from edgekit.fleet.registry.models import CaptureRecordRow
from helpers import assert_one_line_error
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


def test_labelling_as_the_docs_say_copy_the_template_correct_it_convert(
    edgekit_home, tmp_path, digits_models, caplog
):
    """docs/capture.md, literally: `capture pull`, `cp labels-template.csv labels.csv`, correct
    the model's guesses, and the folder is labelled DATA for `edgekit convert --eval`."""
    import shutil

    from edgekit.data import load_data

    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    env = {**os.environ, "COLUMNS": "200", "EDGEKIT_REGISTRY": registry, "EDGEKIT_CAPTURE_PASSPHRASE": PASS}
    assert edgekit("keys", "init", env=env).returncode == 0
    assert edgekit("capture", "keys", "init", env=env).returncode == 0
    owner = load_capture_key(edgekit_home, PASS.encode())
    sealer = new_capture_policy("shop", seq=1, recipient=owner.public_raw, triggers=("sample",))
    xs, ys = digits_models.x_test[:12], digits_models.y_test[:12]
    with ControlPlane.open(registry) as control, control.registry.session() as session:
        from datetime import datetime, timezone

        for seq, x in enumerate(xs, start=1):
            # The model's guess is right but for records 3 and 4; record 12 has no output (no guess).
            guess = int(ys[seq - 1]) if seq not in (3, 4) else (int(ys[seq - 1]) + 1) % 10
            outputs = [] if seq == 12 else [list(np.eye(10)[guess] * 0.9 + 0.01)]
            record = seal_record(
                sealer, device="cam-1", seq=seq, time=1.8e9, trigger="sample",
                bundle={"name": "digits", "version": "1.0.0"}, outputs=outputs, input_array=x[None],
            )  # fmt: skip
            session.add(
                CaptureRecordRow(
                    device="cam-1", seq=seq, fleet="shop", key_id=owner.key_id, size=len(record),
                    received_at=datetime.now(timezone.utc), data=record,
                )
            )  # fmt: skip
        session.commit()
    out = tmp_path / "shelf-data"
    pulled = edgekit("capture", "pull", "--fleet", "shop", "-o", str(out), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert "labels-template.csv" in (out / "README.md").read_text()
    shutil.copy(out / "labels-template.csv", out / "labels.csv")  # cp shelf-data/labels-template.csv ...
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows[0] == "id,label" and rows[12] == "cam-1-12,"  # no guess: left blank
    # The owner looks at images 3 and 4 and corrects the guesses.
    rows[3], rows[4] = f"cam-1-3,{ys[2]}", f"cam-1-4,{ys[3]}"
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        data = load_data(out)
    assert data.unlabelled == 1 and data.y is not None and data.y.tolist() == ys[:11].tolist()
    assert "1 of 12 records have no label (1 left blank) and are left out" in caplog.text
    converted = edgekit(
        "convert", str(digits_models.keras_path), "-o", str(tmp_path / "v2.tflite"), "--eval", str(out), "--json",
        env=env,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    report = json.loads(converted.stdout)
    assert report["converted"]["accuracy"] is not None and report["eval_data"] == str(out)
    assert "left out" in converted.stderr


@pytest.mark.parametrize("fleet", ["bad fleet!", "nope/x"])
@pytest.mark.parametrize(
    "command",
    [
        ["capture", "policy", "show"],
        ["capture", "policy", "off"],
        ["capture", "policy", "set"],
        ["capture", "pull", "-o", "{out}"],
        ["capture", "purge"],
    ],
)
def test_capture_commands_refuse_an_invalid_fleet_id_with_one_line(command, fleet, tmp_path):
    out = tmp_path / "ds"
    env = {
        **os.environ,
        "EDGEKIT_REGISTRY": f"sqlite:///{tmp_path / 'r.db'}",
        "EDGEKIT_CAPTURE_PASSPHRASE": PASS,
    }
    result = edgekit(*[part.format(out=out) for part in command], "--fleet", fleet, env=env)
    assert result.returncode == 13
    assert_one_line_error(result, f"invalid fleet id {fleet!r}", "letters, digits")
    assert not out.exists()  # pull wrote nothing
