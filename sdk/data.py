"""DATA arguments: ``.npy`` (inputs), ``.npz`` (``x`` and optional ``y``), a folder of images, or
a folder of captured field data (``edgekit capture pull``).

A folder whose sub-folders hold the images gets labels from the sub-folder names (sorted);
images are resized to the model's input and scaled to [0, 1]. A capture folder (it has
``records.jsonl``) gives the inputs the devices saw, as they saw them (``inputs/*.npy``), in
record order; with a ``labels.csv`` (``id,label``: the record id and an integer class; ``capture
pull`` writes ``labels-template.csv`` in that form, prefilled with the model's guesses), only the
labelled records, with those labels: a row whose label is left blank is left out, and counted
(``Dataset.unlabelled``, and a warning). Every mismatch is a
:class:`~edgekit.errors.DataError` naming what was expected and what was found.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .tflite import TensorSpec

__all__ = ["IMAGE_SUFFIXES", "Dataset", "fit_to_input", "load_data"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray | None
    source: str
    classes: tuple[str, ...] = ()
    #: Captured records left out because ``labels.csv`` leaves their label blank.
    unlabelled: int = 0

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_data(path: str | os.PathLike[str], image_shape: tuple[int, ...] | None = None) -> Dataset:
    """Load DATA. ``image_shape`` (H, W, C) sizes images from a folder; arrays are left as they are."""
    path = Path(path)
    if path.is_dir() and (path / "records.jsonl").is_file():
        return _load_capture(path)
    if path.is_dir():
        return _load_images(path, image_shape)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    magic = {".npy": b"\x93NUMPY", ".npz": b"PK"}.get(suffix)
    if magic is not None:
        with open(path, "rb") as handle:
            if handle.read(len(magic)) != magic:
                raise DataError(f"cannot read {path}: it is not a {suffix} file (wrong file header)")
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot read {path} as a .npy array ({exc})") from None
        return _checked(Dataset(x=x, y=None, source=str(path)))
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read {path} as a .npz archive ({exc})") from None
        if "x" not in arrays:
            raise DataError(
                f"{path} has no array named 'x' (found: {', '.join(sorted(arrays)) or 'none'}); "
                "save inputs as x= and labels as y="
            )
        return _checked(Dataset(x=arrays["x"], y=arrays.get("y"), source=str(path)))
    raise DataError(
        f"cannot read data from {path}: give a .npy file, a .npz file with x (and y), or a folder of images"
    )


def _checked(data: Dataset) -> Dataset:
    if data.x.ndim < 1 or data.x.shape[0] == 0:
        raise DataError(f"{data.source} holds no samples (shape {data.x.shape})")
    if data.x.dtype == object or not (np.issubdtype(data.x.dtype, np.number) or data.x.dtype == bool):
        raise DataError(f"{data.source} holds {data.x.dtype} values; expected numbers")
    if data.y is not None and (data.y.ndim < 1 or data.y.shape[0] != data.x.shape[0]):
        raise DataError(
            f"{data.source}: y has {data.y.shape[0] if data.y.ndim else 0} labels "
            f"for {data.x.shape[0]} samples in x"
        )
    return data


def _load_images(folder: Path, image_shape: tuple[int, ...] | None) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading a folder of images needs Pillow; install edgekit[convert]") from None
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [
            (f, i)
            for i, c in enumerate(classes)
            for f in sorted((folder / c).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        files = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    height = width = channels = None
    if image_shape:
        height, width = image_shape[0], image_shape[1]
        channels = image_shape[2] if len(image_shape) > 2 else 1
    images: list[np.ndarray] = []
    for file, _ in files:
        try:
            with Image.open(file) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if height and width and img.size != (width, height):
                    img = img.resize((int(width), int(height)), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {file}: {exc}") from None
        if arr.ndim == 2:
            arr = arr[..., None]
        if images and arr.shape != images[0].shape:
            raise DataError(
                f"image {file} is {arr.shape[1]}x{arr.shape[0]}, others are "
                f"{images[0].shape[1]}x{images[0].shape[0]}; pass the model so images are resized"
            )
        images.append(arr)
    labels = np.asarray([label for _, label in files], dtype=np.int64) if classes else None
    return Dataset(x=np.stack(images), y=labels, source=str(folder), classes=tuple(classes))


def _read_labels(path: Path) -> tuple[dict[str, int], int]:
    """The labels of ``labels.csv`` and how many rows leave the label blank (left out)."""
    import csv

    labels: dict[str, int] = {}
    blank = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    header = [c.strip().lower() for c in rows[0][:2]] if rows else []
    if header == ["id", "predicted"]:
        raise DataError(
            f"{path} has the header id,predicted (an older labels-template.csv): correct the guesses, "
            "then rename the column predicted to label"
        )
    if header != ["id", "label"]:
        raise DataError(f"{path} must start with the header id,label (one record id and its class per line)")
    for number, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[1].strip():
            blank += 1  # not labelled (yet): left out
            continue
        if not row[1].strip().lstrip("-").isdigit():
            raise DataError(
                f"{path} line {number}: expected id,label with an integer label, got {','.join(row)!r}"
            )
        labels[row[0].strip()] = int(row[1])
    return labels, blank


def _load_capture(folder: Path) -> Dataset:
    import json

    try:
        lines = [
            json.loads(t)
            for t in (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()
            if t.strip()
        ]
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {folder / 'records.jsonl'}: {exc}") from None
    records = [r for r in lines if isinstance(r, dict) and isinstance(r.get("input"), str)]
    if not records:
        raise DataError(f"{folder} holds no captured inputs (a labels-only policy keeps outputs only)")
    labels_file = folder / "labels.csv"
    y = None
    unlabelled = 0
    if labels_file.exists():
        labels, blank = _read_labels(labels_file)
        before = len(records)
        records = [r for r in records if r.get("id") in labels]
        unlabelled = before - len(records)
        if unlabelled:
            log.warning(
                "%s: %d of %d records have no label%s and are left out",
                labels_file,
                unlabelled,
                before,
                f" ({blank} left blank)" if blank else "",
            )
        if not records:
            raise DataError(
                f"{labels_file} labels none of the records in {folder}; use the ids of records.jsonl"
            )
        y = np.asarray([labels[r["id"]] for r in records], dtype=np.int64)
    arrays = []
    for record in records:
        file = folder / record["input"]
        try:
            arrays.append(np.load(file, allow_pickle=False))
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot read captured input {file}: {exc}") from None
        if arrays[-1].shape != arrays[0].shape:
            raise DataError(
                f"{file} has shape {arrays[-1].shape}, others {arrays[0].shape}: pull one model's captures "
                "at a time (--device, --since)"
            )
    return _checked(Dataset(x=np.stack(arrays), y=y, source=str(folder), unlabelled=unlabelled))


def fit_to_input(x: np.ndarray, spec: TensorSpec, source: str) -> np.ndarray:
    """Per-sample arrays shaped for ``spec`` (leading batch axis kept), or a DataError.

    Accepts exactly the model's per-sample shape, or that shape without a trailing channel axis
    of 1 (grayscale images saved as H x W).
    """
    want = tuple(spec.shape[1:])
    got = tuple(x.shape[1:])
    if got != want:
        if want and want[-1] == 1 and got == want[:-1]:
            x = x[..., None]
        else:
            raise DataError(
                f"{source}: samples have shape {got}, the model's input {spec.name!r} expects "
                f"{want}; reshape the data to (N, {', '.join(map(str, want))})"
            )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{source}: values are {x.dtype}, expected numbers")
    return x
