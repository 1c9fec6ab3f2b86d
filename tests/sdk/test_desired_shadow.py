"""The desired state's optional shadow section (docs/shadow.md)."""

from __future__ import annotations

import json

import pytest
from edgekit import SigningKey, TrustedKeys
from edgekit.desired import (
    DesiredState,
    ShadowRequest,
    new_desired_state,
    sign_desired_state,
    verify_desired_state,
)
from edgekit.errors import DesiredStateError

A = "a" * 64
B = "b" * 64


def test_a_document_without_a_shadow_is_what_older_agents_read():
    state = new_desired_state("lab", bundle_sha256=A, bundle_name="digits", bundle_version="1.0.0", seq=1)
    assert "shadow" not in json.loads(state.to_json())
    assert state.shadow is None


def test_a_shadow_section_round_trips_through_a_signed_envelope():
    key = SigningKey.generate()
    request = ShadowRequest(B, "digits", "2.0.0", 0.1, 2_000_000_000)
    state = new_desired_state(
        "lab", bundle_sha256=A, bundle_name="digits", bundle_version="1.0.0", seq=3, shadow=request
    )
    verified = verify_desired_state(sign_desired_state(state, key), TrustedKeys([key.public]), fleet="lab")
    assert verified.shadow == request
    assert json.loads(state.to_json())["shadow"]["until"] == "2033-05-18T03:33:20Z"


def test_an_older_agent_refuses_a_document_with_a_shadow_section_cleanly():
    # What an agent before the shadow section checks: exactly the fields it knows.
    request = ShadowRequest(B, "digits", "2.0.0", 0.1, 2_000_000_000)
    doc = json.loads(
        new_desired_state(
            "lab", bundle_sha256=A, bundle_name="digits", bundle_version="1.0.0", seq=3, shadow=request
        ).to_json()
    )
    old_fields = {"schema", "schema_version", "fleet", "device", "bundle", "seq", "issued_at", "expires_at"}
    assert set(doc) != old_fields and set(doc) - {"shadow"} == old_fields


@pytest.mark.parametrize(
    ("shadow", "words"),
    [
        (
            {"sha256": B, "name": "digits", "version": "2.0.0", "sample": 0, "until": "2033-05-18T03:33:20Z"},
            "sample rate",
        ),
        (
            {
                "sha256": B,
                "name": "digits",
                "version": "2.0.0",
                "sample": 1.5,
                "until": "2033-05-18T03:33:20Z",
            },
            "sample rate",
        ),
        (
            {
                "sha256": "x",
                "name": "digits",
                "version": "2.0.0",
                "sample": 0.1,
                "until": "2033-05-18T03:33:20Z",
            },
            "sha256",
        ),
        ({"sha256": B, "name": "digits", "version": "2.0.0", "sample": 0.1}, "exactly the fields"),
        ({"sha256": B, "name": "digits", "version": "2.0.0", "sample": 0.1, "until": "soon"}, "shadow until"),
        ("yes", "exactly the fields"),
    ],
)
def test_a_malformed_shadow_section_is_refused(shadow, words):
    doc = json.loads(
        new_desired_state(
            "lab", bundle_sha256=A, bundle_name="digits", bundle_version="1.0.0", seq=1
        ).to_json()
    )
    doc["shadow"] = shadow
    with pytest.raises(DesiredStateError, match=words) as refused:
        DesiredState.from_json(json.dumps(doc).encode())
    assert refused.value.reason == "malformed"  # type: ignore[attr-defined]


def test_a_shadow_section_can_name_the_devices_asked_and_only_those_are_asked():
    key = SigningKey.generate()
    request = ShadowRequest(B, "digits", "2.0.0", 0.1, 2_000_000_000, devices=("cam-1", "cam-3"))
    state = new_desired_state(
        "lab", bundle_sha256=A, bundle_name="digits", bundle_version="1.0.0", seq=3, shadow=request
    )
    assert json.loads(state.to_json())["shadow"]["devices"] == ["cam-1", "cam-3"]
    verified = verify_desired_state(sign_desired_state(state, key), TrustedKeys([key.public]), fleet="lab")
    assert verified.shadow == request
    assert verified.shadow.asks("cam-1") and not verified.shadow.asks("cam-2")
    # Without devices: every device the document reaches, and the section is what it was.
    everyone = ShadowRequest(B, "digits", "2.0.0", 0.1, 2_000_000_000)
    assert everyone.asks("cam-2") and "devices" not in everyone.to_dict()


SECTION = {"sha256": B, "name": "digits", "version": "2.0.0", "sample": 0.1, "until": "2033-05-18T03:33:20Z"}


@pytest.mark.parametrize(
    ("devices", "words"),
    [
        ([], "1 to 1000 device ids"),
        ("cam-1", "1 to 1000 device ids"),
        ([1], "1 to 1000 device ids"),
        (["cam-2", "cam-1"], "sorted and distinct"),
        (["cam-1", "cam-1"], "sorted and distinct"),
        (["cam/1"], "shadow section names an"),
        ([f"cam-{i:04d}" for i in range(1001)], "1 to 1000 device ids"),
    ],
)
def test_a_malformed_shadow_devices_list_is_refused(devices, words):
    doc = json.loads(
        new_desired_state(
            "lab", bundle_sha256=A, bundle_name="digits", bundle_version="1.0.0", seq=1
        ).to_json()
    )
    doc["shadow"] = {**SECTION, "devices": devices}
    with pytest.raises(DesiredStateError, match=words) as refused:
        DesiredState.from_json(json.dumps(doc).encode())
    assert refused.value.reason == "malformed"  # type: ignore[attr-defined]
