"""What the training framework costs on top of the work: full loop step vs a bare PyTorch step, on CPU.

  full loop  `contrast train` itself (Ray Train, 1 worker with 1 CPU, DeepSpeed ZeRO 0, the data
             stream with one loader process, the gradient-cache step with chunk 0 = one plain
             backward, AdamW through DeepSpeed, clamp, metrics every 10 steps), timed by the loop's own
             meter: `perf/step_time_s` from TensorBoard, one value per 10-step window, the first
             window (start-up) dropped; median.
  bare       the same model (same seed), the same batch shape, the same loss, in a plain loop in this
             process: forward, loss, backward, torch AdamW step, zero_grad, on one tensor batch held
             in memory (no data loading); each step timed, the first 3 dropped; median.

Both run on one torch thread. Target: full / bare ≤ 1.15.

    python benchmarks/train_overhead.py [--model tiny] [--batch 128] [--image-size 64] [--steps 60]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

CONTEXT = 32
LOG_EVERY = 10


def config(data: str, run_dir: str, args: argparse.Namespace):
    from pipeline.config import load_config
    return load_config(None, [
        f"run_dir={run_dir}", f"data.train_urls=[{data}]", f"data.image_size={args.image_size}",
        f"data.context_length={CONTEXT}", "data.num_workers=1", "data.shuffle_buffer=256",
        f"model.name={args.model}", "loss.name=clip", f"train.global_batch={args.batch}",
        f"train.steps={args.steps}", f"train.log_every={LOG_EVERY}", f"checkpoint.every_steps={args.steps}",
        "gradcache.chunk_size=0", "cluster.num_workers=1", "cluster.cpus_per_worker=1", "eval.schedule='off'"])


def full_loop(cfg) -> tuple[float, float]:
    """Median step time of `contrast train` and its median data-wait fraction."""
    import ray
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util
    from pipeline import storage
    from pipeline.orchestrate import train
    train(cfg)
    ray.shutdown()
    series: dict[str, dict[int, float]] = {}
    for url in storage.iter_files(storage.join(cfg.run_dir, "tensorboard")):
        for event in EventFileLoader(url).Load():
            for v in event.summary.value:
                series.setdefault(v.tag, {})[event.step] = float(tensor_util.make_ndarray(v.tensor))
    steps = sorted(s for s in series["perf/step_time_s"] if s > LOG_EVERY)     # the first window is start-up
    return (statistics.median(series["perf/step_time_s"][s] for s in steps),
            statistics.median(series["perf/data_wait_fraction"][s] for s in steps))


def bare_loop(cfg, steps: int) -> float:
    """Median step time of forward + loss + backward + AdamW step on one in-memory batch."""
    import torch
    from pipeline.data import open_train_stream
    from pipeline.losses import get_loss
    from pipeline.models import build_model
    torch.set_num_threads(1)
    batch = next(iter(open_train_stream(cfg)))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, image_size=cfg.data.image_size, context_length=CONTEXT,
                        vocab_size=_vocab(cfg), loss_name="clip").train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    loss_fn = get_loss("clip")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(image=batch["image"], text=batch["text"])
        loss = loss_fn(out["image"], out["text"], logit_scale=out["logit_scale"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def _vocab(cfg) -> int:
    from pipeline.data import load_tokenizer
    return load_tokenizer(cfg.data.train_urls[0], CONTEXT).vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--data", help="a synthetic dataset's train folder (default: synthesise 4096 samples)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        data = args.data
        if data is None:
            from pipeline.data import synthesize
            synthesize(tmp + "/synth", 4096, eval_samples=8, image_size=args.image_size, shard_size=512,
                       progress=False)
            data = tmp + "/synth/train"
        cfg = config(data, tmp + "/run", args)
        full, wait = full_loop(cfg)
        bare = bare_loop(cfg, max(args.steps // 2, 20))
    print(f"model {args.model}, batch {args.batch}, {args.image_size}x{args.image_size} images, 1 thread, CPU")
    print(f"full loop (Ray + DeepSpeed + stream + gradcache step + metrics): {full * 1e3:8.1f} ms/step "
          f"(median; data wait {wait:.1%})")
    print(f"bare forward + backward + AdamW on an in-memory batch:          {bare * 1e3:8.1f} ms/step (median)")
    print(f"ratio full / bare: {full / bare:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
