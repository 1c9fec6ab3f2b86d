"""Run a TFLite model with whichever runtime is installed.

Preference order: ``ai_edge_litert`` (LiteRT, works with numpy 2), ``tflite_runtime`` (2.14,
needs numpy<2), ``tensorflow.lite`` (last resort, heavy). XNNPACK is the default CPU delegate
of all three; ``Model(..., xnnpack=False)`` runs the built-in kernels instead. Also the
quantize/dequantize rules edgekit applies to a model's I/O.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import ModelFormatError, RuntimeUnavailableError
from .tflite import TensorSpec

__all__ = ["RUNTIMES", "Model", "available_runtimes", "dequantize", "quantize", "resolve_runtime"]

log = logging.getLogger(__name__)

#: Runtime names in order of preference, and the module that provides each interpreter.
RUNTIMES: dict[str, str] = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow.lite",
}


def _interpreter_class(runtime: str) -> Any:
    module = importlib.import_module(RUNTIMES[runtime])
    return module.Interpreter


def available_runtimes() -> list[str]:
    """Runtimes that import here, in preference order."""
    found = []
    for name in RUNTIMES:
        try:
            _interpreter_class(name)
        except Exception:  # noqa: BLE001 - a broken runtime (e.g. numpy ABI mismatch) is just unavailable
            continue
        found.append(name)
    return found


def _select(runtime: str) -> tuple[str, Any]:
    if runtime != "auto":
        if runtime not in RUNTIMES:
            raise RuntimeUnavailableError(f"unknown runtime {runtime!r}; choose auto, {', '.join(RUNTIMES)}")
        try:
            return runtime, _interpreter_class(runtime)
        except Exception as exc:  # noqa: BLE001 - reported as one line naming the runtime
            raise RuntimeUnavailableError(
                f"runtime {runtime!r} does not import ({type(exc).__name__}: {exc}); "
                'install it or set runtime = "auto"'
            ) from None
    errors = []
    for name in RUNTIMES:
        try:
            return name, _interpreter_class(name)
        except Exception as exc:  # noqa: BLE001 - try the next runtime, report all at the end
            errors.append(f"{name}: {type(exc).__name__}")
    raise RuntimeUnavailableError(
        "no TFLite runtime is installed (" + "; ".join(errors) + "); "
        "install edgekit[agent] (LiteRT) or edgekit[agent-tflite]"
    )


def resolve_runtime(runtime: str = "auto") -> str:
    """The runtime ``Model(..., runtime=runtime)`` would use, imported now (it stays imported);
    RuntimeUnavailableError if there is none."""
    return _select(runtime)[0]


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Send what the runtime's C++ code writes to fd 2 (e.g. "INFO: Created TensorFlow Lite
    XNNPACK delegate for CPU.") to the debug log instead of the user's terminal.

    The runtimes offer no Python switch for this logging; only model loading is wrapped.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): leave it alone
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                log.debug("runtime: %s", line)


class Model:
    """A loaded TFLite model. Not thread-safe: callers that share one serialize ``run``."""

    def __init__(
        self,
        content: bytes | str | os.PathLike[str],
        runtime: str = "auto",
        threads: int | None = None,
        xnnpack: bool = True,
    ) -> None:
        """``content``: the model's bytes, or the path (str or path-like) of a model file that nothing rewrites
        while it is served (the runtime maps it instead of holding a copy in memory).
        ``xnnpack``: run through the runtime's default XNNPACK delegate (faster float models; it
        packs its own copy of the weights when the model loads); False: TFLite's built-in
        kernels, which use the weights where they are (nothing to pack, no second copy)."""
        self.runtime, interpreter_class = _select(runtime)
        self.xnnpack = xnnpack
        self._content: bytes | None = None
        options: dict[str, Any] = {"num_threads": threads}
        if not xnnpack:
            resolver = importlib.import_module(interpreter_class.__module__).OpResolverType
            options["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            with _native_stderr_to_log():
                if isinstance(content, (str, os.PathLike)):
                    self._interpreter = interpreter_class(model_path=os.fspath(content), **options)
                else:
                    self._content = bytes(content)  # the interpreter reads from this buffer; keep it alive
                    self._interpreter = interpreter_class(model_content=self._content, **options)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"the runtime {self.runtime} cannot load the model: {exc}") from None
        self.input_details: list[dict[str, Any]] = self._interpreter.get_input_details()
        self.output_details: list[dict[str, Any]] = self._interpreter.get_output_details()
        self._input_indices = [d["index"] for d in self.input_details]
        self._output_indices = [d["index"] for d in self.output_details]

        self.set_tensor, self.invoke, self.get_tensor = _tensor_calls(self._interpreter)

    def close(self) -> None:
        """Free the interpreter now (its arena, packed weights and the model's mapping or
        bytes), whoever still holds this object; running it afterwards raises RuntimeError."""
        self._interpreter = None
        self._content = None
        self.set_tensor = self.invoke = self.get_tensor = _closed

    @property
    def interpreter(self) -> Any:
        """The runtime's own Interpreter (for its details; drive it with :attr:`set_tensor`,
        :attr:`invoke` and :attr:`get_tensor`, see :func:`_tensor_calls`)."""
        return self._interpreter

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Invoke once on raw (already quantized where the model is) inputs; returns copies."""
        if len(inputs) != len(self._input_indices):
            raise ValueError(f"the model takes {len(self._input_indices)} inputs, got {len(inputs)}")
        for index, value in zip(self._input_indices, inputs):
            self.set_tensor(index, value)
        self.invoke()
        return [self.get_tensor(index) for index in self._output_indices]


def _closed(*args: Any) -> Any:
    raise RuntimeError("this model was closed (a newer one was installed)")


def _tensor_calls(interpreter: Any) -> tuple[Any, Any, Any]:
    """``(set_tensor, invoke, get_tensor)`` for an interpreter, as cheap per call as possible.

    All three runtimes wrap one C++ object (``interpreter._interpreter``) whose ``SetTensor``,
    ``Invoke`` and ``GetTensor`` their Python methods call after a safety check: ``invoke()``
    refuses to run while numpy views from ``interpreter.tensor()`` are alive, because a run may
    reallocate the buffers they point into. edgekit never creates such views (``GetTensor``
    returns copies), so it calls the wrapper directly and saves about a microsecond per call,
    which is most of the agent's bookkeeping on a small model. Where the wrapper is not there
    (another runtime version), the public methods are used. Holding these callables keeps a
    reference to the wrapper, which makes the public ``invoke()`` refuse to run: use these.
    """
    wrapper = getattr(interpreter, "_interpreter", None)
    if wrapper is not None and all(hasattr(wrapper, name) for name in ("SetTensor", "Invoke", "GetTensor")):
        get = wrapper.GetTensor

        def get_tensor(index: int) -> Any:
            return get(index, 0)

        return wrapper.SetTensor, wrapper.Invoke, get_tensor
    return interpreter.set_tensor, interpreter.invoke, interpreter.get_tensor


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Real values to the integer type of a quantized tensor, with its scale and zero-point."""
    if not spec.quantized:
        return np.asarray(x, dtype=spec.dtype)
    info = np.iinfo(np.dtype(spec.dtype))
    scale = np.asarray(spec.scale, dtype=np.float32)
    zero = np.asarray(spec.zero_point, dtype=np.float32)
    if scale.size > 1:  # per-axis: broadcast along the quantized dimension
        shape = [1] * np.ndim(x)
        shape[spec.quantized_dimension] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    q = np.round(np.asarray(x, dtype=np.float32) / scale + zero)
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Integer values of a quantized tensor back to real values (float32)."""
    if not spec.quantized:
        return (
            np.asarray(q, dtype=np.float32)
            if np.issubdtype(np.asarray(q).dtype, np.floating)
            else np.asarray(q)
        )
    scale = np.asarray(spec.scale, dtype=np.float32)
    zero = np.asarray(spec.zero_point, dtype=np.float32)
    if scale.size > 1:
        shape = [1] * np.ndim(q)
        shape[spec.quantized_dimension] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((np.asarray(q, dtype=np.float32) - zero) * scale).astype(np.float32)
