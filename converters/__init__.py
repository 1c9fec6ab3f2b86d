"""Workstation-side model conversion (TensorFlow lives here and only here).

``convert(ConvertOptions(...))`` turns a Keras or SavedModel model into a quantized, optionally
pruned .tflite, measures it against its float reference, gates it on accuracy, and can write a
signed bundle; ``distill(DistillOptions(...))`` trains a smaller (narrower or shallower) student to mimic a teacher;
see docs/convert.md. TensorFlow is imported on first use, not on import.
"""

from __future__ import annotations

from .blocks import Block, network_blocks, network_depth, shortened
from .convert import ConversionReport, ConvertOptions, StepReporter, Steps, convert, parse_bundle_spec
from .distill import DistillOptions, DistillReport, distill, distill_student, model_cost, narrowed
from .evaluate import LayerError, ModelMetrics
from .load import ACCEPTED_FORMATS, SourceModel, load_model
from .prune import PATTERNS, PruneResult, prune_model, two_four_mask, weight_sparsity
from .qat import QAT_LAYERS, QatResult, fake_quantized, quantization_aware_training
from .quantize import MODES, quantize

__all__ = [
    "ACCEPTED_FORMATS",
    "MODES",
    "PATTERNS",
    "QAT_LAYERS",
    "Block",
    "ConversionReport",
    "ConvertOptions",
    "DistillOptions",
    "DistillReport",
    "LayerError",
    "ModelMetrics",
    "PruneResult",
    "QatResult",
    "SourceModel",
    "StepReporter",
    "Steps",
    "convert",
    "distill",
    "distill_student",
    "fake_quantized",
    "load_model",
    "model_cost",
    "narrowed",
    "network_blocks",
    "network_depth",
    "parse_bundle_spec",
    "prune_model",
    "quantization_aware_training",
    "quantize",
    "shortened",
    "two_four_mask",
    "weight_sparsity",
]
