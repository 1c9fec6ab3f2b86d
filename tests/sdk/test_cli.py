"""The `edgekit keys` and `edgekit bundle` commands, run as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from edgekit.agent_config import AgentConfig
from edgekit.keys import init_key

BIN = Path(sys.executable).parent


def edgekit(
    *args: str, env: dict[str, str] | None = None, tool: str = "edgekit"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / tool), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=120,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


@pytest.fixture
def bundle_file(digits_models, tmp_path: Path) -> Path:
    assert edgekit("keys", "init").returncode == 0
    out = tmp_path / "digits.ekb"
    result = edgekit(
        "bundle",
        "create",
        str(digits_models.int8),
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--baseline",
        str(digits_models.data_npz),
        "-o",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["name"] == "digits" and created["path"] == str(out)
    return out


def test_keys_commands(edgekit_home, tmp_path):
    created = json.loads(edgekit("keys", "init", "--json").stdout)
    assert (edgekit_home / "keys" / "default.key.pem").exists()
    listed = json.loads(edgekit("keys", "list", "--json").stdout)
    assert [k["key_id"] for k in listed] == [created["key_id"]]
    assert "BEGIN PRIVATE KEY" not in edgekit("keys", "list", "--json").stdout
    assert_one_line_error(edgekit("keys", "init"), 3, "--force")
    pem = tmp_path / "key.pem"
    assert edgekit("keys", "export-public", "-o", str(pem)).returncode == 0
    assert pem.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert edgekit("keys", "export-public").stdout == pem.read_text()


def test_passphrase_from_the_environment(digits_models, tmp_path):
    env = {"EDGEKIT_KEY_PASSPHRASE": "s3cret"}
    assert json.loads(edgekit("keys", "init", "--json", env=env).stdout)["encrypted"] is True
    out = tmp_path / "b.ekb"
    args = ("bundle", "create", str(digits_models.fp32), "--name", "d", "--version", "1.0.0", "-o", str(out))
    # Without a terminal and without the variable there is no way to get the passphrase.
    result = subprocess.run(
        [str(BIN / "edgekit"), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "EDGEKIT_KEY_PASSPHRASE"},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert not out.exists()
    assert edgekit(*args, env=env).returncode == 0
    assert edgekit("bundle", "verify", str(out)).returncode == 0


def test_bundle_verify_and_inspect(bundle_file):
    result = edgekit("bundle", "verify", str(bundle_file), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True
    shown = json.loads(edgekit("bundle", "inspect", str(bundle_file), "--json").stdout)
    assert shown["signature"]["verified"] is True
    assert shown["manifest"]["model"]["inputs"][0]["dtype"] == "int8"
    assert {f["name"] for f in shown["manifest"]["files"]} >= {
        "model.tflite",
        "baseline.json",
        "healthcheck.npz",
    }
    table = edgekit("bundle", "inspect", str(bundle_file))
    assert table.returncode == 0 and "digits@1.0.0" in table.stdout and "verified" in table.stdout


def test_verify_refuses_with_one_line_and_exit_codes(digits_models, bundle_file, tmp_path):
    stranger_home = tmp_path / "stranger"
    assert edgekit("keys", "init", env={"EDGEKIT_HOME": str(stranger_home)}).returncode == 0
    stranger_pem = stranger_home / "keys" / "default.pub.pem"
    assert_one_line_error(
        edgekit("bundle", "verify", str(bundle_file), "--key", str(stranger_pem)), 5, "not trusted"
    )
    shown = json.loads(
        edgekit("bundle", "inspect", str(bundle_file), "--key", str(stranger_pem), "--json").stdout
    )
    assert shown["signature"]["verified"] is False and "not trusted" in shown["signature"]["problem"]

    tampered = tmp_path / "tampered.ekb"
    data = bytearray(bundle_file.read_bytes())
    model = digits_models.int8.read_bytes()
    data[data.find(model) + len(model) // 2] ^= 0xFF  # inside the model's weights
    tampered.write_bytes(bytes(data))
    assert_one_line_error(edgekit("bundle", "verify", str(tampered)), 4, "refusing it")
    assert_one_line_error(edgekit("bundle", "verify", str(tmp_path / "nope.ekb")), 4, "does not exist")
    junk = tmp_path / "junk.ekb"
    junk.write_bytes(os.urandom(3000))
    assert_one_line_error(edgekit("bundle", "inspect", str(junk)), 4, "not an edgekit bundle")
    empty = tmp_path / "empty.ekb"
    empty.write_bytes(b"")
    assert_one_line_error(edgekit("bundle", "verify", str(empty)), 4, "empty")
    assert_one_line_error(
        edgekit("bundle", "verify", str(bundle_file), "--key", str(junk)), 3, "no PEM public key"
    )


def test_create_refuses_bad_input_with_one_line(digits_models, tmp_path):
    assert_one_line_error(
        edgekit(
            "bundle", "create", str(digits_models.fp32), "--name", "d", "--version", "1.0.0", "-o", "x.ekb"
        ),
        3,
        "edgekit keys init",
    )
    edgekit("keys", "init")
    not_model = tmp_path / "m.tflite"
    not_model.write_text("hello")
    out = tmp_path / "out.ekb"
    assert_one_line_error(
        edgekit("bundle", "create", str(not_model), "--name", "d", "--version", "1.0.0", "-o", str(out)),
        6,
        "not a TFLite model",
    )
    assert_one_line_error(
        edgekit(
            "bundle", "create", str(digits_models.fp32), "--name", "d", "--version", "one", "-o", str(out)
        ),
        4,
        "semantic version",
    )
    bad_data = tmp_path / "bad.npz"
    bad_data.write_bytes(b"not an npz")
    assert_one_line_error(
        edgekit(
            "bundle",
            "create",
            str(digits_models.fp32),
            "--name",
            "d",
            "--version",
            "1.0.0",
            "--baseline",
            str(bad_data),
            "-o",
            str(out),
        ),
        7,
        "cannot read",
    )
    assert not out.exists()


def test_usage_errors_do_not_trace(tmp_path):
    result = edgekit("bundle", "create")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Missing argument" in result.stderr
    assert edgekit("--version").stdout.startswith("edgekit ")
    assert edgekit("--version", tool="edgekit-agent").stdout.startswith("edgekit ")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed on this machine")
def test_openssl_verifies_a_bundle_without_edgekit(bundle_file, tmp_path, edgekit_home):
    """The README's command: any party can check a bundle's signature with OpenSSL alone."""
    with tarfile.open(bundle_file) as archive:
        archive.extractall(tmp_path / "x", filter="data")
    pem = edgekit_home / "keys" / "default.pub.pem"
    cmd = [
        "openssl",
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        str(pem),
        "-rawin",
        "-in",
        str(tmp_path / "x" / "manifest.json"),
        "-sigfile",
        str(tmp_path / "x" / "manifest.sig"),
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout
    manifest = tmp_path / "x" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"1.0.0"', b'"1.0.1"'))
    assert subprocess.run(cmd, capture_output=True, check=False).returncode != 0


# -- edgekit device add: the agent config a device gets (read back with the agent's own class) --


def test_device_add_writes_a_config_the_agent_loads_with_our_key(tmp_path, edgekit_home):
    info = init_key(edgekit_home)
    out = tmp_path / "pi-07.toml"
    result = edgekit(
        "device",
        "add",
        "pi-07",
        "--fleet",
        "cams",
        "--broker",
        "mqtt://broker:1883",
        "--state-dir",
        str(tmp_path / "state"),
        "-o",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["trusted_key_ids"] == [info.key_id]
    config = AgentConfig.load(out)
    assert (config.device, config.fleet, config.broker) == ("pi-07", "cams", "mqtt://broker:1883")
    assert [k.key_id for k in config.trusted()] == [info.key_id]
    again = edgekit("device", "add", "pi-07", "--fleet", "cams", "-o", str(out))
    assert again.returncode == 2 and "--force" in again.stderr


def test_device_add_without_a_key_says_how_to_make_one(tmp_path):
    result = edgekit("device", "add", "pi-08", "--fleet", "cams", "-o", str(tmp_path / "x.toml"))
    assert result.returncode == 3 and "edgekit keys init" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["push", "BUNDLE", "--fleet", "lab"],
        ["capture", "policy", "off", "--fleet", "lab"],
        ["shadow", "stop", "--fleet", "lab"],
    ],
    ids=["push", "capture-policy-off", "shadow-stop"],
)
def test_an_unreachable_broker_is_one_line_not_the_mqtt_clients_retries(bundle_file, command):
    """Nothing listens on the port: the connect helper's one line (exit 12), not the MQTT
    client's warnings about each retry before it; those are there with --log-level debug."""
    from edgekit.errors import BrokerError
    from helpers import free_port

    broker = f"mqtt://127.0.0.1:{free_port()}"
    args = [str(bundle_file) if a == "BUNDLE" else a for a in command]
    result = edgekit(*args, "--broker", broker)
    assert_one_line_error(result, BrokerError.exit_code, f"could not connect to the broker at {broker}")
    if command[0] == "shadow":
        detailed = edgekit("--log-level", "debug", *args, "--broker", broker)
        assert "DEBUG edgekit.mqtt.paho" in detailed.stderr and "WARNING" not in detailed.stderr
        assert detailed.stderr.strip().splitlines()[-1].startswith("error: could not connect")
