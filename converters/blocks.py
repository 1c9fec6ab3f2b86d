"""Blocks of a Keras network, and a shallower copy without some of them (``edgekit distill --depth``).

A network's *depth* here is its number of Conv/Depthwise/Separable/Dense layers. Its graph is
cut at its articulation points: the layers every path from the input to the output passes
through (in a plain CNN every layer; in a ResNet the layer after each residual addition). The
layers between two such cuts form a segment. A *block* is a segment holding a Conv/Dense layer,
with the shape-keeping segments without weights that follow it (batch normalization, an
activation, dropout); pooling, flattening and layers edgekit does not know stand alone. A block
whose output has its input's shape can be removed: what came before it feeds what came after it
unchanged. :func:`shortened` removes such blocks, deepest first, until the network is no deeper
than asked, and keeps the teacher's weights in every layer it keeps.

Why a layer is a cut: take the layers in a topological order; a layer at position ``p`` is one
exactly when no connection goes from a layer before ``p`` to a layer after ``p`` (such a
connection is a path around it; without one, every path has to step on ``p``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from edgekit.errors import ConfigError

from .load import captured_stdout

__all__ = ["DEPTH_LAYERS", "Block", "network_blocks", "network_depth", "shortened"]

log = logging.getLogger(__name__)

#: Layers counted in a network's depth (by class name).
DEPTH_LAYERS = frozenset(
    {
        "Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D", "DepthwiseConv1D",
        "DepthwiseConv2D", "Dense",
    }
)  # fmt: skip
#: Layers without a Conv/Dense kernel that a removable block may hold (by class name).
_BLOCK_LAYERS = frozenset(
    {
        "BatchNormalization", "LayerNormalization", "GroupNormalization", "Activation", "ReLU",
        "LeakyReLU", "ELU", "PReLU", "Softmax", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
        "GaussianNoise", "GaussianDropout", "MaxPooling1D", "MaxPooling2D", "AveragePooling1D",
        "AveragePooling2D", "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D", "Add",
        "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "UpSampling2D",
        "Identity",
    }
)  # fmt: skip

_FIX = "give a student architecture with --student ARCH.keras"


@dataclass(frozen=True)
class Block:
    """Consecutive layers between two cuts of the graph, starting at a Conv/Dense layer."""

    layers: tuple[str, ...]  # layer names, in a topological order
    depth: int  # Conv/Dense layers in it
    input_shape: tuple[int | None, ...]  # without the batch dimension
    output_shape: tuple[int | None, ...]
    removable: bool  # output shape == input shape, only known layers, not the classes

    @property
    def name(self) -> str:
        return self.layers[0] if len(self.layers) == 1 else f"{self.layers[0]}..{self.layers[-1]}"

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "depth": self.depth}


def network_depth(model: Any) -> int:
    """Conv/Depthwise/Separable/Dense layers in ``model`` (its depth as ``--depth`` counts it)."""
    return sum(1 for layer in model.layers if type(layer).__name__ in DEPTH_LAYERS)


def _functional(model: Any) -> Any:
    """``model`` as a functional model (a Sequential one is wrapped around the same layers)."""
    import keras
    from keras.src.models.functional import Functional

    if isinstance(model, Functional) and not isinstance(model, keras.Sequential):
        return model
    if isinstance(model, keras.Sequential):
        try:
            return keras.Model(model.inputs, model.outputs, name=model.name)
        except (AttributeError, ValueError):  # a Sequential model never built
            pass
    raise ConfigError(
        f"--depth reads the layers of functional and Sequential Keras models; {model.name} is a "
        f"{type(model).__name__} (a subclassed model); {_FIX}"
    )


def _shape(tensor: Any) -> tuple[int | None, ...]:
    return tuple(None if d is None else int(d) for d in tensor.shape[1:])


def network_blocks(model: Any) -> list[Block]:
    """The blocks of ``model``, input to output; see the module's docstring.

    Raises ConfigError (one line) for a model whose graph cannot be read this way: several inputs
    or outputs, a nested model, a layer used more than once, a subclassed model.
    """
    import keras

    graph = _functional(model)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ConfigError(
            f"--depth needs a model with one input and one output; {model.name} has "
            f"{len(graph.inputs)} and {len(graph.outputs)}; {_FIX}"
        )
    nested = [layer.name for layer in graph.layers if isinstance(layer, keras.Model)]
    if nested:
        raise ConfigError(f"--depth cannot look inside the nested model {nested[0]}; {_FIX}")
    # One node per layer, in a topological order (Keras' node depth counts down to the output).
    nodes = [n for d in sorted(graph._nodes_by_depth, reverse=True) for n in graph._nodes_by_depth[d]]
    seen: set[str] = set()
    for node in nodes:
        name = node.operation.name
        if not node.is_input and not node.input_tensors:
            raise ConfigError(f"--depth cannot follow layer {name}, which takes no input; {_FIX}")
        if name in seen:
            raise ConfigError(
                f"--depth cannot remove blocks around layer {name}, which is used twice; {_FIX}"
            )
        seen.add(name)
    position = {node.operation.name: i for i, node in enumerate(nodes)}
    # covered[p] > 0: some connection jumps over position p, so p is not a cut.
    covered = [0] * (len(nodes) + 1)
    for node in nodes:
        here = position[node.operation.name]
        for tensor in node.input_tensors:
            source = position[tensor._keras_history.operation.name]
            if here - source > 1:
                covered[source + 1] += 1
                covered[here] -= 1
    cuts, running = [], 0
    for i in range(len(nodes)):
        running += covered[i]
        if running == 0:
            cuts.append(i)
    if cuts[0] != 0 or cuts[-1] != len(nodes) - 1:  # a layer without inputs other than the Input
        raise ConfigError(f"--depth cannot find the path from input to output of {model.name}; {_FIX}")

    segments = [nodes[a + 1 : b + 1] for a, b in zip(cuts, cuts[1:])]
    classes_layer = next(
        (n.operation.name for n in reversed(nodes) if type(n.operation).__name__ in DEPTH_LAYERS), None
    )
    blocks: list[Block] = []
    current: list[Any] = []

    def close() -> None:
        if not current:
            return
        names = tuple(n.operation.name for n in current)
        kinds = {type(n.operation).__name__ for n in current}
        first_input = current[0].input_tensors[0]
        in_shape, out_shape = _shape(first_input), _shape(current[-1].outputs[0])
        removable = (
            kinds <= DEPTH_LAYERS | _BLOCK_LAYERS
            and in_shape == out_shape
            and first_input.dtype == current[-1].outputs[0].dtype
            and len(current[-1].outputs) == 1
            and classes_layer not in names
        )
        depth = sum(1 for n in current if type(n.operation).__name__ in DEPTH_LAYERS)
        blocks.append(Block(names, depth, in_shape, out_shape, removable))
        current.clear()

    for segment in segments:
        kinds = {type(n.operation).__name__ for n in segment}
        keeps_shape = _shape(segment[0].input_tensors[0]) == _shape(segment[-1].outputs[0])
        if kinds & DEPTH_LAYERS:
            close()
            current.extend(segment)
        elif current and keeps_shape and kinds <= _BLOCK_LAYERS:
            current.extend(segment)  # batch normalization, an activation after the Conv/Dense layer
        else:
            close()  # pooling, flattening, unknown layers: kept, in no block
    close()
    return blocks


def shortened(model: Any, depth: int) -> tuple[Any, list[Block]]:
    """A copy of ``model`` at most ``depth`` Conv/Dense layers deep, and the blocks it lost.

    Removable blocks are removed deepest first; one that would take the copy below ``depth`` is
    skipped while a shallower one fits exactly, so the copy is as deep as asked when the blocks
    allow it. The copy keeps ``model``'s weights in every layer it keeps (its own variables:
    training it leaves ``model`` unchanged). ConfigError (one line, naming the fix) when no block
    can be removed or ``depth`` cannot be reached.
    """
    import keras

    teacher_depth = network_depth(model)
    if depth >= teacher_depth:
        raise ConfigError(
            f"--depth {depth} is not below the teacher's depth of {teacher_depth} Conv/Dense layers; "
            f"give a smaller --depth (at most {teacher_depth - 1})"
        )
    blocks = network_blocks(model)
    removable = [b for b in blocks if b.removable]
    if not removable:
        raise ConfigError(
            f"--depth {depth}: the teacher has no block of layers whose output has its input's shape, "
            f"so none can be removed; {_FIX}, or narrow the teacher with --width"
        )
    lowest = teacher_depth - sum(b.depth for b in removable)
    if depth < lowest:
        raise ConfigError(
            f"--depth {depth} cannot be reached: without all {len(removable)} removable blocks the "
            f"teacher is still {lowest} Conv/Dense layers deep; give --depth {lowest} to "
            f"{teacher_depth - 1}, or {_FIX}"
        )
    removed: list[Block] = []
    left = teacher_depth
    for block in reversed(removable):  # deepest first, only blocks that do not overshoot
        if left - block.depth >= depth:
            removed.append(block)
            left -= block.depth
    for block in reversed(removable):  # still too deep: overshoot by as little as the order allows
        if left > depth and block not in removed:
            removed.append(block)
            left -= block.depth
    gone = {name for block in removed for name in block.layers}

    def fresh(layer: Any) -> Any:
        return type(layer).from_config(layer.get_config())

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer.name not in gone:
            return layer(*args, **kwargs)
        # Every tensor inside a removed block stands for the block's input (nothing outside the
        # block reads them but through its last layer), so each removed layer passes it on.
        first = args[0]
        return first[0] if isinstance(first, (list, tuple)) else first

    try:
        with captured_stdout("keras clone"):
            graph = _functional(model)
            inputs = keras.tree.map_structure(
                lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=graph.layers[0].name),
                graph.input,
            )
            student = keras.models.clone_model(
                graph, input_tensors=inputs, clone_function=fresh, call_function=call
            )
            for layer in student.layers:
                if layer.weights:
                    layer.set_weights(model.get_layer(layer.name).get_weights())
    except (ValueError, TypeError, KeyError) as exc:  # Keras' errors when a rebuilt graph does not fit
        log.debug("shortening failed", exc_info=True)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"cannot build a --depth {depth} student from this teacher ({first_line[:200]}); {_FIX}"
        ) from None
    log.info("removed blocks: %s", [b.name for b in removed])
    removed.sort(key=blocks.index)
    return student, removed
