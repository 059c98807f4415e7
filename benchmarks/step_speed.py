"""Step time of the speed features on CPU: patch dropout at p = 0.5 and 0.75, `train.compile`, and a CoCa decoder.

Each variant is its own copy of the dual encoder (same seed, same batch) trained with the gradient
cache and AdamW, as a training step does: `forward_backward` with chunks, then the optimizer step.

  p=0 / p=0.5 / p=0.75  `model.image.patch_dropout`: the image tower sees 1 + int(L (1 − p)) tokens
  compile               `train.compile`: both towers through torch.compile (inductor, C++ on CPU)
  no-decoder            a CoCa model (`--model coca_tiny`) without its caption term: the towers' contrastive
                        step alone (every other variant of a CoCa model adds 2 × the caption loss: the decoder)

Step time is this process's CPU time with one torch thread (the machine is shared: wall time swings
with the others' load), interleaved over the repeats after one warm-up step each (the compiled
variant compiles there: its wall time is printed apart); medians, and ratios to p=0 uncompiled.

    python benchmarks/step_speed.py [--model small] [--image-size 128] [--batch 32] [--chunk 16] [--repeats 3]
    python benchmarks/step_speed.py --model coca_tiny --image-size 64 --batch 64 --chunk 32 --context 32 \
        --variants p=0 no-decoder
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config import ModelConfig, TowerConfig
from pipeline.gradcache import forward_backward
from pipeline.losses import get_loss
from pipeline.losses.caption import CaptionLoss
from pipeline.models import build_model

VOCAB = 1000
# name: (patch dropout, compiled, caption term for a CoCa model)
VARIANTS = {"p=0": (0.0, False, True), "p=0.5": (0.5, False, True), "p=0.75": (0.75, False, True),
            "compile": (0.0, True, True), "no-decoder": (0.0, False, False)}


def make(args, patch_dropout: float, compile_towers: bool, decoder: bool):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model, image=TowerConfig(patch_dropout=patch_dropout)),
                        image_size=args.image_size, context_length=args.context, vocab_size=VOCAB).train()
    if compile_towers:
        model.compile_towers()
    caption = CaptionLoss(2.0) if decoder and getattr(model, "has_decoder", False) else None
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), caption


def step(model, opt, caption, images, texts, chunk: int) -> float:
    """One gradient-cache step (with `caption`'s term) and AdamW step; this process's CPU seconds."""
    start = time.process_time()
    forward_backward(model, images, texts, get_loss("clip"), chunk_size=chunk, caption=caption)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--context", type=int, default=16, help="tokens per caption")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    texts = torch.randint(1, VOCAB, (args.batch, args.context), generator=g)
    runs = {name: make(args, *VARIANTS[name]) for name in args.variants}
    warm = {}
    for name, run in runs.items():
        start = time.perf_counter()
        step(*run, images, texts, args.chunk)
        warm[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(step(*run, images, texts, args.chunk))
    patches = (args.image_size // runs[args.variants[0]][0].image_tower.patch_embed.kernel_size[0]) ** 2
    print(f"{args.model} at {args.image_size} px ({patches} patches), {args.context} tokens, batch {args.batch}, "
          f"chunk {args.chunk}, CLIP loss, AdamW, 1 thread; CPU s per step, median of {args.repeats}")
    base = statistics.median(times["p=0"]) if "p=0" in times else None
    for name, values in times.items():
        med = statistics.median(values)
        ratio = f"  {med / base:5.2f}× p=0" if base else ""
        print(f"  {name:8s} {med:7.2f} s{ratio}   (first step, wall: {warm[name]:6.1f} s)")


if __name__ == "__main__":
    main()
