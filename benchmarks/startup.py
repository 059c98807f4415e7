"""Start-up, teardown and memory of `contrast train` vs a plain torchrun + DDP loop of the same job.

Both sides train the same model on the same shards with the same step, 2 processes on CPU:

  ours   `contrast train CONFIG`: a local Ray, Ray Train's TorchTrainer, 2 workers running the train
         loop (DeepSpeed ZeRO 2, the gradient cache, TensorBoard every step, a resume checkpoint and
         published weights at the last step).
  plain  `torchrun --nproc_per_node 2 benchmarks/startup.py --plain-worker CONFIG`: a gloo group,
         the same dual encoder wrapped in DDP, torch AdamW, the same data stream and gradient-cache
         step (`forward_backward` with DDP's no_sync), rank 0 saving the weights at the end.

Per run, measured from outside (the launch is t = 0):
  first step   when step 1 ended: the wall time of the first `train/loss` event in TensorBoard
               (ours), the time the plain loop prints (plain)
  teardown     from the end of the last step to the exit of the launched command
  peak RSS     of the whole process tree (the launcher, Ray's processes, every worker), sampled
               every 0.2 s with psutil; also the peak PSS (shared pages split between the
               processes that map them, so shared libraries count once), sampled every 2 s only:
               reading it costs ~15 ms of CPU per process
  CPU          user + system seconds of every process of the tree (last sample of each)
Runs alternate ours / plain (a shared machine's load drifts); medians and ratios are printed.
One untimed run of each side comes first (DeepSpeed's C++ op may need building once).

    python benchmarks/startup.py [--repeats 3] [--steps 5] [--data DIR]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
PLAIN_MARK = "plain-loop-marks "
BIN = Path(sys.executable).parent


def job_config(data: str, run_dir: str, steps: int) -> dict:
    """The demo's job, shortened: tiny model, 64 px, global batch 256 over 2 workers, chunks of 32."""
    return {
        "run_dir": run_dir, "seed": 0,
        "data": {"train_urls": [data], "image_size": 64, "context_length": 32, "num_workers": 0,
                 "shuffle_buffer": 500},
        "model": {"name": "tiny"}, "loss": {"name": "clip"},
        "train": {"steps": steps, "global_batch": 256, "lr": 1e-3, "warmup_steps": 2, "log_every": 1},
        "gradcache": {"chunk_size": 32},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": steps},
        "eval": {"schedule": "off"}, "logging": {"progress": False},
    }


# ----------------------------------------------------------------------------- the plain loop
def plain_worker(config_path: str) -> None:
    """One torchrun process: the job of `config_path` with DDP and torch AdamW; rank 0 prints marks."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.config import load_config
    from pipeline.data import open_train_stream
    from pipeline.gradcache import forward_backward
    from pipeline.losses import get_loss
    from pipeline.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(config_path)
    stream = open_train_stream(cfg, rank=rank, world_size=world)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, image_size=cfg.data.image_size, context_length=cfg.data.context_length,
                        vocab_size=stream.tokenizer.vocab_size, loss_name=cfg.loss.name).train()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = get_loss(cfg.loss.name)
    marks = []
    for _, batch in zip(range(cfg.train.steps), stream):
        forward_backward(ddp, batch["image"], batch["text"], loss_fn, chunk_size=cfg.gradcache.chunk_size)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.time())
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(cfg.run_dir, "model.safetensors"))
        print(PLAIN_MARK + json.dumps({"first": marks[0], "last": marks[-1]}), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- measuring a run
class TreeSampler(threading.Thread):
    """Peak RSS and PSS of a process and all its descendants, and their CPU seconds."""

    def __init__(self, pid: int, every_s: float = 0.2, pss_every: int = 10):
        super().__init__(daemon=True)
        self.root, self.every_s, self.pss_every = psutil.Process(pid), every_s, pss_every
        self.peak_rss = self.peak_pss = 0
        self.cpu: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        for tick in itertools.count():
            if self.done.is_set():
                return
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            with_pss = tick % self.pss_every == 0
            rss = pss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    pss += p.memory_full_info().pss if with_pss else 0
                    times = p.cpu_times()
                except psutil.Error:
                    continue
                self.cpu[p.pid] = times.user + times.system
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.done.wait(self.every_s)


def measure(cmd: list[str], env: dict[str, str], marks_of) -> tuple[dict[str, float], str]:
    """Run `cmd`; `marks_of(output)` gives the epoch times of the end of the first and last steps.
    Returns the figures and the command's output."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    output, _ = proc.communicate()
    end = time.time()
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    first, last = marks_of(output)
    return {"first_step_s": first - start, "teardown_s": end - last,
            "start_plus_teardown_s": first - start + end - last, "total_s": end - start,
            "peak_rss_gib": sampler.peak_rss / 2**30, "peak_pss_gib": sampler.peak_pss / 2**30,
            "cpu_s": sum(sampler.cpu.values())}, output


def tensorboard_marks(run_dir: str):
    """The wall times of the first and last `train/loss` events of a run."""
    def marks(_output: str) -> tuple[float, float]:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        times = sorted(event.wall_time for f in Path(run_dir, "tensorboard").rglob("events.*")
                       for event in EventFileLoader(str(f)).Load()
                       if any(v.tag == "train/loss" for v in event.summary.value))
        return times[0], times[-1]
    return marks


def plain_marks(output: str) -> tuple[float, float]:
    line = next(x for x in output.splitlines() if x.startswith(PLAIN_MARK))
    marks = json.loads(line[len(PLAIN_MARK):])
    return marks["first"], marks["last"]


def run_side(side: str, data: str, tmp: str, steps: int, index: int) -> tuple[dict[str, float], str]:
    import yaml
    run_dir = os.path.join(tmp, f"{side}-{index}")
    os.makedirs(run_dir)
    config = os.path.join(run_dir, "config.yaml")
    Path(config).write_text(yaml.safe_dump(job_config(data, run_dir, steps)))
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                          os.environ.get("PYTHONPATH")]))}
    if side == "ours":
        return measure([str(BIN / "contrast"), "train", config], env, tensorboard_marks(run_dir))
    return measure([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", __file__, "--plain-worker",
                    config], env, plain_marks)


# ------------------------------------------------------------------------------------- main
ROWS = [("first_step_s", "launch → end of step 1", "s"), ("teardown_s", "end of last step → exit", "s"),
        ("start_plus_teardown_s", "start-up + teardown", "s"), ("total_s", "whole command", "s"),
        ("peak_rss_gib", "peak RSS, process tree", "GiB"), ("peak_pss_gib", "peak PSS, process tree", "GiB"),
        ("cpu_s", "CPU time, process tree", "s")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data", help="a synthetic dataset's train folder (default: synthesise 4096 samples)")
    p.add_argument("--json", help="also write the medians here")
    p.add_argument("--plain-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_worker:
        plain_worker(args.plain_worker)
        return
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        data = args.data
        if data is None:
            from pipeline.data import synthesize
            synthesize(tmp + "/synth", 4096, eval_samples=8, image_size=64, shard_size=512, progress=False)
            data = tmp + "/synth/train"
        for side in ("ours", "plain"):
            run_side(side, data, tmp, args.steps, -1)                # warm-up: builds, page cache
        results: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
        lines = []
        for i in range(args.repeats):
            for side in ("ours", "plain"):
                figures, output = run_side(side, data, tmp, args.steps, i)
                results[side].append(figures)
                lines += re.findall(r"start-up: .*", output)
                print(f"  run {i} {side:5s} " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    med = {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in results.items()}
    print(f"\n2 processes, tiny model, global batch 256, gradient cache chunk 32, {args.steps} steps, CPU; "
          f"medians of {args.repeats}")
    print(f"{'':34s} {'ours':>8s} {'plain':>8s} {'ratio':>7s}")
    for key, label, unit in ROWS:
        ours, plain = med["ours"][key], med["plain"][key]
        print(f"{label + ' (' + unit + ')':34s} {ours:8.2f} {plain:8.2f} {ours / plain:7.2f}")
    print("\nour start-up, as the last run logged it:\n  " + (lines[-1] if lines else "(no start-up line)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "runs": results, "startup_lines": lines}, indent=1))


if __name__ == "__main__":
    main()
