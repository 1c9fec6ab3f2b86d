"""The signed bench request (edgekit.bench): what a device follows and what it refuses, and the
workstation's checks of --threads. Pure: bytes and keys in, a request or a BenchError out."""

from __future__ import annotations

import base64
import json

import pytest
from edgekit import SigningKey, TrustedKeys
from edgekit.bench import (
    BenchCandidate,
    BenchRequest,
    new_bench_request,
    parse_threads,
    sign_bench_request,
    verify_bench_request,
)
from edgekit.errors import BenchError

KEY = SigningKey.generate()
TRUSTED = TrustedKeys([KEY.public])
CANDIDATE = BenchCandidate("a" * 64, "digits", "2.0.0")


def request(**extra: object) -> BenchRequest:
    fields = {"seq": 3, "devices": ["cam-1"], "candidates": [CANDIDATE], "threads": (1, 2), "runs": 20}
    return new_bench_request("shop", **{**fields, **extra})  # type: ignore[arg-type]


def refused(data: bytes, reason: str, **kwargs: object) -> str:
    with pytest.raises(BenchError) as caught:
        verify_bench_request(data, TRUSTED, **{"fleet": "shop", "device": "cam-1", **kwargs})  # type: ignore[arg-type]
    assert caught.value.reason == reason, str(caught.value)
    return str(caught.value)


def test_a_signed_request_for_this_device_is_followed():
    got = verify_bench_request(
        sign_bench_request(request(), KEY), TRUSTED, fleet="shop", device="cam-1", last_seq=2
    )
    assert got == request() and got.candidates[0].label == "digits@2.0.0"


def test_unsigned_untrusted_forged_and_malformed_requests_are_refused():
    assert "unsigned" in refused(request().to_json(), "unsigned")
    assert "does not trust" in refused(sign_bench_request(request(), SigningKey.generate()), "untrusted")
    envelope = json.loads(sign_bench_request(request(), KEY))
    doc = request(runs=10_000).to_dict()
    envelope["payload"] = base64.b64encode(json.dumps(doc).encode()).decode()
    assert "altered" in refused(json.dumps(envelope).encode(), "forged")
    assert "not JSON" in refused(b"{", "malformed")


def test_requests_for_another_fleet_or_device_expired_or_replayed_are_refused():
    assert "not this device's fleet 'lab'" in refused(
        sign_bench_request(request(), KEY), "other-fleet", fleet="lab"
    )
    assert "does not name device cam-2" in refused(
        sign_bench_request(request(), KEY), "not-chosen", device="cam-2"
    )
    old = sign_bench_request(request(ttl=60, now=1_000_000), KEY)
    assert "expired" in refused(old, "expired")
    assert "not above the last one followed" in refused(
        sign_bench_request(request(), KEY), "replayed", last_seq=3
    )


def test_the_retained_copy_of_a_request_already_followed_is_a_replay_even_once_it_expired():
    # A day later every reconnect gets the retained copy: the device must see "already followed"
    # (ignored quietly), not "expired" (a bench_refused event each time).
    old = sign_bench_request(request(ttl=60, now=1_000_000), KEY)
    assert "not above the last one followed" in refused(old, "replayed", last_seq=3)
    assert "expired" in refused(old, "expired", last_seq=2)  # a newer one that expired: refused


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"devices": []}, "must name 1 to"),
        ({"candidates": []}, "must name 1 to"),
        ({"threads": (0,)}, "threads must be"),
        ({"threads": (1, 1)}, "threads must be"),
        ({"runs": 0}, "runs must be"),
        ({"devices": ["a/b"]}, "invalid device id"),
    ],
)
def test_a_request_that_no_device_could_follow_is_refused_on_the_workstation(extra, said):
    with pytest.raises(BenchError, match=said):
        request(**extra)


def test_parse_threads_takes_a_list_of_thread_counts_and_names_what_is_wrong():
    assert parse_threads("1,2,4") == (1, 2, 4) and parse_threads(" 8 ") == (8,)
    for text, said in [
        ("", "write it like 1,2,4"),
        ("1,x", "write it like 1,2,4"),
        ("0", "from 1 to 64"),
        ("65", "from 1 to 64"),
        ("1,1", "different thread counts"),
        ("1,2,3,4,5,6,7,8,9", "up to 8"),
    ]:
        with pytest.raises(BenchError, match=said):
            parse_threads(text)
