"""Quantization-aware training for Keras 3 models (no tf-keras, no model-optimization toolkit).

Fine-tunes a model while its forward pass sees the int8 model's rounding, so the weights learn
to live with it; the model is then converted by the ordinary post-training int8 path
(:mod:`.quantize`) with the same calibration data. During training:

- **weights**: every Conv/Depthwise/Separable/Dense kernel is quantized per output channel,
  symmetric, to [-127, 127], as the TFLite converter does. A float copy of each kernel is what
  the optimizer updates (straight-through estimator: the gradient at the quantized kernel is
  applied to the float copy); the kernel the layer uses is the quantized copy. Batch
  normalization is frozen (inference statistics), so folding it into the kernel, which scales
  each output channel, leaves the per-channel grid the same. After training the layer keeps
  the quantized kernel, which the converter quantizes again without change.
- **activations**: ``tf.quantization.fake_quant_with_min_max_vars`` (8 bits, with TFLite's
  nudging of the range to hold zero exactly) on the output of every layer the int8 model
  quantizes separately: not on a layer whose only consumer is a batch normalization or an
  activation layer (the converter fuses those), not on the model's output. The ranges are the
  minimum and maximum over the calibration data, measured again before every epoch: the ranges
  the converter will measure on the same data at the end.

The model's own layers are reused (:func:`keras.models.clone_model` with the layers themselves
and fake-quant layers inserted between them), so training the quantization-aware graph trains
the model. A model with a layer outside :data:`QAT_LAYERS` is refused, naming those layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgekit.errors import ConfigError, DataError

__all__ = ["QAT_LAYERS", "QatResult", "check_qat_layers", "fake_quantized", "quantization_aware_training"]

log = logging.getLogger(__name__)

_KERNEL_LAYERS = {
    "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    "Dense",
}  # fmt: skip
_FUSED_INTO_PRODUCER = {"BatchNormalization", "ReLU", "Activation"}
_NO_NEW_RANGE = {
    "InputLayer", "Flatten", "Reshape", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise",
    "MaxPooling1D", "MaxPooling2D", "ZeroPadding1D", "ZeroPadding2D", "Cropping2D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
}  # fmt: skip
#: Layers quantization-aware training handles (by class name).
QAT_LAYERS = frozenset(
    _KERNEL_LAYERS
    | _FUSED_INTO_PRODUCER
    | _NO_NEW_RANGE
    | {
        "Softmax", "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
        "Add", "Subtract", "Multiply", "Concatenate", "Rescaling", "LeakyReLU", "UpSampling2D",
    }
)  # fmt: skip
BATCH_SIZE = 32
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class QatResult:
    epochs: int
    steps: int
    seconds: float
    fake_quant_points: int  # activations quantized in training
    kernels: int  # kernels quantized in training
    final_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "fake_quant_points": self.fake_quant_points,
            "kernels": self.kernels,
            "final_loss": self.final_loss,
        }


def check_qat_layers(model: Any) -> None:
    """Refuse (ConfigError naming them) layers quantization-aware training cannot handle."""
    import keras

    if type(model).__name__ not in ("Sequential", "Functional"):
        raise ConfigError(
            "--qat needs a Sequential or functional Keras model (a subclassed model cannot be rewired)"
        )
    bad = [
        f"{layer.name} ({type(layer).__name__})"
        for layer in model.layers
        if type(layer).__name__ not in QAT_LAYERS or isinstance(layer, keras.Model)
    ]
    if bad:
        raise ConfigError(
            f"--qat cannot handle {', '.join(bad[:6])}; convert without --qat "
            "(post-training int8, with --float-layers for the layers that lose most)"
        )


def _quant_points(model: Any) -> set[str]:
    """Names of the layers whose outputs the int8 model quantizes on their own."""
    outputs = {t._keras_history[0].name for t in model.outputs}
    points = set()
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in _NO_NEW_RANGE or layer.name in outputs:
            continue
        consumers = [type(node.operation).__name__ for node in layer._outbound_nodes]
        if consumers and all(c in _FUSED_INTO_PRODUCER for c in consumers):
            continue  # the converter fuses the consumer into this layer: one range, the consumer's
        points.add(layer.name)
    return points


def _fake_quant_layer() -> Any:
    import keras
    import tensorflow as tf

    class FakeQuant(keras.layers.Layer):  # type: ignore[misc]
        def build(self, input_shape: Any) -> None:
            self.low = self.add_weight(shape=(), initializer="zeros", trainable=False, name="min")
            self.high = self.add_weight(shape=(), initializer="ones", trainable=False, name="max")

        def call(self, x: Any) -> Any:
            return tf.quantization.fake_quant_with_min_max_vars(x, self.low, self.high, num_bits=8)

    return FakeQuant


def quantize_kernel(kernel: Any, channel_axes: int) -> Any:
    """Symmetric int8 rounding of ``kernel`` (values stay float), one scale per channel: the last
    ``channel_axes`` axes index the channels (2 for a depthwise kernel: input x multiplier)."""
    import tensorflow as tf

    axes = list(range(len(kernel.shape) - channel_axes))
    scale = tf.reduce_max(tf.abs(kernel), axis=axes, keepdims=True) / 127.0
    scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    return tf.clip_by_value(tf.round(kernel / scale), -127.0, 127.0) * scale


def _kernels(model: Any) -> list[tuple[Any, int]]:
    """(kernel variable, channel axes) of every kernel the converter quantizes per channel."""
    out = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind.startswith("DepthwiseConv"):
            out.append((layer.kernel, 2))  # (k, [k,] in, multiplier): channels are in x multiplier
        elif kind.startswith("SeparableConv"):
            out.extend([(layer.depthwise_kernel, 2), (layer.pointwise_kernel, 1)])
        elif kind in _KERNEL_LAYERS:
            out.append((layer.kernel, 1))
    return out


class _FakeQuantGraph:
    """The model's own layers, rewired with a fake-quant layer after each quantization point."""

    def __init__(self, model: Any) -> None:
        import keras

        points = _quant_points(model)
        fake_quant = _fake_quant_layer()
        self.quantizers: dict[str, Any] = {}

        def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
            out = layer(*args, **kwargs)
            if layer.name in points:
                self.quantizers[layer.name] = fake_quant(name=f"{layer.name}_fake_quant")
                out = self.quantizers[layer.name](out)
            return out

        if type(model).__name__ == "Sequential":  # clone_model takes no call_function for these
            x = model.inputs[0]
            for layer in model.layers:
                x = call_function(layer, x)
            self.model = keras.Model(model.inputs, x)
        else:
            self.model = keras.models.clone_model(
                model, clone_function=lambda layer: layer, call_function=call_function
            )
        self._names = sorted(self.quantizers)
        self._probe = keras.Model(model.inputs, [model.get_layer(name).output for name in self._names])

    def set_ranges(self, calibration: np.ndarray) -> None:
        """Each fake-quant range: min and max (holding 0) over ``calibration``, as the converter measures."""
        outs = self._probe.predict(calibration, batch_size=256, verbose=0)
        outs = outs if isinstance(outs, list) else [outs]
        for name, values in zip(self._names, outs):
            low, high = min(0.0, float(np.min(values))), max(0.0, float(np.max(values)))
            self.quantizers[name].low.assign(low)
            self.quantizers[name].high.assign(high if high > low else low + 1e-6)


def fake_quantized(model: Any, calibration: np.ndarray) -> Any:
    """A Keras model computing what the int8 model will (to check a conversion against).

    Rounds ``model``'s kernels per channel in place (a no-op after quantization-aware training)
    and inserts fake-quant layers with the ranges of ``calibration``.
    """
    check_qat_layers(model)
    for kernel, axes in _kernels(model):
        kernel.assign(quantize_kernel(kernel, axes))
    graph = _FakeQuantGraph(model)
    graph.set_ranges(np.asarray(calibration, dtype=np.float32))
    return graph.model


def quantization_aware_training(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    calibration: np.ndarray,
    epochs: int = 8,
    learning_rate: float = LEARNING_RATE,
    on_batch: Callable[[int, int], None] | None = None,
) -> QatResult:
    """Fine-tune ``model`` in place with int8 rounding in its forward pass; see the module docstring."""
    import keras
    import tensorflow as tf

    from .prune import _loss_for

    if epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"training data has {x.shape[0]} inputs but {y.shape[0]} labels")
    check_qat_layers(model)
    graph = _FakeQuantGraph(model)
    qat = graph.model
    kernels = _kernels(model)
    shadows = [keras.Variable(k.numpy(), name=f"float_{i}") for i, (k, _) in enumerate(kernels)]
    kernel_ids = {id(k): i for i, (k, _) in enumerate(kernels)}
    for layer in model.layers:  # frozen statistics: BN folds into the kernels as at conversion
        if type(layer).__name__ == "BatchNormalization":
            layer.trainable = False
    trainable = list(qat.trainable_variables)
    targets = [shadows[kernel_ids[id(v)]] if id(v) in kernel_ids else v for v in trainable]
    loss_fn, _ = _loss_for(model, y)
    if isinstance(loss_fn, str):
        loss_fn = keras.losses.get(loss_fn)
    optimizer = keras.optimizers.Adam(learning_rate)
    calib = np.asarray(calibration, dtype=np.float32)

    def set_ranges() -> None:
        for (kernel, axes), shadow in zip(kernels, shadows):
            kernel.assign(quantize_kernel(shadow, axes))  # what the converter will see
        graph.set_ranges(calib)

    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
    def step(xb: Any, yb: Any) -> Any:
        for (kernel, axis), shadow in zip(kernels, shadows):
            kernel.assign(quantize_kernel(shadow, axis))
        with tf.GradientTape() as tape:
            out = qat(xb, training=True)
            loss = tf.reduce_mean(loss_fn(yb, out))
        grads = tape.gradient(loss, trainable)
        optimizer.apply_gradients(zip(grads, targets))
        return loss

    n = int(x.shape[0])
    steps_per_epoch = int(np.ceil(n / BATCH_SIZE))
    total = steps_per_epoch * epochs
    rng = np.random.default_rng(0)
    xf = np.asarray(x, dtype=np.float32)
    started = time.perf_counter()
    done = 0
    loss_value = None
    for _ in range(epochs):
        set_ranges()
        order = rng.permutation(n)
        losses = []
        for start in range(0, n, BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            losses.append(float(step(xf[idx], y[idx])))
            done += 1
            if on_batch is not None:
                on_batch(done, total)
        loss_value = float(np.mean(losses))
    for (kernel, axis), shadow in zip(kernels, shadows):
        kernel.assign(quantize_kernel(shadow, axis))
    seconds = time.perf_counter() - started
    log.info("quantization-aware training: %d epochs in %.1fs, loss %.4f", epochs, seconds, loss_value or 0)
    return QatResult(
        epochs=epochs,
        steps=total,
        seconds=seconds,
        fake_quant_points=len(graph.quantizers),
        kernels=len(kernels),
        final_loss=loss_value,
    )
