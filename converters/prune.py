"""Magnitude pruning for Keras 3 models, with fine-tuning (no tf-keras, no model-optimization toolkit).

Unstructured: each prunable layer's kernel loses its smallest-magnitude weights, the fraction
growing along the polynomial schedule of Zhu & Gupta (2017),
``s(t) = s_f + (s_0 - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** 3``, re-chosen every few steps while
the model trains; after ``t_1`` (70% of the steps) the mask is fixed and training recovers the
accuracy. ``2:4``: in every group of 4 consecutive weights along a kernel's reduction axis (per
output channel, in TFLite's weight layout) the 2 largest survive (50% sparsity, the pattern
sparse tensor cores accelerate); the mask is chosen once and held during fine-tuning.

Pruned weights are exact zeros, so they stay zeros through every quantization mode (int8
weights are symmetric, zero point 0; float16 zero is zero) and compress well.
Layers with fewer than :data:`MIN_WEIGHTS` kernel weights stay dense (pruning them saves almost
nothing and costs accuracy). Channel pruning (removing whole filters) is not implemented.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgekit.errors import ConfigError, DataError

__all__ = ["MIN_WEIGHTS", "PATTERNS", "LayerSparsity", "PruneResult", "prune_model", "two_four_mask"]

log = logging.getLogger(__name__)

PATTERNS = ("unstructured", "2:4")
MIN_WEIGHTS = 256
#: Fraction of the training steps over which the sparsity ramps up; the rest fine-tunes.
RAMP_FRACTION = 0.7
#: Number of mask updates along the ramp.
MASK_UPDATES = 16


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    weights: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0


@dataclass(frozen=True)
class PruneResult:
    target: float
    pattern: str
    epochs: int
    steps: int
    seconds: float
    layers: tuple[LayerSparsity, ...]
    skipped: tuple[str, ...]  # layers left dense
    final_loss: float | None
    final_accuracy: float | None

    @property
    def sparsity(self) -> float:
        """Zeros over weights across the pruned layers."""
        total = sum(layer.weights for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "pattern": self.pattern,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "sparsity": round(self.sparsity, 6),
            "layers": [
                {"name": x.name, "weights": x.weights, "zeros": x.zeros, "sparsity": round(x.sparsity, 6)}
                for x in self.layers
            ],
            "dense_layers": list(self.skipped),
            "final_loss": self.final_loss,
            "final_accuracy": self.final_accuracy,
        }


def _prunable(model: Any, pattern: str) -> tuple[list[Any], list[str]]:
    import keras

    kinds: tuple[Any, ...] = (
        keras.layers.Dense,
        keras.layers.Conv1D,
        keras.layers.Conv2D,
        keras.layers.Conv3D,
    )
    if pattern == "unstructured":
        kinds += (keras.layers.DepthwiseConv2D,)
    chosen: list[Any] = []
    skipped: list[str] = []
    for layer in _all_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or isinstance(layer, (keras.layers.Conv2DTranspose, keras.layers.Conv1DTranspose)):
            continue
        if not isinstance(layer, kinds):
            skipped.append(layer.name)
            continue
        if int(np.prod(kernel.shape)) < MIN_WEIGHTS:
            skipped.append(layer.name)
            continue
        chosen.append(layer)
    return chosen, skipped


def _all_layers(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:  # nested models
            out.extend(_all_layers(layer))
        else:
            out.append(layer)
    return out


def magnitude_mask(kernel: np.ndarray, sparsity: float) -> np.ndarray:
    """Mask (1 keep, 0 prune) removing the ``sparsity`` fraction of smallest-magnitude weights."""
    flat = np.abs(kernel).reshape(-1)
    k = round(sparsity * flat.size)
    if k <= 0:
        return np.ones_like(kernel, dtype=np.float32)
    if k >= flat.size:
        return np.zeros_like(kernel, dtype=np.float32)
    order = np.argpartition(flat, k - 1)[:k]
    mask = np.ones(flat.size, dtype=np.float32)
    mask[order] = 0.0
    return mask.reshape(kernel.shape)


def _rows(kernel: np.ndarray) -> np.ndarray:
    """Kernel as (output channels, reduction) rows, the order TFLite stores the weights in."""
    return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)


def two_four_mask(kernel: np.ndarray) -> np.ndarray:
    """2:4 mask: 2 of every 4 consecutive weights along the reduction axis are kept (the largest)."""
    rows = _rows(kernel)
    out_ch, n = rows.shape
    pad = (-n) % 4
    padded = np.concatenate([np.abs(rows), np.full((out_ch, pad), -1.0)], axis=1) if pad else np.abs(rows)
    groups = padded.reshape(out_ch, -1, 4)
    ranks = np.argsort(np.argsort(-groups, axis=2, kind="stable"), axis=2)
    keep = (ranks < 2).astype(np.float32).reshape(out_ch, -1)[:, :n]
    restored = keep.reshape((kernel.shape[-1], *kernel.shape[:-1]))
    return np.moveaxis(restored, 0, -1)


def polynomial_sparsity(step: int, target: float, end_step: int, initial: float = 0.0) -> float:
    """The schedule's sparsity at ``step`` (cubic ramp from ``initial`` to ``target`` by ``end_step``)."""
    if end_step <= 0 or step >= end_step:
        return target
    progress = step / end_step
    return target + (initial - target) * (1.0 - progress) ** 3


def _loss_for(model: Any, y: np.ndarray) -> tuple[Any, list[Any]]:
    import keras

    if getattr(model, "loss", None):
        return model.loss, ["accuracy"] if y.ndim == 1 or y.shape[-1] > 1 else []
    last = _all_layers(model)[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    units = int(np.prod(model.outputs[0].shape[1:]))
    if units == 1:
        return keras.losses.BinaryCrossentropy(from_logits=activation != "sigmoid"), ["accuracy"]
    from_logits = activation != "softmax"
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits), ["accuracy"]
    return keras.losses.CategoricalCrossentropy(from_logits=from_logits), ["accuracy"]


def prune_model(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    sparsity: float,
    pattern: str = "unstructured",
    epochs: int = 8,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    on_batch: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place while fine-tuning it on (x, y). ``on_batch(step, total)`` reports progress."""
    import keras

    if pattern not in PATTERNS:
        raise ConfigError(f"unknown --sparsity-pattern {pattern!r}; choose unstructured or 2:4")
    if pattern == "2:4":
        sparsity = 0.5
    if not 0.0 < sparsity < 1.0:
        raise ConfigError(f"--prune {sparsity} is out of range; give a fraction between 0 and 1, e.g. 0.75")
    if epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"training data has {x.shape[0]} inputs but {y.shape[0]} labels")
    layers, skipped = _prunable(model, pattern)
    if not layers:
        raise ConfigError(
            f"the model has no layer to prune (Dense/Conv kernels of at least {MIN_WEIGHTS} weights)"
        )
    steps_per_epoch = int(np.ceil(x.shape[0] / batch_size))
    total = steps_per_epoch * epochs
    end_step = max(1, int(total * RAMP_FRACTION)) if pattern == "unstructured" else 0
    every = max(1, end_step // MASK_UPDATES)
    masks: dict[str, np.ndarray] = {}

    def update_masks(step: int) -> None:
        for layer in layers:
            kernel = np.asarray(layer.kernel.numpy())
            if pattern == "2:4":
                masks[layer.name] = two_four_mask(kernel)
            else:
                masks[layer.name] = magnitude_mask(kernel, polynomial_sparsity(step, sparsity, end_step))

    def apply_masks() -> None:
        for layer in layers:
            layer.kernel.assign(np.asarray(layer.kernel.numpy()) * masks[layer.name])

    class _Pruning(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.step = 0

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.step += 1
            if pattern == "unstructured" and self.step <= end_step and self.step % every == 0:
                update_masks(self.step)
            apply_masks()
            if on_batch is not None:
                on_batch(self.step, total)

    loss, metrics = _loss_for(model, y)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    update_masks(0)
    apply_masks()
    started = time.perf_counter()
    history = model.fit(
        np.asarray(x, dtype=np.float32),
        y,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[_Pruning()],
    )
    # The final mask is the target sparsity exactly, whatever the last update step was.
    if pattern == "unstructured":
        update_masks(total)
    apply_masks()
    seconds = time.perf_counter() - started
    stats = []
    for layer in layers:
        kernel = np.asarray(layer.kernel.numpy())
        stats.append(LayerSparsity(layer.name, int(kernel.size), int(np.count_nonzero(kernel == 0))))
    hist = history.history
    final_loss = float(hist["loss"][-1]) if hist.get("loss") else None
    final_acc = float(hist["accuracy"][-1]) if hist.get("accuracy") else None
    log.info("pruned %d layers to %.1f%% sparsity in %.1fs", len(layers), 100 * sparsity, seconds)
    return PruneResult(
        target=sparsity,
        pattern=pattern,
        epochs=epochs,
        steps=total,
        seconds=seconds,
        layers=tuple(stats),
        skipped=tuple(skipped),
        final_loss=final_loss,
        final_accuracy=final_acc,
    )


def weight_sparsity(tflite: bytes) -> tuple[int, int]:
    """(zeros, weights) over the .tflite's constant weight tensors (rank >= 2: kernels, not biases).

    Read straight from the flatbuffer with :func:`edgekit.tflite.constant_tensors`, so this is
    what a device will load, whatever the quantization.
    """
    from edgekit.tflite import constant_tensors

    zeros = total = 0
    for spec, raw in constant_tensors(tflite):
        if len(spec.shape) < 2 or spec.dtype not in ("float32", "float16", "int8"):
            continue
        values = np.frombuffer(raw, dtype=np.dtype(spec.dtype))
        total += values.size
        zeros += int(np.count_nonzero(values == 0))
    return zeros, total
