"""Device CPU and wire bytes per desired-state update: TUF metadata (edgekit.roles) vs today's
single signature (edgekit.desired), in the same run.

    .venv/bin/python benchmarks/bench_trust.py [--updates 300] [--devices 0] [--json]

- Baseline: ``verify_desired_state`` of one signed envelope (one Ed25519 check, strict JSON).
- TUF, one update: the repository signs a new desired state (desired, snapshot, timestamp; not
  timed) and the device's ``DeviceTrust.refresh`` verifies it (root from the device, its local
  timestamp, snapshot and targets, the new timestamp, snapshot and desired: python-tuf's
  TrustedMetadataSet with Ed25519, root 2 of 3).
- TUF, nothing new: the same refresh when the broker holds nothing newer (what the agent runs
  every upload interval to notice a freeze).
- TUF, cold: a device that starts again (DeviceTrust from its state directory) and refreshes.
- Root catch-up: a device that was off through two root rotations walks the chain.

CPU is ``time.process_time`` per operation (median of 5 rounds of ``--updates``), on one core.
Bytes: what a device receives per update on the wire (the documents that changed), with
``--devices`` per-device desired states besides the fleet's (the desired role grows with them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from edgekit import SigningKey, TrustedKeys
from edgekit.desired import new_desired_state, sign_desired_state, verify_desired_state
from edgekit.roles import DeviceTrust
from trust_sim import Retained, TrustSim, digest


def cpu_per_call(fn: Callable[[], object], calls: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of process CPU seconds per call."""
    results = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        results.append((time.process_time() - start) / calls)
    return statistics.median(results)


def timed_updates(prepare: Callable[[], object], measure: Callable[[], object], calls: int) -> float:
    """Median per-call CPU of ``measure`` when each call needs an untimed ``prepare`` first."""
    samples = []
    for _ in range(calls):
        prepare()
        start = time.process_time()
        measure()
        samples.append(time.process_time() - start)
    return statistics.median(samples)


def run(updates: int, devices: int) -> dict[str, Any]:
    # Baseline: today's single-key envelope.
    key = SigningKey.generate()
    trusted = TrustedKeys([key.public])
    state = new_desired_state(
        "shop", bundle_sha256=digest("1.0.0"), bundle_name="model", bundle_version="1.0.0", seq=10
    )
    envelope = sign_desired_state(state, key)
    baseline = cpu_per_call(
        lambda: verify_desired_state(envelope, trusted, fleet="shop", last_seq=9), updates
    )

    # TUF: root 2 of 3, one targets key, one online key.
    sim = TrustSim("shop", n=3, k=2)
    sim.authorise("1.0.0", "1.1.0")
    extra = [sim.state("1.0.0", device=f"cam-{i}") for i in range(devices)]
    sim.repo.set_desired([sim.state("1.0.0"), *extra], [sim.online], now=sim.now)
    device = DeviceTrust("shop", "cam-0", sim.root1)
    device.refresh(Retained(sim.files()), now=sim.now)
    versions = iter(range(10**6))

    def publish() -> None:
        sim.repo.set_desired(
            [sim.state("1.1.0" if next(versions) % 2 else "1.0.0")], [sim.online], now=sim.now
        )
        source.files = sim.files()

    source = Retained(sim.files())
    update = timed_updates(publish, lambda: device.refresh(source, now=sim.now), updates)
    idle = cpu_per_call(lambda: device.refresh(source, now=sim.now), updates)
    cold = cpu_per_call(
        lambda: DeviceTrust("shop", "cam-0", device.root, device.local).refresh(source, now=sim.now),
        max(updates // 5, 20),
    )
    files = sim.files()
    per_update = {role: len(files[role]) for role in ("desired", "snapshot", "timestamp")}

    # Root catch-up: two rotations while off.
    late = DeviceTrust("shop", "cam-9", sim.root1)
    keys = sim.root_keys
    a, b = SigningKey.generate(), SigningKey.generate()
    sim.rotate_root(add=[a], remove=[keys[0]], signers=[keys[1], keys[2], a])
    sim.rotate_root(add=[b], remove=[keys[1]], signers=[keys[2], a, b])
    chain = Retained(sim.files())
    start = time.process_time()
    late.refresh(chain, now=sim.now)
    catch_up = time.process_time() - start
    assert late.root_version == 3

    return {
        "updates": updates,
        "per_device_states": devices,
        "cpu_ms": {
            "single_signature": round(baseline * 1000, 3),
            "tuf_update": round(update * 1000, 3),
            "tuf_nothing_new": round(idle * 1000, 4),
            "tuf_cold_start": round(cold * 1000, 3),
            "tuf_root_catch_up_2_rotations": round(catch_up * 1000, 3),
        },
        "ratio_tuf_update_vs_single": round(update / baseline, 1),
        "bytes_per_update": {
            "single_signature_envelope": len(envelope),
            "tuf": sum(per_update.values()),
            "tuf_by_role": per_update,
            "tuf_unchanged_roles": {r: len(files[r]) for r in ("root/1", "targets")},
        },
        "digest": hashlib.sha256(json.dumps(per_update, sort_keys=True).encode()).hexdigest()[:8],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=300, help="Updates per measurement.")
    parser.add_argument(
        "--devices", type=int, default=0, help="Per-device desired states besides the fleet's."
    )
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = parser.parse_args()
    result = run(args.updates, args.devices)
    result.pop("digest")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    cpu = result["cpu_ms"]
    size = result["bytes_per_update"]
    print(f"device CPU per desired-state update ({args.updates} updates, median of 5 rounds):")
    print(f"  single signature (today)       {cpu['single_signature']:8.3f} ms")
    print(
        f"  TUF update                     {cpu['tuf_update']:8.3f} ms  ({result['ratio_tuf_update_vs_single']}x)"
    )
    print(f"  TUF, nothing new               {cpu['tuf_nothing_new']:8.4f} ms")
    print(f"  TUF, cold start                {cpu['tuf_cold_start']:8.3f} ms")
    print(f"  TUF, root catch-up (2 roots)   {cpu['tuf_root_catch_up_2_rotations']:8.3f} ms")
    print(
        f"bytes per update: single {size['single_signature_envelope']}, TUF {size['tuf']} {size['tuf_by_role']}"
    )


if __name__ == "__main__":
    main()
