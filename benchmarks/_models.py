"""Models and bundles the benchmarks share (built in a temporary directory, nothing committed)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
AGENT_MODELS = REPO / ".cache" / "agent-models"
THIRD_PARTY = REPO / ".cache" / "third-party"
FACE_MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"


def digits_models() -> Path:
    """``.cache/agent-models`` with the digits models and data (exported once if missing)."""
    if not (AGENT_MODELS / ".complete").exists():
        sys.path.insert(0, str(REPO / "tests" / "agent"))
        from export_models import export

        export(AGENT_MODELS)
    return AGENT_MODELS


def face_detector(out: Path) -> Path:
    """MediaPipe's short-range face detector (128x128x3 float input), from the fetched wheel."""
    wheels = sorted(THIRD_PARTY.glob("mediapipe-*.whl"))
    if not wheels:
        raise SystemExit("no mediapipe wheel in .cache/third-party; run `make setup`")
    path = out / "face_detection_short_range.tflite"
    with zipfile.ZipFile(wheels[0]) as wheel:
        path.write_bytes(wheel.read(FACE_MEMBER))
    return path


def face_baseline_data(out: Path, n: int = 48) -> Path:
    """Smooth synthetic 128x128 RGB images in [-1, 1] (the detector's input range)."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(-1, 1, size=(n, 8, 8, 3)).astype(np.float32)
    images = coarse.repeat(16, axis=1).repeat(16, axis=2)
    path = out / "face_baseline.npz"
    np.savez(path, x=images)
    return path


def mobilenet_v2(out: Path) -> Path:
    """A MobileNetV2-size model: keras.applications.MobileNetV2(224x224x3, weights=None) as fp32
    .tflite (3.5 M parameters, ~14 MB; random weights, nothing downloaded), built once into
    ``out`` with the main venv's TensorFlow."""
    path = out / "mobilenet_v2_224_fp32.tflite"
    if not path.exists():
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import mobilenet_v2_tflite

        out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mobilenet_v2_tflite())
    return path
