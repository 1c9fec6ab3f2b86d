"""Every wire decoder, the bundle reader and the agent's state files under hypothesis: random
bytes, mutations of real messages, and real messages with fields replaced by arbitrary JSON.
The targets and what each promises are in tests/fuzz_targets.py; `make fuzz` runs the same
targets under atheris for FUZZ_SECONDS."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from fuzz_targets import TARGETS, Context, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
JSON_TARGETS = [
    "capture_policy",
    "desired_envelope",
    "state_report",
    "telemetry_record",
    "event_record",
    "manifest",
    "manifest_message",
    "baseline",
    "pointer_file",
    "trust_upgrade",
]

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="session")
def ctx(digits_models, tmp_path_factory) -> Context:
    return Context.create(digits_models.fp32, digits_models.data_npz, tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="session")
def seed_inputs(ctx: Context) -> dict[str, list[bytes]]:
    return seeds(ctx)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_real_inputs_pass_their_target(ctx, seed_inputs, name):
    for data in seed_inputs[name]:
        TARGETS[name](ctx, data)


@pytest.mark.parametrize("name", sorted(TARGETS))
@FAST
@given(data=st.binary(max_size=2048))
def test_random_bytes(ctx, name, data):
    TARGETS[name](ctx, data)


@pytest.mark.parametrize("name", sorted(TARGETS))
@FAST
@given(draw=st.data())
def test_mutated_real_inputs(ctx, seed_inputs, name, draw):
    raw = bytearray(draw.draw(st.sampled_from(seed_inputs[name])))
    for _ in range(draw.draw(st.integers(1, 6))):
        how = draw.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw.draw(st.integers(0, max(0, len(raw) - 1)))
        if how == "flip" and raw:
            raw[at] ^= 1 << draw.draw(st.integers(0, 7))
        elif how == "cut":
            del raw[at:]
        elif how == "insert":
            raw[at:at] = draw.draw(st.binary(min_size=1, max_size=16))
        elif raw:
            del raw[at : at + draw.draw(st.integers(1, 16))]
    TARGETS[name](ctx, bytes(raw))


def _replace(doc: Any, path: list[str], value: Any) -> Any:
    if not path or not isinstance(doc, dict):
        return value
    head, *rest = path
    return {**doc, head: _replace(doc.get(head), rest, value)}


def _paths(doc: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(doc, dict):
        return [prefix]
    found = [prefix] if prefix else []
    for key, value in doc.items():
        found += _paths(value, (*prefix, key))
    return found


@pytest.mark.parametrize("name", JSON_TARGETS)
@FAST
@given(draw=st.data())
def test_real_messages_with_fields_replaced_by_arbitrary_json(ctx, seed_inputs, name, draw):
    doc = json.loads(draw.draw(st.sampled_from(seed_inputs[name])))
    for _ in range(draw.draw(st.integers(1, 3))):
        path = draw.draw(st.sampled_from([*_paths(doc), ("extra",)]))
        doc = _replace(doc, list(path), draw.draw(_json))
    TARGETS[name](ctx, json.dumps(doc).encode())
