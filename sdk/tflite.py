"""Read a .tflite file's signature, ops and constant tensors without TensorFlow.

A .tflite file is a FlatBuffer with the schema in TensorFlow's ``schema.fbs``. This module
walks the few tables edgekit needs (Model, SubGraph, Tensor, QuantizationParameters,
OperatorCode, Buffer, SignatureDef) with bounds checks on every read, so a hostile or
truncated file raises :class:`~edgekit.errors.ModelFormatError`, never anything else.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._tflite_schema import BUILTIN_OPERATORS, TENSOR_TYPES
from .errors import ModelFormatError

__all__ = ["ModelInfo", "TensorSpec", "constant_tensors", "inspect_tflite"]

_IDENTIFIER = b"TFL3"
_CUSTOM = 32  # BuiltinOperator.CUSTOM


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model: what a caller must feed or will receive."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    quantized_dimension: int = 0
    shape_signature: tuple[int, ...] = ()

    @property
    def quantized(self) -> bool:
        """True when the tensor holds integers that stand for real values (scale/zero-point)."""
        return len(self.scale) > 0 and any(s != 0.0 for s in self.scale)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "shape": list(self.shape),
            "shape_signature": list(self.shape_signature or self.shape),
            "dtype": self.dtype,
            "quantization": {
                "scale": list(self.scale),
                "zero_point": list(self.zero_point),
                "quantized_dimension": self.quantized_dimension,
            },
        }


@dataclass(frozen=True)
class ModelInfo:
    """What edgekit records about a model in a bundle manifest."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: tuple[str, ...]
    schema_version: int
    subgraphs: int
    description: str = ""
    signature_keys: tuple[str, ...] = field(default_factory=tuple)


class _FlatBuffer:
    """Bounds-checked reads of FlatBuffer tables, vectors and strings."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.size = len(data)

    def _check(self, pos: int, n: int) -> None:
        if pos < 0 or n < 0 or pos + n > self.size:
            raise ModelFormatError(
                f"the .tflite file is truncated or corrupt (read of {n} bytes at {pos} "
                f"past its {self.size} bytes); re-export the model"
            )

    def u8(self, pos: int) -> int:
        self._check(pos, 1)
        return int(self.data[pos])

    def i8(self, pos: int) -> int:
        self._check(pos, 1)
        return int(struct.unpack_from("<b", self.data, pos)[0])

    def u16(self, pos: int) -> int:
        self._check(pos, 2)
        return int(struct.unpack_from("<H", self.data, pos)[0])

    def u32(self, pos: int) -> int:
        self._check(pos, 4)
        return int(struct.unpack_from("<I", self.data, pos)[0])

    def i32(self, pos: int) -> int:
        self._check(pos, 4)
        return int(struct.unpack_from("<i", self.data, pos)[0])

    def u64(self, pos: int) -> int:
        self._check(pos, 8)
        return int(struct.unpack_from("<Q", self.data, pos)[0])

    # -- tables -----------------------------------------------------------------------------
    def root(self) -> int:
        return self.u32(0)

    def field_pos(self, table: int, index: int) -> int | None:
        """Absolute position of field ``index`` of the table at ``table``, or None if absent."""
        vtable = table - self.i32(table)
        vt_size = self.u16(vtable)
        slot = 4 + 2 * index
        if slot + 2 > vt_size:
            return None
        offset = self.u16(vtable + slot)
        return table + offset if offset else None

    def scalar(self, table: int, index: int, fmt: str, default: int | float = 0) -> Any:
        pos = self.field_pos(table, index)
        if pos is None:
            return default
        n = struct.calcsize(fmt)
        self._check(pos, n)
        return struct.unpack_from("<" + fmt, self.data, pos)[0]

    def indirect(self, table: int, index: int) -> int | None:
        pos = self.field_pos(table, index)
        if pos is None:
            return None
        return pos + self.u32(pos)

    def vector(self, table: int, index: int) -> tuple[int, int]:
        """(start, length) of a vector field; (0, 0) if absent."""
        pos = self.indirect(table, index)
        if pos is None:
            return 0, 0
        length = self.u32(pos)
        self._check(pos + 4, 0)
        if length > self.size:
            raise ModelFormatError("the .tflite file is corrupt (a vector is longer than the file)")
        return pos + 4, length

    def tables(self, table: int, index: int) -> list[int]:
        start, length = self.vector(table, index)
        self._check(start, 4 * length)
        return [start + 4 * i + self.u32(start + 4 * i) for i in range(length)]

    def scalars(self, table: int, index: int, fmt: str) -> tuple[Any, ...]:
        start, length = self.vector(table, index)
        n = struct.calcsize(fmt)
        self._check(start, n * length)
        return struct.unpack_from(f"<{length}{fmt}", self.data, start) if length else ()

    def string(self, table: int, index: int) -> str:
        start, length = self.vector(table, index)
        self._check(start, length)
        return bytes(self.data[start : start + length]).decode("utf-8", errors="replace")


def _tensor(fb: _FlatBuffer, subgraph: int, index: int) -> TensorSpec:
    tensors = fb.tables(subgraph, 0)
    if not 0 <= index < len(tensors):
        raise ModelFormatError(f"the .tflite file is corrupt (tensor index {index} out of range)")
    t = tensors[index]
    type_code = fb.scalar(t, 1, "b")
    quant = fb.indirect(t, 4)
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    qdim = 0
    if quant is not None:
        scale = tuple(float(v) for v in fb.scalars(quant, 2, "f"))
        zero_point = tuple(int(v) for v in fb.scalars(quant, 3, "q"))
        qdim = int(fb.scalar(quant, 6, "i"))
    shape = tuple(int(v) for v in fb.scalars(t, 0, "i"))
    signature = tuple(int(v) for v in fb.scalars(t, 7, "i"))
    return TensorSpec(
        name=fb.string(t, 3),
        index=index,
        shape=shape,
        dtype=TENSOR_TYPES.get(type_code, f"type{type_code}").lower(),
        scale=scale,
        zero_point=zero_point,
        quantized_dimension=qdim,
        shape_signature=signature or shape,
    )


def _open(data: bytes) -> tuple[_FlatBuffer, int]:
    if len(data) < 8 or bytes(data[4:8]) != _IDENTIFIER:
        raise ModelFormatError(
            "not a TFLite model (missing the 'TFL3' file identifier); pass a .tflite file "
            "or convert your model first with `edgekit convert`"
        )
    fb = _FlatBuffer(data)
    return fb, fb.root()


@contextlib.contextmanager
def _corrupt_is_model_format_error() -> Iterator[None]:
    """Every reader of a model file raises ModelFormatError on a malformed one, nothing else:
    a bounds check the reader missed still surfaces as the typed error (tests/fuzz_targets.py)."""
    try:
        yield
    except ModelFormatError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise ModelFormatError(f"the .tflite file is corrupt ({exc}); re-export the model") from exc


def _main_subgraph(subgraphs: list[int]) -> int:
    if not subgraphs:
        raise ModelFormatError("the .tflite file has no subgraph; re-export the model")
    return subgraphs[0]


def inspect_tflite(data: bytes) -> ModelInfo:
    """Read the signature and op list of the model in ``data`` (the bytes of a .tflite file)."""
    with _corrupt_is_model_format_error():
        fb, model = _open(data)
        version = int(fb.scalar(model, 0, "I"))
        subgraphs = fb.tables(model, 2)
        main = _main_subgraph(subgraphs)
        inputs = tuple(_tensor(fb, main, i) for i in fb.scalars(main, 1, "i"))
        outputs = tuple(_tensor(fb, main, i) for i in fb.scalars(main, 2, "i"))
        ops: set[str] = set()
        for code in fb.tables(model, 1):
            builtin = max(int(fb.scalar(code, 0, "b")), int(fb.scalar(code, 3, "i")))
            if builtin == _CUSTOM:
                ops.add("CUSTOM:" + fb.string(code, 1))
            else:
                ops.add(BUILTIN_OPERATORS.get(builtin, f"BUILTIN_{builtin}"))
        keys = tuple(fb.string(sig, 2) for sig in fb.tables(model, 7))
        return ModelInfo(
            inputs=inputs,
            outputs=outputs,
            ops=tuple(sorted(ops)),
            schema_version=version,
            subgraphs=len(subgraphs),
            description=fb.string(model, 3),
            signature_keys=keys,
        )


def constant_tensors(data: bytes) -> Iterator[tuple[TensorSpec, bytes]]:
    """Yield every tensor of the first subgraph that has constant data, with its raw bytes.

    Used to measure how much of a model's weights are zero (pruning sparsity). A malformed
    model raises :class:`~edgekit.errors.ModelFormatError` (possibly after some tensors).
    """
    with _corrupt_is_model_format_error():
        fb, model = _open(data)
        buffers = fb.tables(model, 4)
        main = _main_subgraph(fb.tables(model, 2))
        for index, t in enumerate(fb.tables(main, 0)):
            buf = int(fb.scalar(t, 2, "I"))
            if not 0 < buf < len(buffers):
                continue
            start, length = fb.vector(buffers[buf], 0)
            if length == 0:
                offset = int(fb.scalar(buffers[buf], 1, "Q"))
                length = int(fb.scalar(buffers[buf], 2, "Q"))
                if offset <= 1 or length == 0:
                    continue
                start = offset
            fb._check(start, length)
            spec, raw = _tensor(fb, main, index), bytes(fb.data[start : start + length])
            yield spec, raw
