"""CLIP loss + backward at a large batch on CPU: peak extra memory and time of three forms.

  dense     open_clip's global-logits form: logits = s·U·Vᵀ (N × N), cross-entropy over rows and columns
  row-local pipeline.losses clip, untiled: this rank's rows × all columns (N_local × N; at one rank N × N)
  tiled     pipeline.losses clip, tiled: column tiles with a running LSE, recomputed in backward (N_local × tile)

Each measurement runs in a fresh subprocess: peak extra memory = the process's peak RSS
(getrusage ru_maxrss) minus its RSS just before the loss, so the allocator's and earlier variants'
memory do not leak into it. Variants are interleaved over the repeats and medians reported (the
machine may be shared). Finally the largest global batch the tiled form fits in 16 GiB is
extrapolated from a linear fit of its measured peaks at N/2 and N (the dense form's from N²).

    python benchmarks/loss_memory.py [--batch 16384] [--dim 512] [--tile 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("dense", "row-local", "tiled")
BUDGET = 16 * 2**30


def child(variant: str, batch: int, dim: int, tile: int) -> dict:
    """One loss + backward; returns peak extra bytes, wall and CPU seconds, and the loss value."""
    import torch
    import torch.nn.functional as F

    from pipeline.losses import get_loss

    def dense(u, v, logit_scale):
        logits = logit_scale * u @ v.T
        target = torch.arange(len(u))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    fn = {"dense": dense, "row-local": get_loss("clip"), "tiled": get_loss("clip", tiled=True, tile_size=tile)}[variant]
    scale = torch.tensor(1 / 0.07)
    g = torch.Generator().manual_seed(0)
    small = F.normalize(torch.randn(256, dim, generator=g), dim=1).requires_grad_()
    fn(small, small, logit_scale=scale).backward()                                  # warm-up
    u = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    v = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    before = _rss_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = fn(u, v, logit_scale=scale)
    loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024                 # KiB on Linux
    return dict(peak_extra=peak - before, seconds=seconds, cpu_seconds=cpu_seconds, loss=loss.item())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, batch: int, dim: int, tile: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--batch", str(batch), "--dim", str(dim), "--tile", str(tile)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.dim, args.tile)))
        return

    n, d = args.batch, args.dim
    print(f"CLIP loss + backward, global batch {n}, D = {d}, fp32, one process, "
          f"{os.cpu_count()} CPU threads, tile {args.tile}; {args.repeats} interleaved repeats, medians")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            r = measure(variant, n, d, args.tile)
            runs[variant].append(r)
            print(f"  repeat {repeat + 1} {variant:<10} peak extra {gib(r['peak_extra'])}, wall {r['seconds']:.2f}s, "
                  f"CPU {r['cpu_seconds']:.2f}s", flush=True)
    peak = {v: statistics.median(r["peak_extra"] for r in runs[v]) for v in VARIANTS}
    secs = {v: statistics.median(r["seconds"] for r in runs[v]) for v in VARIANTS}
    cpu = {v: statistics.median(r["cpu_seconds"] for r in runs[v]) for v in VARIANTS}
    losses = {v: runs[v][0]["loss"] for v in VARIANTS}

    print(f"\n{'form':<10} {'peak extra':>12} {'wall time':>10} {'CPU time':>10}   loss value")
    for v in VARIANTS:
        print(f"{v:<10} {gib(peak[v]):>12} {secs[v]:>9.2f}s {cpu[v]:>9.2f}s   {losses[v]:.6f}")
    print("(CPU time = user + system seconds of the process: steadier than wall time on a shared machine)")
    for a, b, note in (("tiled", "dense", "targets: memory <= 0.100, time <= 1.30x"),
                       ("row-local", "dense", "at W ranks the row-local block is 1/W of this"),
                       ("tiled", "row-local", "")):
        print(f"{a + ' / ' + b:<19} memory {peak[a] / peak[b]:.3f}   wall {secs[a] / secs[b]:.2f}x   "
              f"CPU {cpu[a] / cpu[b]:.2f}x   {note}")

    half = statistics.median(measure("tiled", n // 2, d, args.tile)["peak_extra"] for _ in range(args.repeats))
    slope = (peak["tiled"] - half) / (n - n // 2)
    per_row = slope + 2 * d * 4                        # + the embeddings themselves, fp32
    intercept = peak["tiled"] - slope * n
    largest_tiled = int((BUDGET - intercept) / per_row)
    largest_dense = int(n * (BUDGET / (peak["dense"] + 2 * n * d * 4)) ** 0.5)
    print("\nlargest global batch in 16 GiB (one process, embeddings + loss + backward), EXTRAPOLATED:")
    print(f"  tiled: peak extra {gib(half)} at N={n // 2}, {gib(peak['tiled'])} at N={n}: "
          f"{slope / 1024:.1f} KiB per row + {d * 8} B of embeddings per row -> N ~ {largest_tiled:,}")
    print(f"  dense (grows as N^2): N ~ {largest_dense:,}   ratio {largest_tiled / largest_dense:.1f}x")
    print("  (time grows as N^2 for every form: the tiled form trades memory only, not compute)")


if __name__ == "__main__":
    main()
