"""Shadow evaluation asked for by the signed desired state, through a real Mosquitto."""

from __future__ import annotations

import time

import numpy as np
from edgekit import TrustedKeys
from edgekit.bundle import inspect_bundle, read_bundle
from edgekit.desired import ShadowRequest
from watcher import watcher

__all__ = ["watcher"]


def kinds(watcher) -> list[str]:
    return [e["kind"] for e in watcher.records("events")]


def test_a_desired_state_with_a_shadow_section_tries_the_candidate_beside_the_serving_model(
    watcher, device, bundles, key, models
):
    watcher.publish_bundle(bundles.v1, key)
    watcher.publish_bundle(bundles.v2, key)
    watcher.desire(key, bundles.v1, seq=1)
    watcher.wait_for(watcher.serving("1.0.0"))
    candidate = read_bundle(bundles.v2, TrustedKeys([key.public]))
    request = ShadowRequest(candidate.bundle_id, "digits", "2.0.0", 1.0, int(time.time()) + 3600)
    watcher.desire(key, bundles.v1, seq=2, shadow=request)
    watcher.wait_for(lambda _: "shadow_started" in kinds(watcher))
    shadow = device.agent.shadow
    assert shadow is not None and shadow.sample == 1.0
    xs = models.x_test[:64]
    served = []
    for start in range(0, len(xs), 16):
        served += [device.agent.predict(x)[0] for x in xs[start : start + 16]]
        assert shadow.wait_idle()
    device.agent.flush_telemetry()
    records = watcher.wait_for(lambda _: [r for r in watcher.records("telemetry") if r.get("shadow")])
    figures = records[-1]["shadow"]  # type: ignore[index]
    assert figures["compared"] == 64 and figures["dropped"] == 0
    assert figures["candidate"]["bundle_id"] == candidate.bundle_id
    assert figures["agreement"] >= 0.9
    # The serving model answered: its outputs are fp32 softmax values, not the int8 candidate's.
    assert device.agent.status().version == "1.0.0"
    assert all(out.dtype == np.float32 and np.isclose(out.sum(), 1.0, atol=1e-4) for out in served)
    # A desired state without a shadow section stops it.
    watcher.desire(key, bundles.v1, seq=3)
    watcher.wait_for(lambda _: "shadow_stopped" in kinds(watcher))
    assert device.agent.shadow is None
    assert not (device.agent.config.state_dir / "downloads" / f"shadow-{candidate.bundle_id}").exists()


def test_a_candidate_the_device_does_not_trust_is_refused_and_serving_goes_on(
    watcher, device, bundles, key, other_key
):
    watcher.publish_bundle(bundles.v1, key)
    watcher.publish_bundle(bundles.untrusted, other_key)  # signed by a key the device lacks
    watcher.desire(key, bundles.v1, seq=1)
    watcher.wait_for(watcher.serving("1.0.0"))
    candidate, _ = inspect_bundle(bundles.untrusted)
    request = ShadowRequest(candidate.bundle_id, "digits", "9.0.0", 0.5, int(time.time()) + 3600)
    watcher.desire(key, bundles.v1, seq=2, shadow=request)
    refused = watcher.wait_for(
        lambda _: [e for e in watcher.records("events") if e["kind"] == "shadow_refused"]
    )
    assert "pi-01 could not try digits@9.0.0" in refused[0]["message"]  # type: ignore[index]
    assert device.agent.shadow is None
    assert device.agent.status().version == "1.0.0"


def test_the_watchdog_counts_a_running_shadows_worker(device, bundles):
    device.agent.install(bundles.v1)
    shadow = device.agent.start_shadow(bundles.v2, sample=1.0)
    assert device.alive() and shadow.alive()
    # A worker that ended while its candidate is still loaded and marked running. The worker
    # cannot end so for real (whatever ends it fails the shadow with an event): faked by silencing
    # that failure and sending it the end-of-work sentinel, so the watchdog's check is seen to bite.
    shadow._fail = lambda message: None  # type: ignore[method-assign]
    shadow._queue.put(None)
    shadow._thread.join(10)
    assert shadow.state == "running" and not shadow.alive()
    assert not device.alive()  # no more watchdog pings: systemd restarts the agent
    del shadow._fail  # the real one again
    device.agent.stop_shadow()
    assert device.alive()
