"""Write the digits models and test data to a directory, for test runs without TensorFlow.

The lean device venv (``make test-agent-lean``: tflite-runtime, numpy<2, no TensorFlow, no
scikit-learn) cannot train or convert models. This script runs in the main venv, trains and
converts the same digits models the ``digits_models`` fixture makes (same code, same seed),
and writes ``digits_fp32.tflite``, ``digits_int8.tflite``, ``digits_test.npz``, the
quantization-aware-trained ``digits_qat_int8.tflite`` with ``digits_qat_expected.npy`` and a
MobileNetV2-size ``mobilenet_v2_fp32.tflite`` (the memory-budget test's) to the
directory given; the agent tests read them from there when ``EDGEKIT_TEST_MODELS`` names it.
Nothing binary is committed.

    python tests/agent/export_models.py .cache/agent-models
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import (
    convert_to_tflite,
    load_digits_images,
    mobilenet_v2_tflite,
    qat_digits_int8,
    train_digits_cnn,
)


def export(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    x, y = load_digits_images()
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    model = train_digits_cnn(x_train, y_train)
    (directory / "digits_fp32.tflite").write_bytes(convert_to_tflite(model))
    (directory / "digits_int8.tflite").write_bytes(convert_to_tflite(model, x_train))
    np.savez(directory / "digits_test.npz", x=x_test, y=y_test, x_train=x_train, y_train=y_train)
    qat, expected = qat_digits_int8(model, x_train, y_train, x_test)
    (directory / "digits_qat_int8.tflite").write_bytes(qat)
    np.save(directory / "digits_qat_expected.npy", expected)
    (directory / "mobilenet_v2_fp32.tflite").write_bytes(mobilenet_v2_tflite())
    (directory / ".complete").write_text("ok\n")


if __name__ == "__main__":
    export(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/agent-models"))
