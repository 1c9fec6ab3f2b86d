"""The topic layout: names built from ids, parsed back, and everything else refused."""

from __future__ import annotations

import hashlib

import pytest
from edgekit.errors import TopicError
from edgekit.topics import TopicParts, Topics
from hypothesis import given
from hypothesis import strategies as st

SHA = hashlib.sha256(b"bundle").hexdigest()


def test_default_layout_matches_the_design() -> None:
    t = Topics()
    assert t.fleet_desired("shop-cams") == "edgekit/fleets/shop-cams/desired"
    assert t.device_desired("cam-1") == "edgekit/devices/cam-1/desired"
    assert t.bundle_manifest(SHA) == f"edgekit/bundles/{SHA}/manifest"
    assert t.bundle_chunk(SHA, 7) == f"edgekit/bundles/{SHA}/chunks/7"
    assert t.bundle_chunks_filter(SHA) == f"edgekit/bundles/{SHA}/chunks/+"
    assert t.device_state("cam-1") == "edgekit/devices/cam-1/state"
    assert t.device_telemetry("cam-1") == "edgekit/devices/cam-1/telemetry"
    assert t.device_events("cam-1") == "edgekit/devices/cam-1/events"
    assert t.all_devices_filter("telemetry") == "edgekit/devices/+/telemetry"
    assert t.fleet_capture("shop-cams") == "edgekit/fleets/shop-cams/capture"
    assert t.device_capture("cam-1") == "edgekit/devices/cam-1/capture"
    assert t.device_capture_ack("cam-1") == "edgekit/devices/cam-1/capture_ack"
    assert t.all_devices_filter("capture") == "edgekit/devices/+/capture"


@pytest.mark.parametrize("prefix", ["edgekit", "acme/prod/edgekit"])
def test_every_topic_parses_back_into_its_parts(prefix: str) -> None:
    t = Topics(prefix)
    assert t.parse(t.fleet_desired("f1")) == TopicParts("fleet_desired", fleet="f1")
    assert t.parse(t.device_desired("d.1")) == TopicParts("device_desired", device="d.1")
    assert t.parse(t.bundle_manifest(SHA)) == TopicParts("bundle_manifest", sha256=SHA)
    assert t.parse(t.bundle_chunk(SHA, 12)) == TopicParts("bundle_chunk", sha256=SHA, chunk=12)
    for leaf in ("state", "telemetry", "events", "capture", "capture_ack"):
        assert t.parse(f"{prefix}/devices/d_2/{leaf}") == TopicParts(f"device_{leaf}", device="d_2")
    assert t.parse(t.fleet_capture("f1")) == TopicParts("fleet_capture", fleet="f1")


@pytest.mark.parametrize(
    "topic",
    [
        "edgekit/devices/+/state",
        "edgekit/devices/#",
        "edgekit/fleets/a/desired/extra",
        "other/fleets/a/desired",
        "edgekit/devices/-bad/state",
        "edgekit/devices//state",
        "edgekit/devices/d1/secrets",
        f"edgekit/bundles/{SHA.upper()}/manifest",
        f"edgekit/bundles/{SHA}/chunks/01",
        f"edgekit/bundles/{SHA}/chunks/-1",
        f"edgekit/bundles/{SHA}/chunks/x",
        "edgekitx/fleets/a/desired",
        "",
    ],
)
def test_foreign_wildcard_and_malformed_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse(topic)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a+", "-lead", "x" * 65, "sp ace", "é"])
def test_bad_ids_never_become_topics(bad: str) -> None:
    t = Topics()
    with pytest.raises(TopicError, match="invalid device id"):
        t.device_state(bad)
    with pytest.raises(TopicError, match="invalid fleet id"):
        t.fleet_desired(bad)


@pytest.mark.parametrize("prefix", ["", "/edgekit", "edgekit/", "a/+/b", "$SYS", "e#"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(TopicError, match="invalid topic prefix"):
        Topics(prefix)


def test_bad_chunk_index_and_digest_are_refused() -> None:
    with pytest.raises(TopicError):
        Topics().bundle_chunk(SHA, -1)
    with pytest.raises(TopicError):
        Topics().bundle_chunk(SHA, True)
    with pytest.raises(TopicError):
        Topics().bundle_manifest("abc")


@given(st.text(max_size=200))
def test_parsing_arbitrary_text_only_raises_topic_error(text: str) -> None:
    try:
        parts = Topics().parse(text)
    except TopicError:
        return
    assert text.startswith("edgekit/") and "+" not in text and "#" not in text
    assert parts.kind
