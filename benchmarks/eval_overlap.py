"""Scheduled evaluation beside training vs evaluating inline (what peers do: the whole cluster waits).

The same reduced demo run (2 Ray workers, DeepSpeed ZeRO 2, gradient cache) is trained twice:
with ``eval.schedule=off`` and with ``eval.schedule=every`` (the eval actor beside the workers,
drained at the end). Inline evaluation would stop every worker for each checkpoint's evaluation,
so its wall time is the training time plus the summed evaluation time (taken from the results'
own timings). Printed: both wall times, the evaluation seconds, the inline estimate, and ratios.
Medians of --repeats runs. On a 2-core machine the actor shares the cores with training, so the
gain is bounded; with the actor on its own CPUs (a cluster) the training stall goes to ~0.

    python benchmarks/eval_overlap.py [--steps 40] [--every 10] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.config import load_config
from pipeline.eval.run import absolute_paths, ensure_data

REPO = Path(__file__).resolve().parents[1]


def config(tmp: Path, run: str, schedule: str, steps: int, every: int):
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"run_dir={tmp / run}", f"data.train_urls=[{tmp / 'synth' / 'train'}]",
        f"data.eval_dir={tmp / 'synth' / 'eval'}",
        "data.synth.samples=4000", "data.synth.eval_samples=500", "data.synth.shard_size=250",
        f"train.steps={steps}", "train.global_batch=128", "train.warmup_steps=5", f"checkpoint.every_steps={every}",
        f"eval.schedule={schedule}", "eval.poll_s=1", "logging.progress=false"])
    absolute_paths(cfg)
    return cfg


def timed_train(cfg) -> float:
    import ray

    from pipeline.orchestrate import train
    start = time.perf_counter()
    train(cfg)
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return elapsed


def eval_seconds(run_dir: str) -> float:
    return sum(json.loads(p.read_text())["timings"]["total_s"] for p in Path(run_dir, "eval").glob("step_*.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="eval-overlap-") as tmp:
        tmp = Path(tmp)
        ensure_data(config(tmp, "setup", "every", args.steps, args.every))
        off, actor, evals = [], [], []
        for r in range(args.repeats):
            off.append(timed_train(config(tmp, f"off-{r}", "off", args.steps, args.every)))
            cfg = config(tmp, f"every-{r}", "every", args.steps, args.every)
            actor.append(timed_train(cfg))
            evals.append(eval_seconds(cfg.run_dir))
    t_off, t_actor, t_eval = (statistics.median(x) for x in (off, actor, evals))
    t_inline = t_off + t_eval
    print(f"{args.steps} steps, a checkpoint every {args.every} ({args.steps // args.every} evaluations), "
          f"median of {args.repeats}:")
    print(f"  training, no evaluation        {t_off:7.1f} s")
    print(f"  evaluation work (sum)          {t_eval:7.1f} s")
    print(f"  inline evaluation (estimate)   {t_inline:7.1f} s  = training + evaluation, every worker waits")
    print(f"  eval actor beside training     {t_actor:7.1f} s  (includes draining the last checkpoint)")
    print(f"  actor / inline                 {t_actor / t_inline:7.2f}x")
    print(f"  training stall: actor {t_actor - t_off:.1f} s vs inline {t_eval:.1f} s")


if __name__ == "__main__":
    main()
