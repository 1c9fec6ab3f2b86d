"""`make fuzz`: the targets of tests/fuzz_targets.py under atheris (libFuzzer, coverage-guided)
for a set time, seeded with real messages; under hypothesis for the same time where atheris
does not install.

    python tests/fuzz_run.py --seconds 600 --model digits_fp32.tflite --data digits_test.npz \
        --out .cache/fuzz [TARGET ...]

The time is split evenly over the targets; each runs in its own process. A crash or a broken
promise leaves its input in OUT/crashes/ and makes the command fail. The corpus libFuzzer grows
is kept in OUT/corpus/TARGET, so the next run starts where this one stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _context(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from fuzz_targets import Context

    work = Path(tempfile.mkdtemp(prefix="edgekit-fuzz-"))
    return Context.create(Path(args.model), Path(args.data) if args.data else None, work)


def run_one_atheris(args: argparse.Namespace) -> None:
    import atheris

    with atheris.instrument_imports(include=["edgekit"]):
        import fuzz_targets

    ctx = _context(args)
    target = fuzz_targets.TARGETS[args.one]

    def test_one_input(data: bytes) -> None:
        target(ctx, data)

    out = Path(args.out)
    corpus = out / "corpus" / args.one
    crashes = out / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={max(1, int(args.seconds))}",
        "-rss_limit_mb=3072",
        "-max_len=65536",
        f"-artifact_prefix={crashes}/{args.one}-",
        "-print_final_stats=1",
    ]
    dictionary = out / "dict" / f"{args.one}.dict"
    if dictionary.exists():
        argv.append(f"-dict={dictionary}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def run_one_hypothesis(args: argparse.Namespace) -> None:
    """The same target for the same time, driven by hypothesis (random and mutated inputs)."""
    import fuzz_targets
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ctx = _context(args)
    target = fuzz_targets.TARGETS[args.one]
    seeds = fuzz_targets.seeds(ctx)[args.one]

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=4096) | st.sampled_from(seeds).flatmap(_mutations))
    def check(data: bytes) -> None:
        target(ctx, data)

    deadline = time.monotonic() + args.seconds
    runs = 0
    while time.monotonic() < deadline:
        check()
        runs += 500
    print(f"{args.one}: {runs} inputs under hypothesis, no failure", flush=True)


def _mutations(seed: bytes):  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st

    def mutate(edits: list[tuple[int, int]]) -> bytes:
        raw = bytearray(seed)
        for at, value in edits:
            if raw:
                raw[at % len(raw)] = value
        return bytes(raw)

    return st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8).map(mutate)


def _write_dictionary(path: Path, seeds: list[bytes]) -> None:
    """libFuzzer tokens for the JSON targets: punctuation, literals, and every key and short
    string value of the seed documents, so mutations keep (and break) their structure."""
    import json

    tokens = {"{", "}", "[", "]", ":", ",", '""', "null", "true", "false", "-1", "0", "1e999", "NaN"}

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                tokens.add(json.dumps(key))
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)
        elif isinstance(value, str) and len(value) <= 64:
            tokens.add(json.dumps(value))

    for seed in seeds:
        try:
            walk(json.loads(seed))
        except ValueError:
            return  # not a JSON target: no dictionary
    path.parent.mkdir(parents=True, exist_ok=True)
    escape = {ord("\\"): "\\\\", ord('"'): '\\"'}
    path.write_text("".join(f'"{token.translate(escape)}"\n' for token in sorted(tokens)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--seconds", type=float, default=600.0, help="total time, split over the targets")
    parser.add_argument("--model", required=True, help="a .tflite model for the seed bundle")
    parser.add_argument("--data", help="a DATA file for the seed bundle's drift baseline")
    parser.add_argument("--out", default=".cache/fuzz", help="corpus and crash directory")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one target in this process
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
            print("atheris is not installed here: running the hypothesis engine instead", flush=True)
    if args.one:
        (run_one_atheris if engine == "atheris" else run_one_hypothesis)(args)
        return 0
    import fuzz_targets

    names = args.targets or sorted(fuzz_targets.TARGETS)
    unknown = sorted(set(names) - set(fuzz_targets.TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {sorted(fuzz_targets.TARGETS)}")
    per = args.seconds / len(names)
    out = Path(args.out)
    seeds = fuzz_targets.seeds(_context(args))
    failed = []
    for name in names:
        corpus = out / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(seeds[name]):
            (corpus / f"seed-{i}").write_bytes(data)
        _write_dictionary(out / "dict" / f"{name}.dict", seeds[name])
        print(f"== {name}: {per:.0f} s with {engine}", flush=True)
        command = [sys.executable, __file__, "--one", name, "--seconds", str(per), "--engine", engine]
        command += ["--model", args.model, "--out", str(out)] + (["--data", args.data] if args.data else [])
        result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(HERE)}, check=False)
        if result.returncode != 0:
            failed.append(name)
    print(f"fuzzed {len(names)} targets for {args.seconds:.0f} s with {engine}: ", end="")
    print(f"FAILED {failed}; inputs in {out / 'crashes'}" if failed else "no failure")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
