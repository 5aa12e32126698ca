#!/usr/bin/env python3
"""Long fuzzing run over every parser: random mutations of the real-tool seed corpus.

Usage: scripts/fuzz-long.py [--inputs N] [--seed S] [--only NAME-SUBSTRING] [--no-memory]
Each input is opened, read and mapped by tests/fuzz_harness.exercise (only ImageFormatError
subclasses may escape; bounded time; bounded allocation; no read outside the backing).
Prints per-seed counts of outcomes and every *distinct* failure (by its last frames), then
exits 1 if there was any failure.  CI runs the small hypothesis version (tests/test_fuzz_formats.py).
"""

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fuzz_harness as H  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=2000, help="mutated inputs per seed image (default 2000)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--only", default="")
    ap.add_argument("--no-memory", action="store_true", help="skip tracemalloc (faster)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"random seed {seed}")
    failures = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = H.build_corpus(Path(tmp))
    total = 0
    for s in corpus:
        if args.only not in s.name:
            continue
        rng = random.Random(f"{seed}-{s.name}")
        outcomes = collections.Counter()
        t0 = time.monotonic()
        slowest = 0.0
        for i in range(args.inputs):
            muts = H.random_mutations(rng)
            data = H.apply(s.data, s, muts)
            t1 = time.monotonic()
            try:
                outcomes[H.exercise(s, bytes(data), memory=not args.no_memory)] += 1
            except H.FuzzFailure as e:
                text = str(e)
                key = (s.name, text.splitlines()[0][:120], "\n".join(text.splitlines()[-4:]))
                outcomes["FAILURE"] += 1
                if key not in failures:
                    failures[key] = (muts, text)
            slowest = max(slowest, time.monotonic() - t1)
        total += args.inputs
        dt = time.monotonic() - t0
        print(f"{s.name:24} {args.inputs} inputs in {dt:.1f}s (slowest {slowest:.2f}s): "
              + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()), flush=True)
    print(f"{total} inputs, {len(failures)} distinct failures")
    for (name, head, _), (muts, text) in failures.items():
        print("=" * 100)
        print(name, muts)
        print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
