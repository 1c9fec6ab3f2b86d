"""How much does verifying a bundle cost over just hashing its bytes?

`read_bundle` parses the tar, checks the signature and hashes every member against the
signed manifest. The baseline, measured in the same run on the same bytes,
is one SHA-256 over the whole file: the least any integrity check must do. Also times
`create_bundle` (which runs the model for the health check).

    .venv/bin/python benchmarks/bench_bundle.py [--size-mb 30] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=30.0, help="padding added to the model (MB)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from conftest import convert_to_tflite, load_digits_images, train_digits_cnn
    from edgekit import SigningKey, TrustedKeys, create_bundle, read_bundle

    x, y = load_digits_images()
    model_bytes = convert_to_tflite(train_digits_cnn(x, y, epochs=1))
    key = SigningKey.generate()
    trusted = TrustedKeys([key.public])
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.tflite"
        small.write_bytes(model_bytes)
        out = Path(tmp) / "small.ekb"
        create_s = best_of(
            args.repeat, lambda: create_bundle(small, name="b", version="1.0.0", key=key, output=out)
        )
        # A large model: the digits model followed by padding, as a file of the given size.
        # (TFLite ignores bytes after the flatbuffer; the reader only needs the header.)
        big = Path(tmp) / "big.tflite"
        big.write_bytes(model_bytes + np.random.default_rng(0).bytes(int(args.size_mb * 1e6)))
        big_ekb = Path(tmp) / "big.ekb"
        create_bundle(big, name="b", version="1.0.0", key=key, output=big_ekb)
        data = big_ekb.read_bytes()
        hash_s = best_of(args.repeat, lambda: hashlib.sha256(data).digest())
        read_s = best_of(args.repeat, lambda: read_bundle(data, trusted))
    mb = len(data) / 1e6
    print(f"bundle size: {mb:.1f} MB")
    print(f"baseline sha256 of the file:  {hash_s * 1e3:8.1f} ms  ({mb / hash_s:7.0f} MB/s)")
    print(f"read_bundle (full verify):    {read_s * 1e3:8.1f} ms  ({mb / read_s:7.0f} MB/s)")
    print(f"ratio read_bundle / sha256:   {read_s / hash_s:8.2f}x")
    print(
        f"create_bundle, digits model:  {create_s * 1e3:8.1f} ms (includes loading the runtime and the health check)"
    )


if __name__ == "__main__":
    main()
