"""Fixtures for the converter tests: DATA files around the session's digits CNN, and a pruned copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@dataclass(frozen=True)
class DigitsData:
    model: Path  # the session's tiny digits CNN (.keras)
    train: Path  # .npz x, y
    test: Path  # .npz x, y
    calibration: Path  # .npy x
    unlabelled: Path  # .npy x (same as test, no labels)


@pytest.fixture(scope="session")
def digits_data(digits_models: Any, tmp_path_factory: pytest.TempPathFactory) -> DigitsData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # as the session's digits models
    y = digits.target.astype(np.int64)
    out = tmp_path_factory.mktemp("digits-data")
    np.savez(out / "train.npz", x=x[:1400], y=y[:1400])
    np.save(out / "calibration.npy", x[:200])
    np.save(out / "unlabelled.npy", x[1400:])
    return DigitsData(
        model=digits_models.keras_path,
        train=out / "train.npz",
        test=digits_models.data_npz,
        calibration=out / "calibration.npy",
        unlabelled=out / "unlabelled.npy",
    )
