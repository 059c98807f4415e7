"""Where a ZeRO-3 worker's memory goes: each rank's RSS after each phase of one training step, in copies of the weights.

Two gloo ranks (CPU) build the run's model (`pipeline.train.loop.new_model`), wrap it in the pipeline's
engine (`pipeline.train.engine.Engine`, the training run's DeepSpeed config under ZeRO 3, fp32), and take
one gradient-cache step of `--rows` rows (chunk `--chunk`) at `--image-size` px, then a second. Each rank
samples its RSS every 2 ms; after each phase it reports the RSS and the phase's peak, in copies of the
model's fp32 weights, with the bytes DeepSpeed's ZeRO-3 optimizer holds in tensors (its parameter
partition, the fp32 master copy when it is not the partition itself, AdamW's moments, the gradient
partitions, the gradient bucket as allocated and the full parameters gathered right then) and the bytes
glibc's heap holds free (freed by the program; resident unless `malloc_trim` handed their pages back):

  phases: start (imports, process group) · model built · engine initialised · gradient-cache first pass
  (the no-grad forward of every chunk, measured at the first backward) · backward (the chunks' forward
  with gradients and their backward) · optimizer step · second step (forward, backward and step again)

    python benchmarks/zero3_memory.py [--model ViT-B-32] [--set deepspeed.zero_optimization.reduce_bucket_size=1e7]

`--set KEY=VALUE` overrides the run config (any number), to compare settings; the header names the
DeepSpeed settings the engine ended up with.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))            # after PYTHONPATH: PYTHONPATH=<another checkout> measures its pipeline
for _k, _v in {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)

MB = 2 ** 20
PHASES = ("start", "model built", "engine initialised", "gradient-cache first pass", "backward",
          "optimizer step", "second step")


class RssSampler:
    """This process's RSS sampled every `every_s` seconds on a thread; `mark(phase)` records the RSS now,
    the peak since the previous mark, and `extra()` (bytes of named holders)."""

    def __init__(self, extra: Callable[[], dict[str, int]], every_s: float = 0.002):
        import psutil
        self._me, self._extra, self._every = psutil.Process(), extra, every_s
        self._peak, self._done = 0, threading.Event()
        self.marks: list[dict[str, Any]] = []
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, self._me.memory_info().rss)
            time.sleep(self._every)

    def mark(self, phase: str) -> None:
        rss = self._me.memory_info().rss
        self.marks.append({"phase": phase, "rss": rss, "peak": max(self._peak, rss), **self._extra()})
        self._peak = rss

    def stop(self) -> None:
        self._done.set()


def heap_free_bytes() -> int:
    """Bytes glibc's malloc holds free in its arenas (`mallinfo2().fordblks`): freed by the program, not
    returned to the system; 0 where glibc's mallinfo2 is missing."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return 0
    return int(libc.mallinfo2().fordblks)


def _storage_bytes(tensors: list[Any], seen: set[int]) -> int:
    """Bytes of the storages of `tensors` not yet in `seen` (a storage shared by two holders counts once)."""
    total = 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def deepspeed_bytes(ds: Any) -> dict[str, int]:
    """The bytes ZeRO-3's optimizer holds in tensors, by holder (zeros before the engine exists or off ZeRO 3)."""
    opt = getattr(ds, "optimizer", None)
    if opt is None or not hasattr(opt, "fp16_partitioned_groups_flat"):
        return {}
    seen: set[int] = set()
    state = [v for s in opt.optimizer.state.values() for v in s.values() if hasattr(v, "untyped_storage")]
    buckets = [b.buffer for b in getattr(opt, "ipg_buckets", {}).values() if getattr(b, "buffer", None) is not None]
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    gathered = [p.data for p in ds.module.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE]
    return {"partition": _storage_bytes(opt.fp16_partitioned_groups_flat, seen),
            "master": _storage_bytes(opt.fp32_partitioned_groups_flat, seen),       # 0: the partition itself
            "adam": _storage_bytes(state, seen),
            "grads": _storage_bytes([opt.grad_partitions_flat_buffer], seen),
            "bucket": _storage_bytes(buckets, seen),                                  # allocated, touched as used
            "gathered": sum(t.numel() * t.element_size() for t in gathered)}


def settings(ds: Any) -> dict[str, Any]:
    """The ZeRO settings DeepSpeed runs with (its parsed config: defaults filled in)."""
    z = ds._config.zero_config
    return {k: getattr(z, k) for k in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size",
                                        "max_live_parameters", "max_reuse_distance", "param_persistence_threshold",
                                        "contiguous_gradients", "overlap_comm")}


def run_config(model: str, rows: int, chunk: int, image_size: int, overrides: list[str]) -> Any:
    """The run config of `scale.py --only model` (2 workers, ZeRO 3, fp32), with `overrides` applied last."""
    from pipeline.config import load_config
    return load_config(None, ["eval.schedule=off", f"model.name={model}", "cluster.num_workers=2",
                              "deepspeed.zero_optimization.stage=3", f"train.global_batch={rows}",
                              f"gradcache.chunk_size={chunk}", f"data.image_size={image_size}",
                              "train.precision=fp32", *overrides])


def measure_rank(rank: int, world_size: int, model: str, rows: int, chunk: int, image_size: int,
                 overrides: list[str], steps: int = 2) -> dict[str, Any]:
    """One rank: build, wrap, step (`steps` times, the last two phases); its marks and the weights' bytes."""
    import torch

    from pipeline.data import clip_tokenizer
    from pipeline.models import run_tokenizer
    from pipeline.train.engine import Engine, parameter_count
    from pipeline.train.loop import make_loss, new_model

    engine: list[Any] = []
    sampler = RssSampler(lambda: {"heap_free": heap_free_bytes(),
                                  **(deepspeed_bytes(engine[0].ds) if engine else {})})
    sampler.mark("start")
    cfg = run_config(model, rows, chunk, image_size, overrides)
    tokenizer = run_tokenizer(cfg) or clip_tokenizer(cfg.data.context_length)   # no shards here: CLIP's vocabulary
    net = new_model(cfg, tokenizer)
    weights = parameter_count(net) * 4
    sampler.mark("model built")
    engine.append(Engine(cfg, net, world_size))
    del net
    sampler.mark("engine initialised")
    ds = engine[0].ds
    backward = ds.backward

    def first_backward(*args: Any, **kwargs: Any) -> Any:
        if sampler.marks[-1]["phase"] == "engine initialised":
            sampler.mark("gradient-cache first pass")
        return backward(*args, **kwargs)
    ds.backward = first_backward            # an instance attribute: marks the end of the no-grad pass, then runs it
    loss_fn, weights_from = make_loss(cfg)
    gen = torch.Generator().manual_seed(rank)
    local = rows // world_size
    batch = {"image": torch.randn(local, 3, image_size, image_size, generator=gen),
             "text": torch.randint(1, tokenizer.vocab_size, (local, cfg.data.context_length), generator=gen),
             "caption_id": torch.arange(rank * local, (rank + 1) * local)}       # distinct captions
    for step in range(steps):
        engine[0].forward_backward(batch, loss_fn, weights_from)
        if step == 0:
            sampler.mark("backward")
        engine[0].step()
        sampler.mark("optimizer step" if step == 0 else "second step")
    sampler.stop()
    import pipeline
    return {"rank": rank, "weights": weights, "marks": sampler.marks, "settings": settings(ds),
            "pipeline": str(Path(pipeline.__file__).parent),
            "zero_optimization": cfg.deepspeed.get("zero_optimization", {})}


def copies(n: Optional[int], weights: int) -> str:
    return "" if n is None else f"{n / weights:.2f}"


def print_report(results: list[dict[str, Any]], model: str, overrides: list[str]) -> None:
    """Per rank, each phase's RSS and peak in copies of the weights, and DeepSpeed's tensor bytes."""
    weights = results[0]["weights"]
    print(f"\n{model}: {weights / 4 / 1e6:.1f} M parameters, {weights / MB:.0f} MB of fp32 weights (1 copy); "
          f"2 ranks, ZeRO 3, fp32; overrides: {' '.join(overrides) or 'none'}")
    print(f"pipeline measured: {results[0]['pipeline']}")
    print(f"DeepSpeed settings in effect: {results[0]['settings']}")
    holders = ("partition", "master", "adam", "grads", "bucket", "gathered", "heap_free")
    for r in results:
        print(f"\nrank {r['rank']} (copies of the weights; RSS and peak include torch's and DeepSpeed's own "
              f"{r['marks'][0]['rss'] / MB:.0f} MB at start)")
        print(f"  {'phase':<27} {'RSS MB':>8} {'RSS':>6} {'peak':>6} " + " ".join(f"{h:>9}" for h in holders))
        for m in r["marks"]:
            print(f"  {m['phase']:<27} {m['rss'] / MB:>8.0f} {copies(m['rss'], weights):>6} "
                  f"{copies(m['peak'], weights):>6} " + " ".join(f"{copies(m.get(h), weights):>9}" for h in holders))
        top = max(m["peak"] for m in r["marks"])
        print(f"  peak {top / MB:.0f} MB = {top / weights:.2f} copies; above start: "
              f"{(top - r['marks'][0]['rss']) / weights:.2f} copies")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="a model of pipeline.models (default ViT-B-32)")
    ap.add_argument("--rows", type=int, default=4, help="global batch (rows of a step over both ranks)")
    ap.add_argument("--chunk", type=int, default=2, help="gradient-cache chunk size")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run-config override")
    args = ap.parse_args()
    from tests.helpers.dist import run_world
    started = time.perf_counter()
    results = run_world(measure_rank, 2, args.model, args.rows, args.chunk, args.image_size, args.set)
    print_report(results, args.model, args.set)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
