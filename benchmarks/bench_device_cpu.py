"""CPU time one device spends on a push, without MQTT and without other processes' noise.

    .venv/bin/python benchmarks/bench_device_cpu.py [--runs 7]

The device side of ``edgekit push --wait`` for the 30 MB bundle of bench_transfer.py (built
there first and cached in .cache/bench/): verify the manifest message, store every chunk with a
``ChunkAssembler`` (files layout, as the agent does), ``finish_staged``, then
``BundleStore.install`` (fsync, rename, load the model, health check), in a state directory
under /dev/shm. Prints the median process CPU time (user + system) of the download and of the
install. CPU time, unlike wall time, barely moves with the load of a shared machine, so two
versions of the code can be compared run against run.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    from edgekit import TrustedKeys, read_bundle
    from edgekit.agent.install import BundleStore
    from edgekit.topics import Topics
    from edgekit.transfer import ChunkAssembler, bundle_messages, manifest_message, verify_manifest_message

    if not (CACHE / "dense-30mb.ekb").exists():
        raise SystemExit("no cached bundle: run benchmarks/bench_transfer.py once first")
    trusted = TrustedKeys.from_pem((CACHE / "home" / "keys" / "default.pub.pem").read_bytes())
    bundle = read_bundle(CACHE / "dense-30mb.ekb", trusted)
    chunks = [data for topic, data in bundle_messages(bundle, Topics()) if "/chunks/" in topic]
    message = manifest_message(bundle)
    download, install = [], []
    for _ in range(args.runs):
        root = Path(tempfile.mkdtemp(prefix="edgekit-cpu-", dir="/dev/shm"))
        try:
            store = BundleStore(root, trusted, threads=1, max_bundle_size=1 << 30)
            start = cpu()
            verified = verify_manifest_message(message, trusted, bundle.bundle_id)
            assembler = ChunkAssembler(root / "downloads" / bundle.bundle_id, verified, ChunkAssembler.FILES)
            for index, data in enumerate(chunks):
                assembler.add(index, data)
            staged = assembler.finish_staged()
            fetched = cpu()
            store.install(staged, allow_downgrade=True)
            download.append(fetched - start)
            install.append(cpu() - fetched)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    total = [a + b for a, b in zip(download, install)]
    print(
        f"{bundle.manifest.chunks.total_size / 1e6:.1f} MB, {len(chunks)} chunks, median of {args.runs}: "
        f"download {statistics.median(download) * 1e3:.0f} ms CPU, install {statistics.median(install) * 1e3:.0f} ms "
        f"CPU, total {statistics.median(total) * 1e3:.0f} ms CPU"
    )


if __name__ == "__main__":
    main()
