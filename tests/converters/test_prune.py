"""Pruning masks and schedule: plain numpy, checked against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from edgekit.converters.prune import magnitude_mask, polynomial_sparsity, two_four_mask
from hypothesis import given, settings
from hypothesis import strategies as st


def test_schedule_ramps_from_zero_to_the_target_and_stays_there() -> None:
    values = [polynomial_sparsity(step, 0.75, end_step=100) for step in range(0, 131)]
    assert values[0] == 0.0
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[100] == values[130] == 0.75
    # cubic: most of the pruning happens early, when the network can still recover
    assert values[50] == pytest.approx(0.75 * (1 - 0.5**3))


@settings(max_examples=50, deadline=None)
@given(sparsity=st.floats(0.0, 1.0), size=st.integers(1, 500), seed=st.integers(0, 2**16))
def test_magnitude_mask_removes_exactly_the_smallest_weights(sparsity: float, size: int, seed: int) -> None:
    kernel = np.random.default_rng(seed).normal(size=size).astype(np.float32)
    mask = magnitude_mask(kernel, sparsity)
    assert int((mask == 0).sum()) == round(sparsity * size)
    if 0 < (mask == 0).sum() < size:
        assert np.abs(kernel[mask == 0]).max() <= np.abs(kernel[mask == 1]).min()


@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (288, 10), (5, 6, 4), (3, 3, 3, 7)])
def test_two_four_mask_keeps_the_two_largest_of_every_four_along_the_reduction_axis(
    shape: tuple[int, ...],
) -> None:
    kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    mask = two_four_mask(kernel)
    rows_k = np.moveaxis(kernel, -1, 0).reshape(shape[-1], -1)  # TFLite layout: (out, reduction)
    rows_m = np.moveaxis(mask, -1, 0).reshape(shape[-1], -1)
    n = rows_k.shape[1]
    for start in range(0, n, 4):
        group_k, group_m = np.abs(rows_k[:, start : start + 4]), rows_m[:, start : start + 4]
        kept = group_m.sum(axis=1)
        assert np.all(kept == min(2, group_k.shape[1]))
        smallest_kept = np.where(group_m == 1, group_k, np.inf).min(axis=1)
        largest_dropped = np.where(group_m == 0, group_k, -np.inf).max(axis=1)
        assert np.all(smallest_kept >= largest_dropped)
