"""Device fixtures: real digits models, signed bundles, a device config per test.

Shared by tests/agent and tests/faults (each conftest imports them from here).

Models come from the session's ``digits_models`` (trained and converted with TensorFlow), or,
in the lean device venv that has no TensorFlow (``make test-agent-lean``), from the directory
``EDGEKIT_TEST_MODELS`` names, written beforehand by ``tests/agent/export_models.py`` in the
main venv from the same training code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from edgekit import SigningKey, create_bundle
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from helpers import make_unhealthy, retar, tar_members

MODELS_ENV = "EDGEKIT_TEST_MODELS"


@dataclass(frozen=True)
class Models:
    fp32: Path
    int8: Path
    x_test: np.ndarray  # (N, 8, 8, 1) float32 in [0, 1]
    y_test: np.ndarray
    data_npz: Path


@pytest.fixture(scope="session")
def models(request: pytest.FixtureRequest) -> Models:
    directory = os.environ.get(MODELS_ENV)
    if directory:
        root = Path(directory)
        if not (root / ".complete").exists():
            pytest.fail(
                f"{MODELS_ENV}={root} holds no exported models; run tests/agent/export_models.py {root}"
            )
        with np.load(root / "digits_test.npz") as data:
            x, y = data["x"], data["y"]
        return Models(
            root / "digits_fp32.tflite", root / "digits_int8.tflite", x, y, root / "digits_test.npz"
        )
    digits = request.getfixturevalue("digits_models")
    return Models(digits.fp32, digits.int8, digits.x_test, digits.y_test, digits.data_npz)


@dataclass(frozen=True)
class QatModel:
    int8: Path  # the digits CNN after quantization-aware training, int8 I/O
    expected: np.ndarray  # its fake-quantized Keras model's outputs on Models.x_test


@pytest.fixture(scope="session")
def qat_model(request: pytest.FixtureRequest) -> QatModel:
    directory = os.environ.get(MODELS_ENV)
    if directory:
        root = Path(directory)
        return QatModel(root / "digits_qat_int8.tflite", np.load(root / "digits_qat_expected.npy"))
    qat = request.getfixturevalue("digits_qat")
    return QatModel(qat.int8, qat.expected)


@pytest.fixture(scope="session")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="session")
def other_key() -> SigningKey:
    return SigningKey.generate()


@dataclass(frozen=True)
class Bundles:
    v1: Path  # digits 1.0.0, fp32
    v2: Path  # digits 2.0.0, int8
    v3: Path  # digits 3.0.0, fp32
    untrusted: Path  # digits 9.0.0 signed by a key the device does not trust
    tampered: Path  # digits 9.0.0 whose model bytes were changed after signing
    unhealthy: Path  # digits 9.0.0, correctly signed, whose health check cannot pass


@pytest.fixture(scope="session")
def bundles(
    models: Models, key: SigningKey, other_key: SigningKey, tmp_path_factory: pytest.TempPathFactory
) -> Bundles:
    out = tmp_path_factory.mktemp("agent-bundles")

    def make(model: Path, version: str, name: str, signer: SigningKey = key) -> Path:
        path = out / name
        create_bundle(
            model, name="digits", version=version, key=signer, output=path, baseline=models.data_npz
        )
        return path

    v1 = make(models.fp32, "1.0.0", "v1.ekb")
    v2 = make(models.int8, "2.0.0", "v2.ekb")
    v3 = make(models.fp32, "3.0.0", "v3.ekb")
    untrusted = make(models.fp32, "9.0.0", "untrusted.ekb", other_key)
    nine = make(models.fp32, "9.0.0", "nine.ekb")
    members = tar_members(nine.read_bytes())
    model_bytes = dict(members)["model.tflite"]
    flipped = bytearray(model_bytes)
    flipped[len(flipped) // 2] ^= 0xFF
    tampered = out / "tampered.ekb"
    tampered.write_bytes(retar([(n, bytes(flipped) if n == "model.tflite" else d) for n, d in members]))
    unhealthy = out / "unhealthy.ekb"
    make_unhealthy(nine, key, unhealthy)
    return Bundles(v1, v2, v3, untrusted, tampered, unhealthy)


def write_config(path: Path, key: SigningKey, state_dir: Path, **extra: object) -> Path:
    lines = [
        'device = "pi-01"',
        'fleet = "lab"',
        f'state_dir = "{state_dir}"',
        'runtime = "auto"',
        "threads = 1",
        f"trusted_keys = '''\n{key.public.pem().decode()}'''",
    ]
    from edgekit.agent_config import _SECTIONS

    tables: dict[str, list[str]] = {}
    for name, value in extra.items():
        section, key_name = _SECTIONS.get(name, ("", name))
        tables.setdefault(section, []).append(f"{key_name} = {value!r}".replace("'", '"'))
    lines += tables.pop("", [])
    for section, entries in tables.items():
        lines += [f"[{section}]", *entries]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_config(tmp_path: Path, key: SigningKey):
    """``make_config(name, **extra)``: a config file for a fresh state directory of its own."""

    def make(name: str = "agent", **extra: object) -> Path:
        return write_config(tmp_path / f"{name}.toml", key, tmp_path / f"{name}-state", **extra)

    return make


@pytest.fixture
def config_path(tmp_path: Path, key: SigningKey) -> Path:
    return write_config(tmp_path / "agent.toml", key, tmp_path / "state")


@pytest.fixture(scope="session")
def mobilenet_model(request: pytest.FixtureRequest) -> Path:
    """A MobileNetV2-size fp32 model (224x224x3, 3.5 M parameters, ~14 MB): exported beside the
    digits models for the lean venv, else built once per session with TensorFlow."""
    directory = os.environ.get(MODELS_ENV)
    if directory:
        path = Path(directory) / "mobilenet_v2_fp32.tflite"
        if not path.exists():
            pytest.fail(f"{path} is missing; run tests/agent/export_models.py {directory}")
        return path
    built: Path = request.getfixturevalue("mobilenet_v2_built")
    return built


@pytest.fixture
def device(mosquitto, make_config) -> Iterator[AgentDaemon]:
    """Agent ``pi-01`` of fleet ``lab`` with its daemon on the test's Mosquitto (telemetry kept
    for explicit flushes, uploads every 0.2 s)."""
    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600)
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    yield daemon
    daemon.stop()
    agent.close()
