"""The per-sample table's cost per step against its size (isogclr's state, `pipeline/losses/sample_table.py`).

A table holding T ids (one process: it owns them all) takes one step's work: the lookup of a batch of B ids
and the write of their new rows, B ids all known (a later epoch) or all new (the first epoch). Reported: the
median over repeats, in milliseconds. Light (one process, seconds):

    python benchmarks/sample_table.py [--sizes 10000 100000 1000000] [--batch 1000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.losses.sample_table import SampleTable

COLUMNS = 4                                           # isogclr's row: τ, log u, m, side


def filled(size: int, seed: int) -> tuple[SampleTable, torch.Tensor]:
    """A table of `size` random 63-bit ids (the way sample ids are spread), written in steps of 100k."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-2 ** 62, 2 ** 62, (size,), generator=g)
    table = SampleTable([0.0] * COLUMNS)
    for start in range(0, size, 100_000):
        part = ids[start:start + 100_000]
        table.write(part, torch.rand(len(part), COLUMNS, generator=g, dtype=torch.float64))
    return table, ids


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(size: int, batch: int, repeats: int) -> dict[str, float]:
    table, ids = filled(size, seed=size)
    g = torch.Generator().manual_seed(1)
    rows = torch.rand(batch, COLUMNS, generator=g, dtype=torch.float64)
    known = ids[torch.randperm(size, generator=g)[:batch]]
    fresh = iter(torch.randint(-2 ** 62, 2 ** 62, (repeats, batch), generator=g))   # new ids each repeat
    return {"lookup": median_ms(lambda: table.lookup(known), repeats),
            "write_known": median_ms(lambda: table.write(known, rows), repeats),
            "write_new": median_ms(lambda: table.write(next(fresh), rows), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"| table ids | lookup of {args.batch} | write of {args.batch} known | write of {args.batch} new |")
    print("| --- | --- | --- | --- |")
    for size in args.sizes:
        r = measure(size, args.batch, args.repeats)
        print(f"| {size:,} | {r['lookup']:.2f} ms | {r['write_known']:.2f} ms | {r['write_new']:.2f} ms |")


if __name__ == "__main__":
    main()
