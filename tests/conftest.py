"""Shared fixtures: real servers, real models, a private EDGEKIT_HOME for every test.

- ``mosquitto``: a real Mosquitto on a free port with its own config (never 1883), killed at
  the end of the test; tests may rewrite its config (ACLs) and restart it.
- ``digits_models``: tiny Keras CNNs trained on scikit-learn's digits and converted to fp32
  and int8 .tflite, once per session (TensorFlow import and training cost seconds).
- ``digits_candidates``: shadow candidates built from the digits Keras model (the same answers
  at ~1 ms, shuffled classes, ~3x the compute, NaN, a run the runtime fails), once per session.
- ``diabetes_regressor``: a tiny Keras regressor on scikit-learn's diabetes data, as .tflite
  (and the same answering 0.5 higher: a regression candidate that differs).
- ``third_party_tflite``: a real .tflite model shipped inside a PyPI package (MediaPipe's
  face detector), fetched by `make test` as a wheel; never downloaded at test time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import Mosquitto, RabbitMq, free_port

REPO = Path(__file__).resolve().parent.parent
THIRD_PARTY_DIR = REPO / ".cache" / "third-party"
THIRD_PARTY_WHEEL_GLOB = "mediapipe-0.10.14-*.whl"
THIRD_PARTY_MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"


@pytest.fixture(autouse=True)
def edgekit_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty EDGEKIT_HOME and no passphrase in the environment."""
    home = tmp_path_factory.mktemp("edgekit-home")
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    monkeypatch.delenv("EDGEKIT_KEY_PASSPHRASE", raising=False)
    return home


# -- Mosquitto ----------------------------------------------------------------------------------


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not found:
        pytest.fail(
            "mosquitto is not installed; run `make test`, which installs it (apt-get install mosquitto)"
        )
    return found


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + str(Path(_mosquitto_binary()).parent)
    broker = Mosquitto(port=free_port(), directory=tmp_path / "mosquitto")
    broker.directory.mkdir()
    broker.start()
    yield broker
    broker.stop()


# -- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsModels:
    keras_path: Path
    fp32: Path
    int8: Path
    x_test: np.ndarray  # (N, 8, 8, 1) float32 in [0, 1]
    y_test: np.ndarray
    data_npz: Path  # x_test / y_test as a DATA file


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return x, digits.target.astype(np.int64)


def train_digits_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 4) -> object:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), batch_size=1),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def convert_to_tflite(model: object, representative: np.ndarray | None = None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative is not None:

        def samples() -> Iterator[list[np.ndarray]]:
            for sample in representative[:200]:
                yield [sample[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def qat_digits_int8(
    model: object, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray
) -> tuple[bytes, np.ndarray]:
    """The digits CNN after 1 epoch of quantization-aware training, converted to int8 (int8 I/O),
    and what its fake-quantized Keras model outputs on ``x_test`` (the int8 model should agree)."""
    from edgekit.converters import fake_quantized, quantization_aware_training
    from edgekit.converters.load import SourceModel
    from edgekit.converters.quantize import quantize

    calibration = x_train[:300]
    quantization_aware_training(model, x_train, y_train, calibration, epochs=1)
    expected = np.asarray(fake_quantized(model, calibration).predict(x_test, verbose=0))  # type: ignore[attr-defined]
    source = SourceModel(path=Path("qat.keras"), format="keras", keras=model)
    try:
        content = quantize(source.saved_model_dir(), "int8", "int8", calibration)
    finally:
        source.close()
    return content, expected


@dataclass(frozen=True)
class QatDigits:
    int8: Path  # int8 I/O
    expected: np.ndarray  # the fake-quantized Keras model's outputs on the digits test inputs


@pytest.fixture(scope="session")
def digits_qat(digits_models: DigitsModels, tmp_path_factory: pytest.TempPathFactory) -> QatDigits:
    import keras

    x, y = load_digits_images()
    model = keras.models.load_model(digits_models.keras_path)
    content, expected = qat_digits_int8(model, x[:1400], y[:1400], digits_models.x_test)
    path = tmp_path_factory.mktemp("digits-qat") / "digits_qat_int8.tflite"
    path.write_bytes(content)
    return QatDigits(path, expected)


def mobilenet_v2_tflite() -> bytes:
    """A MobileNetV2-size model (the issue's memory-budget reference): keras.applications
    MobileNetV2 at 224x224x3 with weights=None (random, seeded; nothing downloaded), as fp32
    .tflite: 3.5 M parameters, ~14 MB."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


@pytest.fixture(scope="session")
def mobilenet_v2_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mobilenet") / "mobilenet_v2_fp32.tflite"
    path.write_bytes(mobilenet_v2_tflite())
    return path


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory: pytest.TempPathFactory) -> DigitsModels:
    x, y = load_digits_images()
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    model = train_digits_cnn(x_train, y_train)
    out = tmp_path_factory.mktemp("digits-models")
    keras_path = out / "digits.keras"
    model.save(keras_path)  # type: ignore[attr-defined]
    fp32 = out / "digits_fp32.tflite"
    fp32.write_bytes(convert_to_tflite(model))
    int8 = out / "digits_int8.tflite"
    int8.write_bytes(convert_to_tflite(model, x_train))
    data = out / "digits_test.npz"
    np.savez(data, x=x_test, y=y_test)
    return DigitsModels(keras_path, fp32, int8, x_test, y_test, data)


#: How the shuffled candidate's outputs are permuted: class 0 stays, 1..9 rotate (one fixed
#: point, so it agrees with the serving model exactly on the inputs served as class 0: ~10%).
SHUFFLED_CLASSES = (0, 2, 3, 4, 5, 6, 7, 8, 9, 1)
#: The paced models' work block: the conv features upsampled this many times, through an
#: identity 3x3 convolution, max-pooled back (exact: max of equal values). About 1 ms of compute.
PACE_UPSAMPLE = 32


@dataclass(frozen=True)
class DigitsCandidates:
    """A serving model and shadow candidates built from the digits Keras model (docs/shadow.md),
    as fp32 .tflite. Each runs the trained conv layer, then one work block (``PACE_UPSAMPLE``) whose
    result is its input bit for bit, then a head: on these ~1 ms models a latency ratio measures
    compute, where the bare digits model's ~4 us would be lost in timer and cache noise."""

    serving: Path  # the trained model's answers, bit for bit, at ~1 ms per input
    shuffled: Path  # the final layer's units permuted (``classes``): ~10% top-1 agreement
    slow: Path  # the serving model's answers bit for bit, through three work blocks: ~3x the compute
    nan: Path  # the final bias NaN: every output is NaN (a real fault of a broken export)
    # The serving model's head plus a table lookup (GATHER) whose row is 1000 where the input's
    # top-left pixel is exactly 0 (every digit: the images' corners are blank) and 0 elsewhere
    # (the health check's random inputs): on live inputs the runtime's GATHER kernel fails the
    # run ("gather index out of bounds"), a real crash inside the runtime the device cannot
    # foresee at load (same shapes, same dtypes, loads and allocates fine).
    crash: Path
    classes: tuple[int, ...] = SHUFFLED_CLASSES  # shuffled's output j is the trained model's classes[j]


@pytest.fixture(scope="session")
def digits_candidates(
    digits_models: DigitsModels, tmp_path_factory: pytest.TempPathFactory
) -> DigitsCandidates:
    """Built once per session from ``digits_models``' Keras model (well under a second each)."""
    import keras

    trained = keras.models.load_model(digits_models.keras_path)
    conv, flatten, dense = trained.layers
    kernel, bias = dense.get_weights()
    out = tmp_path_factory.mktemp("digits-candidates")

    class CornerLookup(keras.layers.Layer):
        """A row of a 10 x 10 table, added to the logits: row 1000 (out of bounds) where the
        input's top-left pixel is exactly 0, else row 0."""

        def call(self, x):  # type: ignore[no-untyped-def]
            row = keras.ops.cast(keras.ops.equal(x[:, 0, 0, 0], 0.0), "int32") * 1000
            return keras.ops.take(keras.ops.convert_to_tensor(np.eye(10, dtype=np.float32)), row, axis=0)

    def paced(weights: list[np.ndarray], blocks: int = 1, crash: bool = False) -> bytes:
        inputs = keras.Input(shape=(8, 8, 1), batch_size=1)
        hidden = conv(inputs)
        channels = int(hidden.shape[-1])
        identity = np.zeros((3, 3, channels, channels), np.float32)
        identity[1, 1] = np.eye(channels, dtype=np.float32)
        for _ in range(blocks):  # the runtime computes it all: nothing here is constant-folded
            hidden = keras.layers.UpSampling2D(PACE_UPSAMPLE)(hidden)
            work = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
            hidden = work(hidden)
            work.set_weights([identity])
            hidden = keras.layers.MaxPooling2D(PACE_UPSAMPLE)(hidden)
        last = keras.layers.Dense(10, activation=None if crash else "softmax")
        outputs = last(flatten(hidden))
        last.set_weights(weights)
        if crash:
            outputs = keras.layers.Softmax()(outputs + CornerLookup()(inputs))
        return convert_to_tflite(keras.Model(inputs, outputs))

    order = list(SHUFFLED_CLASSES)
    paths = {}
    for name, content in (
        ("serving", paced([kernel, bias])),
        ("shuffled", paced([kernel[:, order], bias[order]])),
        ("slow", paced([kernel, bias], blocks=3)),
        ("nan", paced([kernel, np.full_like(bias, np.nan)])),
        ("crash", paced([kernel, bias], crash=True)),
    ):
        paths[name] = out / f"digits_{name}.tflite"
        paths[name].write_bytes(content)
    return DigitsCandidates(**paths)


@dataclass(frozen=True)
class Regressor:
    fp32: Path
    x: np.ndarray  # (N, 10) float32, standardised
    y: np.ndarray  # (N,) the disease-progression target, standardised
    data_npz: Path  # x only, for a baseline
    shifted: Path  # the same regressor answering 0.5 higher: a candidate that differs by 0.5


@pytest.fixture(scope="session")
def diabetes_regressor(tmp_path_factory: pytest.TempPathFactory) -> Regressor:
    """A tiny Keras regressor (one output value) on scikit-learn's diabetes data, as fp32 .tflite."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = ((data.data - data.data.mean(axis=0)) / data.data.std(axis=0)).astype(np.float32)
    y = ((data.target - data.target.mean()) / data.target.std()).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(10,), batch_size=1),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.fit(x[:300], y[:300], epochs=10, batch_size=16, verbose=0)
    out = tmp_path_factory.mktemp("diabetes")
    fp32 = out / "diabetes_fp32.tflite"
    fp32.write_bytes(convert_to_tflite(model))
    data_npz = out / "diabetes.npz"
    np.savez(data_npz, x=x[:300])
    last = model.layers[-1]
    kernel, bias = last.get_weights()
    last.set_weights([kernel, bias + 0.5])
    shifted = out / "diabetes_shifted.tflite"
    shifted.write_bytes(convert_to_tflite(model))
    return Regressor(fp32, x, y, data_npz, shifted)


@pytest.fixture(scope="session")
def third_party_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = sorted(THIRD_PARTY_DIR.glob(THIRD_PARTY_WHEEL_GLOB))
    if not wheels:
        pytest.fail(
            f"no {THIRD_PARTY_WHEEL_GLOB} in {THIRD_PARTY_DIR}; `make test` fetches it with pip download"
        )
    out = tmp_path_factory.mktemp("third-party") / Path(THIRD_PARTY_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as wheel:
        out.write_bytes(wheel.read(THIRD_PARTY_MEMBER))
    return out


# -- RabbitMQ -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMq]:
    """RabbitMQ's MQTT plugin on a free port of the node running here (`make rabbitmq`
    installs and starts it). Without RabbitMQ the tests using it are SKIPPED, and say so."""
    ctl = shutil.which("rabbitmqctl") or (
        "/usr/sbin/rabbitmqctl" if Path("/usr/sbin/rabbitmqctl").exists() else None
    )
    if ctl is None:
        pytest.skip("SKIPPED: RabbitMQ is not installed; `make rabbitmq` installs rabbitmq-server")
    if subprocess.run([ctl, "-q", "status"], capture_output=True, check=False).returncode != 0:
        pytest.skip("SKIPPED: RabbitMQ is installed but not running; `make rabbitmq` starts it")
    broker = RabbitMq(ctl).start()
    yield broker
    broker.close()
