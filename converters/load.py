"""Load the model to convert: a Keras 3 ``.keras`` file, a legacy ``.h5`` file, or a SavedModel directory.

Conversion always goes through a SavedModel on disk (:meth:`SourceModel.saved_model_dir`): a Keras
model is exported once per state of its weights, and every quantization mode converts from that
export, so no mode pays for a second export and nothing is printed on stdout.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import ModelFormatError

__all__ = ["ACCEPTED_FORMATS", "SourceModel", "load_model"]

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = "a Keras 3 .keras file, a legacy Keras .h5 file, or a SavedModel directory"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ logging to errors unless the user asked for more, and import it with
    its output captured: TensorFlow 2.21 logs (oneDNN, absl) to stderr before its log level applies."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        with captured_stdout("tensorflow import"):
            import tensorflow  # noqa: F401


@contextlib.contextmanager
def captured_stdout(what: str) -> Iterator[None]:
    """TensorFlow prints on stdout and stderr, from Python and C++; keep it out of ``--json`` and
    the terminal (at the file-descriptor level) and log it at debug level instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    buffer = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text = (sink.read().decode("utf-8", errors="replace") + buffer.getvalue()).strip()
            if text:
                log.debug("%s printed: %s", what, text[:4000])


@dataclass
class SourceModel:
    """The model being converted. ``keras`` is None for a SavedModel directory (not trainable here)."""

    path: Path
    format: str  # "keras", "h5" or "saved_model"
    keras: Any = None
    _export_dir: Path | None = field(default=None, repr=False)
    _tmp: Path | None = field(default=None, repr=False)

    @property
    def trainable(self) -> bool:
        return self.keras is not None

    def saved_model_dir(self) -> Path:
        """A SavedModel of the model's current weights (exported on first use after a change)."""
        if self.keras is None:
            return self.path
        if self._export_dir is None:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="edgekit-convert-"))
            target = self._tmp / f"export{len(list(self._tmp.iterdir()))}"
            try:
                with captured_stdout("keras export"):
                    self.keras.export(str(target), format="tf_saved_model", verbose=False)
            except Exception as exc:  # Keras/TF raise many types; one line for all
                log.debug("exporting %s failed", self.path, exc_info=True)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelFormatError(
                    f"cannot export {self.path} for TFLite conversion: {first[:300]}"
                ) from None
            self._export_dir = target
        return self._export_dir

    def weights_changed(self) -> None:
        """Call after training: the next conversion exports the model again."""
        self._export_dir = None

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._export_dir = None


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise ModelFormatError(
            f"{path} is a directory without saved_model.pb; edgekit convert accepts {ACCEPTED_FORMATS}"
        )
    if not path.exists():
        raise ModelFormatError(f"model {path} does not exist; edgekit convert accepts {ACCEPTED_FORMATS}")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelFormatError(f"cannot read model {path}: {exc.strerror}") from None
    suffix = path.suffix.lower()
    if suffix == ".keras" and zipfile.is_zipfile(path):
        return "keras"
    if suffix in (".h5", ".hdf5") and head == _HDF5_MAGIC:
        return "h5"
    if suffix == ".tflite" or head[4:8] == b"TFL3":
        raise ModelFormatError(
            f"{path} is already a TFLite model; edgekit convert accepts {ACCEPTED_FORMATS} "
            "(use `edgekit bundle create` to bundle a .tflite)"
        )
    if suffix in (".keras", ".h5", ".hdf5"):
        raise ModelFormatError(
            f"{path} is not a valid {suffix} file (corrupt or truncated); re-save the model with model.save()"
        )
    raise ModelFormatError(f"cannot convert {path}: edgekit convert accepts {ACCEPTED_FORMATS}")


def load_model(path: str | Path) -> SourceModel:
    """Open the model at ``path``; any unreadable or unsupported input is a ModelFormatError."""
    path = Path(path)
    kind = _kind(path)
    quiet_tensorflow()
    if kind == "saved_model":
        return SourceModel(path=path, format=kind)
    import keras

    try:
        with captured_stdout("keras load"):
            model = keras.models.load_model(path, compile=True)
    except Exception as exc:
        log.debug("loading %s failed", path, exc_info=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(
            f"cannot load {path} as a Keras model ({reason[:200]}); re-save it with model.save()"
        ) from None
    if not isinstance(model, keras.Model):
        raise ModelFormatError(
            f"{path} does not hold a Keras model; edgekit convert accepts {ACCEPTED_FORMATS}"
        )
    return SourceModel(path=path, format=kind, keras=model)
