"""Data throughput: this reader vs an open_clip-style webdataset pipeline, on the same 512x512 JPEG shards.

Both sides read the same tars, take a random resized crop to 224x224, normalise and tokenise, in
batches of 32. The baseline is the pipeline open_clip builds: `wds.WebDataset(urls).shuffle(...)
.decode("pil")` (a full-size PIL decode), a PIL crop + resize and normalise (no torchvision),
batched, in a torch DataLoader with k worker processes (`split_by_worker`). Ours decodes JPEGs at
reduced size (draft mode) when the output is much smaller, with `num_workers=k`. Measured at
k = 0, 1, 2 loader processes, plus this reader on a three-source mixture (weights 0.6/0.3/0.1 over
the same shards) against one source, and the synthetic generator at 64x64. Medians of --repeats runs;
the timing starts at the first batch (process start-up excluded).

With --train, the same data trains the `tiny` model at 224 px in a real job (`contrast train`: one
Ray worker, DeepSpeed) with data.num_workers = k for each k, and the table gives the training
samples/s and the fraction of the step time spent waiting for data (TensorBoard's perf/ scalars,
medians over the logged windows after the first).

    python benchmarks/data_throughput.py [--samples 768] [--repeats 3] [--loaders 0 1 2] [--train]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from typing import Callable, Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import SourceConfig, load_config
from pipeline.data import StreamOptions, load_tokenizer, open_stream, synthesize, transforms
from pipeline.data.synth import train_sample
from pipeline.eval.report import read_scalars
from pipeline.orchestrate import train

OUT, BATCH, SHARD = 224, 32, 128
WINDOW = 64                                # shuffle buffer of both sides


def rate(batches: Iterator, n_batches: int) -> float:
    """Samples per second over n_batches after the first one."""
    next(batches)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    return n_batches * BATCH / (time.perf_counter() - start)


def ours(shards: list[str], tokenizer: str, loaders: int, n_batches: int) -> float:
    stream = open_stream(shards, global_batch=BATCH, seed=0, num_workers=loaders,
                         options=StreamOptions(image_size=OUT, streams=max(2, loaders), shuffle_buffer=WINDOW,
                                               tokenizer=tokenizer))
    try:
        return rate(iter(stream), n_batches)
    finally:
        stream.close()


def ours_mixture(shards: list[str], tokenizer: str, loaders: int, n_batches: int) -> float:
    """Three sources of one shard each, weights 0.6/0.3/0.1 (the same bytes as `ours` reads)."""
    sources = [SourceConfig(f"s{i}", [url], w) for i, (url, w) in enumerate(zip(shards, (0.6, 0.3, 0.1)))]
    return ours(sources, tokenizer, loaders, n_batches)


class _Transform:
    """open_clip's image side without torchvision: random resized crop + resize from the full decode."""

    def __init__(self, tokenizer_url: str):
        self.tokenizer_url = tokenizer_url
        self.rng = random.Random(0)
        self.tokenizer = None

    def __call__(self, sample: tuple[Image.Image, str]) -> tuple[np.ndarray, str]:
        img, caption = sample
        box = transforms.random_resized_box(*img.size, self.rng)
        return np.asarray(img.convert("RGB").resize((OUT, OUT), Image.BICUBIC, box=box)), caption

    def collate(self, rows: list[tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:                 # built in the process that uses it
            self.tokenizer = load_tokenizer(self.tokenizer_url, 77)
        return {"image": transforms.to_tensor([r[0] for r in rows]), "text": self.tokenizer([r[1] for r in rows])}


def baseline(shards: list[str], tokenizer: str, loaders: int, n_batches: int) -> float:
    """webdataset + full-size PIL decode, crop and resize, normalise, tokenise; batched in the workers."""
    t = _Transform(tokenizer)
    dataset = (wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=None,
                              workersplitter=wds.split_by_worker)
               .shuffle(WINDOW).decode("pil").to_tuple("jpg", "txt").map(t)
               .batched(BATCH, collation_fn=t.collate, partial=False).repeat())
    if loaders == 0:
        return rate(iter(dataset), n_batches)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=loaders, prefetch_factor=2)
    return rate(iter(loader), n_batches)


def synth_rate(n: int = 3000) -> float:
    start = time.perf_counter()
    for i in range(n):
        train_sample(0, i, 64)
    return n / (time.perf_counter() - start)


def median(fn: Callable[..., float], repeats: int, *args) -> float:
    return statistics.median(fn(*args) for _ in range(repeats))


def train_rates(train_dir: str, run_dir: str, loaders: int, steps: int) -> tuple[float, float]:
    """(samples/s, data-wait fraction) of a 1-worker `tiny` run at 224 px with `loaders` loader processes."""
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"data.train_urls=[{train_dir}]", f"data.image_size={OUT}", "data.context_length=32",
        f"data.shuffle_buffer={WINDOW}", f"data.num_workers={loaders}", "data.streams=2", "model.name=tiny",
        f"train.global_batch={BATCH}", f"train.steps={steps}", "train.log_every=4", "train.precision=fp32",
        "cluster.num_workers=1", f"checkpoint.every_steps={steps}", "eval.schedule='off'", "logging.progress=false"])
    train(cfg)
    series = read_scalars(run_dir)
    later = lambda tag: [v for _, v in series[tag][1:]]        # noqa: E731  (the first window warms up)
    return statistics.median(later("perf/samples_per_s")), statistics.median(later("perf/data_wait_fraction"))


def train_table(train_dir: str, loaders: list[int], steps: int) -> None:
    print(f"training: tiny model, {OUT}x{OUT} from 512x512 JPEGs, global batch {BATCH}, 1 Ray worker, {steps} steps")
    print(f"{'data.num_workers':>16}  {'samples/s':>9}  {'data wait':>9}")
    for k in loaders:
        with tempfile.TemporaryDirectory() as run_dir:
            speed, wait = train_rates(train_dir, run_dir, k, steps)
        print(f"{k:>16}  {speed:>9.1f}  {wait:>9.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=768, help="samples timed per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loaders", type=int, nargs="+", default=[0, 1, 2], help="loader process counts")
    p.add_argument("--train", action="store_true", help="also time training with each loader process count")
    p.add_argument("--train-steps", type=int, default=24)
    args = p.parse_args()
    n_batches = args.samples // BATCH
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, 3 * SHARD, eval_samples=1, image_size=512, shard_size=SHARD, progress=False)
        train_dir = os.path.join(tmp, "train")
        shards = sorted(os.path.join(train_dir, f) for f in os.listdir(train_dir) if f.endswith(".tar"))
        tokenizer = os.path.join(train_dir, "tokenizer.json")
        ours(shards, tokenizer, 0, 2)              # warm the page cache and imports
        print(f"{len(shards)} shards of {SHARD} JPEGs of 512x512 -> {OUT}x{OUT} random resized crop, normalise, "
              f"tokenise; batches of {BATCH}; {n_batches} batches timed; median of {args.repeats}")
        print(f"{'loader processes':>16}  {'webdataset (open_clip kind)':>27}  {'this reader':>11}  {'ratio':>6}  "
              f"{'mixture of 3':>12}  {'mixture / one source':>20}")
        for k in args.loaders:
            base = median(baseline, args.repeats, shards, tokenizer, k, n_batches)
            one = median(ours, args.repeats, shards, tokenizer, k, n_batches)
            mixed = median(ours_mixture, args.repeats, shards, tokenizer, k, n_batches)
            print(f"{k:>16}  {base:>21.1f} /s  {one:>8.1f} /s  {one / base:>5.2f}x  {mixed:>9.1f} /s  "
                  f"{mixed / one:>19.2f}x")
        if args.train:
            train_table(train_dir, args.loaders, args.train_steps)
    synth = median(synth_rate, args.repeats)
    print(f"synthetic generator at 64x64 (render + JPEG), one core: {synth:.0f} samples/s (target >= 2000)")


if __name__ == "__main__":
    main()
