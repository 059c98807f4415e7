"""Gradient cache vs a plain step on CPU: step time at one batch, and peak memory as the batch grows.

Model: the `tiny` dual encoder (ViT 4×128, patch 8; text transformer 3×128) on 32×32 images and
16-token texts, CLIP loss, dropout as the demo (0; --dropout p: the RNG replay at work, and on CPU
drawing masks makes every forward, the cache's extra one included, dearer); one `forward_backward`
per step (no optimizer step).

  time    CPU time of a plain step, a cached step (chunk c) and one forward without a graph (the
          cache's one unavoidable extra), interleaved over the repeats, medians and the ratio
          cache / plain next to its floor (plain + forward) / plain. CPU time of this process, one
          torch thread: the machine is shared, and wall time swings with the others' load (two
          threads on two busy cores also spin in OpenMP barriers). The textbook floor 4/3 assumes a
          backward costs two forwards; on this small CPU model it costs less, so the floor is higher.
  memory  peak tensor memory of one step at effective batches 256 → 1024 → 4096, plain (up to
          --plain-max) and cached with chunk c, with the row-local and the tiled loss: everything
          the step holds at its peak (weights, gradients, the input batch, activations, the loss),
          counted by a dispatch mode over tensor storages — on a GPU, torch.cuda.max_memory_allocated.

    python benchmarks/gradcache.py [--batch 256] [--chunk 64] [--repeats 5] [--threads 1]
                                   [--dropout 0] [--memory-batches 256 1024 4096] [--plain-max 4096]
"""
from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.config import ModelConfig
from pipeline.gradcache import forward_backward
from pipeline.losses import get_loss
from pipeline.models import build_model

IMAGE_SIZE, CONTEXT, VOCAB = 32, 16, 1000
MIB = 2 ** 20


def setup(batch: int, tiled: bool = False, dropout: float = 0.0):
    """The model (train mode), one batch and the loss."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", dropout=dropout), image_size=IMAGE_SIZE, context_length=CONTEXT,
                        vocab_size=VOCAB).train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    texts = torch.randint(1, VOCAB, (batch, CONTEXT), generator=g)
    return model, images, texts, get_loss("clip", tiled=tiled)


def step(model, images, texts, loss, chunk: int) -> float:
    """One forward_backward; returns its CPU time in seconds."""
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    forward_backward(model, images, texts, loss, chunk_size=chunk)
    return time.process_time() - start


def forward(model, images, texts) -> float:
    """One forward of the batch without a graph (what pass 1 of the cache adds); CPU seconds."""
    start = time.process_time()
    with torch.no_grad():
        model(image=images, text=texts)
    return time.process_time() - start


# ------------------------------------------------------------------------------------- timing
def time_steps(batch: int, chunk: int, repeats: int, dropout: float) -> dict[str, list[float]]:
    model, images, texts, loss = setup(batch, dropout=dropout)
    runs = {"plain": lambda: step(model, images, texts, loss, 0),
            "cache": lambda: step(model, images, texts, loss, chunk),
            "forward": lambda: forward(model, images, texts)}
    for run in runs.values():
        run()                                                       # warm-up
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(repeats):
        for mode, run in runs.items():
            times[mode].append(run())
    return times


# ------------------------------------------------------------------------------------- memory
class TensorMemory(TorchDispatchMode):
    """Bytes of live tensor storages and their peak: on CPU, what torch.cuda.max_memory_allocated is
    on a GPU. Storages made by operators inside the mode count until freed, and so do the `held`
    tensors made before it (weights, the batch). (Cross-checked against the peak RSS of a fresh process with
    a fixed malloc mmap threshold: within 2 %; plain RSS adds the allocator's retained heap.)"""

    def __init__(self, held: list) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        for t in held:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def peak_memory(batch: int, chunk: int, tiled: bool, dropout: float) -> tuple[float, float]:
    """(peak bytes of one step: weights, gradients, batch, activations, loss; the batch's bytes)."""
    model, images, texts, loss = setup(batch, tiled, dropout)
    with TensorMemory(list(model.parameters()) + [images, texts]) as memory:
        step(model, images, texts, loss, chunk)
    return memory.peak, images.nbytes + texts.nbytes


# --------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256, help="batch of the timing comparison")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-batches", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--plain-max", type=int, default=4096, help="largest batch measured without the cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"tiny dual encoder, {IMAGE_SIZE}x{IMAGE_SIZE} images, {CONTEXT} tokens, clip loss, "
          f"dropout {args.dropout}, torch threads {args.threads}")
    times = time_steps(args.batch, args.chunk, args.repeats, args.dropout)
    plain, cache, fwd = (statistics.median(times[m]) for m in ("plain", "cache", "forward"))
    print(f"\nCPU time per step at batch {args.batch} (median of {args.repeats}, interleaved):")
    print(f"  plain                    {plain:7.3f} s")
    print(f"  cache (chunk {args.chunk:>3})        {cache:7.3f} s")
    print(f"  forward without a graph  {fwd:7.3f} s")
    print(f"  ratio cache / plain      {cache / plain:7.2f}   (target ≤ 1.4)")
    print(f"  floor (plain + forward) / plain {(plain + fwd) / plain:5.2f}   (textbook 1.33)")

    variants = {"plain": (0, False), f"cache {args.chunk}": (args.chunk, False),
                f"cache {args.chunk} + tiled loss": (args.chunk, True)}
    print(f"\npeak tensor memory of one step (MiB; weights + grads + batch + activations + loss):")
    print(f"  {'batch':>6} {'input batch':>12} " + " ".join(f"{v:>22}" for v in variants))
    peaks: dict[str, dict[int, float]] = {v: {} for v in variants}
    inputs: dict[int, float] = {}
    for batch in args.memory_batches:
        row = []
        for name, (chunk, tiled) in variants.items():
            if chunk == 0 and batch > args.plain_max:
                row.append(f"{'(skipped)':>22}")
                continue
            peak, batch_bytes = peak_memory(batch, chunk, tiled, args.dropout)
            peaks[name][batch], inputs[batch] = peak / MIB, batch_bytes / MIB
            row.append(f"{peak / MIB:22.0f}")
        print(f"  {batch:>6} {inputs[batch]:12.1f} " + " ".join(row))
    first, last = args.memory_batches[0], args.memory_batches[-1]
    print(f"\npeak at batch {last} / peak at batch {first}   (target with the cache ≤ 1.25); and the same "
          "without the input batch itself:")
    for name, p in peaks.items():
        if first in p and last in p:
            net = {b: p[b] - inputs[b] for b in (first, last)}
            print(f"  {name:<24} {p[last]:6.0f} / {p[first]:4.0f} MiB = {p[last] / p[first]:5.2f}   "
                  f"{net[last]:6.0f} / {net[first]:4.0f} MiB = {net[last] / net[first]:5.2f}")


if __name__ == "__main__":
    main()
