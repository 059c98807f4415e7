"""What the training framework costs on top of the work: full loop step vs a bare PyTorch step, on CPU.

Both sides run in the same Ray Train worker process (1 worker, 1 CPU, one torch thread), one after
the other, so they see the same process, threads and scheduling:

  bare       the same model (same seed), the same batch, the same loss, in a plain loop: forward,
             loss, backward, torch AdamW step, zero_grad, on one batch held in memory (no data
             loading); each step timed, the first 3 dropped. Run before and after the full loop
             (a shared machine's load drifts); the median of both.
  full loop  `pipeline.train.loop.train_worker` itself: the data stream with one loader process, the
             DeepSpeed engine (ZeRO 0), the gradient-cache step with chunk 0 (= one plain backward),
             AdamW through DeepSpeed, the clamp, metrics every 10 steps, one checkpoint at the end;
             timed by the loop's own meter: `perf/step_time_s` from TensorBoard, one value per 10-step
             window, the first window (start-up) dropped; median.

Target: full / bare ≤ 1.15.

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
BARE_TIMES = "bare_step_times.json"


def config(data: str, run_dir: str, args: argparse.Namespace):
    from pipeline.config import load_config
    return load_config(None, [
        f"run_dir={run_dir}", f"data.train_urls=[{data}]", f"data.image_size={args.image_size}",
        f"data.context_length={CONTEXT}", "data.num_workers=1", "data.shuffle_buffer=256",
        f"model.name={args.model}", "loss.name=clip", f"train.global_batch={args.batch}",
        f"train.steps={args.steps}", f"train.log_every={LOG_EVERY}", f"checkpoint.every_steps={args.steps}",
        "gradcache.chunk_size=0", "cluster.num_workers=1", "cluster.cpus_per_worker=1", "eval.schedule='off'"])


def worker(config: dict) -> None:
    """The Ray Train worker: bare steps, the real training loop, bare steps again."""
    from pipeline import storage
    from pipeline.train.loop import train_worker
    steps = config.pop("bare_steps")
    before = bare_loop(config, steps)
    train_worker(config)
    after = bare_loop(config, steps)
    storage.write_json(storage.join(config["run_dir"], BARE_TIMES), {"before": before, "after": after})


def full_step_times(cfg) -> tuple[float, float]:
    """Median step time and data-wait fraction of the training loop, from its TensorBoard scalars."""
    from pipeline.eval.report import read_scalars
    series = {tag: dict(points) for tag, points in read_scalars(cfg.run_dir).items()}
    steps = sorted(s for s in series["perf/step_time_s"] if s > LOG_EVERY)     # the first window is start-up
    return (statistics.median(series["perf/step_time_s"][s] for s in steps),
            statistics.median(series["perf/data_wait_fraction"][s] for s in steps))


def bare_loop(cfg_dict: dict, steps: int) -> list[float]:
    """Step times of forward + loss + backward + AdamW step on one in-memory batch (first 3 dropped)."""
    import torch

    from pipeline.config import config_from_dict
    from pipeline.data import open_train_stream
    from pipeline.losses import get_loss
    from pipeline.models import build_model
    cfg = config_from_dict(cfg_dict)
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
    return times[3:]


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
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import storage
    from pipeline.cluster import connect
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        data = args.data
        if data is None:
            from pipeline.data import synthesize
            synthesize(tmp + "/synth", 4096, eval_samples=8, image_size=args.image_size, shard_size=512,
                       progress=False)
            data = tmp + "/synth/train"
        cfg = config(data, tmp + "/run", args)
        connect(cfg)
        trainer = TorchTrainer(worker, train_loop_config={**cfg.to_dict(), "bare_steps": max(args.steps // 3, 10)},
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(storage_path=tmp + "/ray"))
        trainer.fit()
        times = storage.read_json(storage.join(cfg.run_dir, BARE_TIMES))
        full, wait = full_step_times(cfg)
    before, after = times["before"], times["after"]
    bare = statistics.median(before + after)
    print(f"model {args.model}, batch {args.batch}, {args.image_size}x{args.image_size} images, 1 thread, CPU")
    print(f"full loop (Ray + DeepSpeed + stream + gradcache step + metrics): {full * 1e3:8.1f} ms/step "
          f"(median; data wait {wait:.1%})")
    print(f"bare forward + backward + AdamW on an in-memory batch:          {bare * 1e3:8.1f} ms/step (median; "
          f"{statistics.median(before) * 1e3:.1f} before, {statistics.median(after) * 1e3:.1f} after the full loop)")
    print(f"ratio full / bare: {full / bare:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
