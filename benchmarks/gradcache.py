"""Gradient cache vs a plain step on CPU: step time at one batch, and peak memory as the batch grows.

Model (--model, --image-size): by default `small` (open_clip's ViT-S-16 shape: ViT 12×384, patch
16; text transformer 12×384) on 64×64 images and 16-token texts, CLIP loss, dropout as the demo (0;
--dropout p: the RNG replay at work); one `forward_backward` per step (no optimizer step). At chunk
64 this model holds about 0.6 GiB of activations per chunk, three times the fp32 input batch at
4096 rows (0.19 GiB): the regime of real CLIP training, where one chunk's activations outweigh the
whole batch's pixels. (`tiny` at 32×32 holds 59 MiB per chunk, less than its batch grows from 256
to 4096 rows; a ViT's activations per image over its pixels do not depend on the image size, so
`tiny` at 96 or 128 px is no closer.)

  time    CPU time of a plain step, a cached step (chunk c) and one forward without a graph (the
          cache's one unavoidable extra), interleaved over the repeats, medians and the ratio
          cache / plain next to its floor (plain + forward) / plain. CPU time of this process, one
          torch thread: the machine is shared, and wall time swings with the others' load.
  memory  peak tensor memory of one step at effective batches 256 → 1024 → 4096, plain and cached
          with chunk c (the tiled loss, and the row-local one): every live tensor storage at the
          step's peak (weights, gradients, the input batch, activations, the cached embeddings and
          their gradients, the loss), counted by a dispatch mode over storages — on a GPU,
          torch.cuda.max_memory_allocated. Printed in total and without the input batch (images +
          token ids), which grows with the batch whatever the step does.
          A cached step of `small` at 4096 rows costs about 6 CPU-minutes, so the steps run on fake
          tensors (torch's FakeTensorMode: the same shapes, dtypes, device, kernels and tensor
          lifetimes, no arithmetic) fed the real input batch; at the first batch the cached step
          with the tiled loss also runs on real tensors, and both peaks are printed.

The defaults take about 4.5 CPU-minutes (7 wall minutes on the shared two-core machine).

    python benchmarks/gradcache.py [--model small] [--image-size 64] [--batch 256] [--chunk 64]
                                   [--repeats 3] [--threads 1] [--dropout 0]
                                   [--memory-batches 256 1024 4096] [--plain-max 4096]
"""
from __future__ import annotations

import argparse
import statistics
import time
import weakref
from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.config import ModelConfig
from pipeline.gradcache import forward_backward
from pipeline.losses import get_loss
from pipeline.models import MODEL_NAMES, build_model

CONTEXT, VOCAB = 16, 1000
MIB = 2 ** 20


def make_batch(batch: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, image_size, image_size, generator=g),
            torch.randint(1, VOCAB, (batch, CONTEXT), generator=g))


def make_model(name: str, image_size: int, dropout: float) -> torch.nn.Module:
    """The dual encoder in train mode (fake parameters when built inside a FakeTensorMode)."""
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, dropout=dropout), image_size=image_size, context_length=CONTEXT,
                       vocab_size=VOCAB).train()


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
def time_steps(args) -> dict[str, list[float]]:
    model = make_model(args.model, args.image_size, args.dropout)
    images, texts = make_batch(args.batch, args.image_size)
    loss = get_loss("clip")
    runs = {"plain": lambda: step(model, images, texts, loss, 0),
            "cache": lambda: step(model, images, texts, loss, args.chunk),
            "forward": lambda: forward(model, images, texts)}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(args.repeats):
        for mode, run in runs.items():
            times[mode].append(run())
    return times


# ------------------------------------------------------------------------------------- memory
class TensorMemory(TorchDispatchMode):
    """Bytes of live tensor storages and their peak: on CPU, what torch.cuda.max_memory_allocated is
    on a GPU. Storages made by operators inside the mode count until freed, and so do the `held`
    tensors made before it (weights, the batch). Fake tensors count the bytes they stand for.

    Inside a FakeTensorMode, an operator whose tensors are all real (slicing the input batch, the
    model's token-id range check) runs on the real data; everything touching a parameter is fake."""

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
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        real = tensors and not any(isinstance(t, FakeTensor) for t in tensors)
        with unset_fake_temporarily() if real else nullcontext():
            out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def peak_memory(args, batch: int, chunk: int, tiled_loss: bool, fake: bool) -> tuple[int, int]:
    """(peak bytes of one step: weights, gradients, batch, activations, loss; the input batch's bytes)."""
    images, texts = make_batch(batch, args.image_size)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
        model = make_model(args.model, args.image_size, args.dropout)
        with TensorMemory(list(model.parameters()) + [images, texts]) as memory:
            step(model, images, texts, get_loss("clip", tiled=tiled_loss), chunk)
    return memory.peak, images.nbytes + texts.nbytes


# --------------------------------------------------------------------------------------- main
def report_time(args) -> None:
    times = time_steps(args)
    plain, cache, fwd = (statistics.median(times[m]) for m in ("plain", "cache", "forward"))
    print(f"\nCPU time per step at batch {args.batch} (median of {args.repeats}, interleaved):")
    print(f"  plain                    {plain:7.2f} s")
    print(f"  cache (chunk {args.chunk:>3})        {cache:7.2f} s")
    print(f"  forward without a graph  {fwd:7.2f} s")
    print(f"  ratio cache / plain      {cache / plain:7.2f}   (target ≤ 1.4)")
    print(f"  floor (plain + forward) / plain {(plain + fwd) / plain:5.2f}   (textbook 1.33)")


def report_memory(args) -> None:
    tiled = f"cache {args.chunk} + tiled loss"
    variants = {"plain": (0, False), tiled: (args.chunk, True),
                f"cache {args.chunk}, row-local loss": (args.chunk, False)}
    print("\npeak tensor memory of one step, MiB. total: every live tensor storage at the step's peak (weights, "
          "gradients,\ninput batch, activations, cached embeddings and gradients, loss); net: total minus the "
          "input batch\n(images + token ids). Fake tensors fed the real batch (see the check below).")
    print(f"  {'batch':>6} {'input':>7}" + "".join(f" | {v:^28}" for v in variants))
    print(f"  {'':>14}" + f" | {'total':>13} {'net':>14}" * len(variants))
    peaks: dict[str, dict[int, tuple[int, int]]] = {v: {} for v in variants}      # (peak, input) bytes
    for batch in args.memory_batches:
        row = []
        for name, (chunk, tiled_loss) in variants.items():
            if chunk == 0 and batch > args.plain_max:
                row.append(f" | {'(skipped)':^28}")
                continue
            peak, inputs = peaks[name][batch] = peak_memory(args, batch, chunk, tiled_loss, fake=True)
            row.append(f" | {peak / MIB:13.1f} {(peak - inputs) / MIB:14.1f}")
        print(f"  {batch:>6} {inputs / MIB:7.1f}" + "".join(row), flush=True)

    first, last = args.memory_batches[0], args.memory_batches[-1]
    real, _ = peak_memory(args, first, args.chunk, tiled_loss=True, fake=False)
    print(f"\ncheck at batch {first}, {tiled}: peak {real:,} bytes on real tensors, "
          f"{peaks[tiled][first][0]:,} on fake ones")
    print(f"\npeak at batch {last} / peak at batch {first}   (target with the cache ≤ 1.25):")
    for name, p in peaks.items():
        if first in p and last in p:
            (a, a_in), (b, b_in) = p[first], p[last]
            print(f"  {name:<28} total {b / MIB:8.1f} / {a / MIB:7.1f} = {b / a:5.2f}   "
                  f"net {(b - b_in) / MIB:8.1f} / {(a - a_in) / MIB:7.1f} = {(b - b_in) / (a - a_in):5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=MODEL_NAMES, help="named dual encoder")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256, help="batch of the timing comparison")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-batches", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--plain-max", type=int, default=4096, help="largest batch measured without the cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.model} dual encoder, {args.image_size}x{args.image_size} images, {CONTEXT} tokens, clip loss, "
          f"dropout {args.dropout}, torch threads {args.threads}")
    report_time(args)
    report_memory(args)


if __name__ == "__main__":
    main()
