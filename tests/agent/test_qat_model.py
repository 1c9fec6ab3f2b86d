"""A quantization-aware-trained int8 model on the device's runtime (LiteRT here; tflite-runtime
in the lean device venv of ``make test-agent-lean``): it computes what its Keras model did."""

from __future__ import annotations

import numpy as np
from device_fixtures import Models, QatModel


def test_quantization_aware_trained_int8_model_agrees_with_its_keras_model(
    models: Models, qat_model: QatModel
) -> None:
    from edgekit.runtime import Model, dequantize, quantize
    from edgekit.tflite import inspect_tflite

    content = qat_model.int8.read_bytes()
    info = inspect_tflite(content)
    assert info.inputs[0].dtype == "int8" and info.outputs[0].dtype == "int8"
    model = Model(content, threads=1)
    outputs = np.stack(
        [
            dequantize(model.run([quantize(x[None], info.inputs[0])])[0], info.outputs[0]).reshape(-1)
            for x in models.x_test
        ]
    )
    expected = qat_model.expected
    # The Keras model rounds kernels and activations as int8 does, in float arithmetic; the
    # outputs are probabilities, quantized by the runtime in steps of 1/256.
    assert float(np.abs(outputs - expected).mean()) < 0.01
    assert float(np.mean(outputs.argmax(axis=1) == expected.argmax(axis=1))) >= 0.98
    assert float(np.mean(outputs.argmax(axis=1) == models.y_test)) >= 0.8
