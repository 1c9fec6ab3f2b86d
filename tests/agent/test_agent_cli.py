"""`edgekit-agent`: real processes, JSON output, one-line errors (`edgekit device add`, the
workstation's side, is tested with the workstation CLI in tests/sdk/test_cli.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from edgekit.agent import Agent, AgentConfig
from edgekit.errors import ConfigError


def agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit.agent.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_install_status_rollback_round_trip_with_json(config_path, bundles):
    first = agent_cli("install", str(bundles.v1), "--config", str(config_path), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["version"] == "1.0.0"
    second = agent_cli("install", str(bundles.v2), "--config", str(config_path), "--json")
    assert json.loads(second.stdout)["previous"] == "1.0.0"
    status = json.loads(agent_cli("status", "--config", str(config_path), "--json").stdout)
    assert (status["serving"], status["version"], status["device"]) == (True, "2.0.0", "pi-01")
    assert status["runtime"] in ("ai_edge_litert", "tflite_runtime", "tensorflow")
    back = agent_cli("rollback", "--config", str(config_path), "--json")
    assert back.returncode == 0 and json.loads(back.stdout)["version"] == "1.0.0"
    text = agent_cli("status", "--config", str(config_path))
    assert "digits@1.0.0" in text.stdout
    # The bundle has a baseline but no calibration: drift works, without an accuracy estimate.
    assert status["drift_checks"] == "inputs and outputs"
    assert "no accuracy estimate" in text.stdout and "--calibration-eval" in text.stdout


@pytest.mark.parametrize(
    ("which", "code", "words"),
    [("untrusted", 5, "not trusted"), ("tampered", 4, "SHA-256"), ("unhealthy", 11, "health check failed")],
)
def test_refusals_are_one_line_with_their_exit_code(config_path, bundles, which, code, words):
    assert agent_cli("install", str(bundles.v1), "--config", str(config_path)).returncode == 0
    result = agent_cli("install", str(getattr(bundles, which)), "--config", str(config_path))
    assert result.returncode == code
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_downgrade_needs_the_flag(config_path, bundles):
    agent_cli("install", str(bundles.v2), "--config", str(config_path))
    refused = agent_cli("install", str(bundles.v1), "--config", str(config_path))
    assert refused.returncode == 10 and "--allow-downgrade" in refused.stderr
    allowed = agent_cli(
        "install", str(bundles.v1), "--config", str(config_path), "--allow-downgrade", "--json"
    )
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["version"] == "1.0.0"


def test_bad_config_names_the_key_and_the_file(tmp_path, key):
    path = tmp_path / "bad.toml"
    path.write_text(
        f'device = "d"\nfleet = "f"\nstate_dir = "s"\nthreads = "many"\ntrusted_keys = """{key.public.pem().decode()}"""\n'
    )
    result = agent_cli("status", "--config", str(path))
    assert result.returncode == 2 and "threads" in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_run_queues_telemetry_and_stops_cleanly_on_sigterm(config_path, bundles):
    assert agent_cli("install", str(bundles.v1), "--config", str(config_path)).returncode == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "edgekit.agent.cli", "run", "--config", str(config_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:  # wait for the ready line: the agent has recovered and loaded
        if "ready" in line:
            assert "digits@1.0.0" in line
            break
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 0, rest
    assert "stopped" in rest
    with Agent.from_config(config_path, background=False) as agent:
        records = agent.telemetry.peek()
    assert records and records[-1]["bundle"]["version"] == "1.0.0"


def test_env_overrides_file_and_kwargs_override_env(config_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_DRIFT_SAMPLE_RATE", "0.5")
    monkeypatch.setenv("EDGEKIT_FLEET", "other")
    assert AgentConfig.load(config_path).drift_sample_rate == 0.5
    config = AgentConfig.load(config_path, fleet="third")
    assert (config.fleet, config.drift_sample_rate) == ("third", 0.5)
    monkeypatch.setenv("EDGEKIT_DRIFT_WINDOW", "lots")
    with pytest.raises(ConfigError, match="EDGEKIT_DRIFT_WINDOW"):
        AgentConfig.load(config_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('colour = "blue"\n', "unknown key 'colour'"),
        ("[drift]\nsample_rate = 2.0\n", "drift.sample_rate"),
        ("broker = 5\n", "broker must be a string"),
        ("[telemetry]\nqueue_max = 0\n", "telemetry.queue_max"),
        ('xnnpack = "maybe"\n', "xnnpack must be true or false"),
    ],
)
def test_config_errors_name_key_and_file(config_path: Path, text, match):
    content = config_path.read_text()
    if text.startswith("["):
        config_path.write_text(content + text)
    else:
        config_path.write_text(text + content)
    with pytest.raises(ConfigError, match=match) as caught:
        AgentConfig.load(config_path)
    assert str(config_path) in str(caught.value)


def test_xnnpack_is_on_unless_the_file_or_env_turns_it_off(config_path, monkeypatch):
    assert AgentConfig.load(config_path).xnnpack is True
    config_path.write_text("xnnpack = false\n" + config_path.read_text())
    assert AgentConfig.load(config_path).xnnpack is False
    monkeypatch.setenv("EDGEKIT_XNNPACK", "true")
    assert AgentConfig.load(config_path).xnnpack is True
    monkeypatch.setenv("EDGEKIT_XNNPACK", "sometimes")
    with pytest.raises(ConfigError, match="EDGEKIT_XNNPACK must be true or false"):
        AgentConfig.load(config_path)


def test_unknown_runtime_is_refused(config_path):
    with pytest.raises(ConfigError, match="unknown runtime 'onnx'"):
        AgentConfig.load(config_path, runtime="onnx")


def test_missing_and_broken_trusted_keys_are_config_errors(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('device = "d"\nfleet = "f"\nstate_dir = "s"\n')
    with pytest.raises(ConfigError, match="trusted_keys"):
        AgentConfig.load(path)
    path.write_text('device = "d"\nfleet = "f"\nstate_dir = "s"\ntrusted_keys = "nope"\n')
    with pytest.raises(ConfigError, match="trusted_keys"):
        AgentConfig.load(path)
