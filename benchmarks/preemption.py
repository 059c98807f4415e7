"""Time a preemption costs `contrast train`, with a notice and without one, side by side.

The same job (the demo's tiny model, 32 px, global batch 32 over 2 workers, checkpoints every
`--every` steps) is run three ways, one after the other, each from a fresh run_dir:

  uninterrupted   `contrast train` to `--steps`: the reference wall time
  notice          SIGTERM to the driver after step `--at` (what Slurm and Kubernetes send before a kill,
                  and the path a Ray drain notice takes too: the workers checkpoint the step they are at),
                  then the same command again until the run is done
  no notice       SIGKILL to every process of the run after step `--at` (a node lost without warning),
                  a wait until its run_dir lease expires (`cluster.lease_ttl_s`, set to `--ttl`), then the
                  same command again: it resumes from the last periodic checkpoint and redoes the steps since

Time lost = the wall time of the interrupted run and its rerun (the lease wait included) minus the
uninterrupted one; steps redone = step lines logged more than once. Printed side by side with ratios.
A few minutes on 2 CPU cores at the defaults.

    python benchmarks/preemption.py [--steps 120] [--every 50] [--at 95] [--ttl 5] [--data DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
REPO = Path(__file__).resolve().parents[1]
CONTRAST = str(Path(sys.executable).with_name("contrast"))
STEP_LINE = re.compile(r"\[rank 0\] train: step (\d+)/")


@dataclass
class Outcome:
    wall_s: float                 # every attempt of the run, the lease wait included
    steps_logged: Counter         # how often each step was trained (its console line)
    lease_wait_s: float = 0.0

    @property
    def redone(self) -> int:
        return sum(n - 1 for n in self.steps_logged.values())


class Attempt:
    """One `contrast train` in a session of its own, its output read line by line."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([CONTRAST, "train", *args], env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for_step(self, step: int, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(int(m.group(1)) >= step for m in map(STEP_LINE.search, list(self.lines)) if m):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no step {step}:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout_s: float = 900) -> int:
        code = self.proc.wait(timeout_s)
        self.reader.join(10)
        return code

    def kill_everything(self) -> None:
        """SIGKILL the driver and every process it started, at once (a node gone)."""
        tree = [self.proc] + psutil.Process(self.proc.pid).children(recursive=True)
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.finish(60)

    def steps(self) -> Counter:
        return Counter(int(m.group(1)) for m in map(STEP_LINE.search, self.lines) if m)


def job(data: str, run_dir: str, args: argparse.Namespace) -> list[str]:
    return [str(REPO / "configs/demo.yaml"), f"run_dir={run_dir}", f"data.train_urls=[{data}]",
            "data.image_size=32", "data.context_length=32", f"train.steps={args.steps}", "train.global_batch=32",
            "cluster.num_workers=2", "gradcache.chunk_size=8", f"checkpoint.every_steps={args.every}",
            "eval.schedule=off", "train.log_every=1", f"cluster.lease_ttl_s={args.ttl}", "logging.progress=false"]


def uninterrupted(cmd: list[str]) -> Outcome:
    start = time.monotonic()
    run = Attempt(cmd)
    if run.finish() != 0:
        raise RuntimeError("".join(run.lines)[-3000:])
    return Outcome(time.monotonic() - start, run.steps())


def interrupted(cmd: list[str], at: int, notice: bool, ttl_s: float) -> Outcome:
    start = time.monotonic()
    first = Attempt(cmd)
    first.wait_for_step(at)
    waited = 0.0
    if notice:
        os.kill(first.proc.pid, signal.SIGTERM)
        if first.finish() != 128 + signal.SIGTERM:
            raise RuntimeError("".join(first.lines)[-3000:])
    else:
        first.kill_everything()
        waited = ttl_s + 1.0                        # the dead driver's lease expires before a rerun may start
        time.sleep(waited)
    rerun = Attempt(cmd)
    if rerun.finish() != 0:
        raise RuntimeError("".join(rerun.lines)[-3000:])
    return Outcome(time.monotonic() - start, first.steps() + rerun.steps(), waited)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=50, help="checkpoint.every_steps")
    parser.add_argument("--at", type=int, default=95, help="the step after which the preemption comes")
    parser.add_argument("--ttl", type=float, default=5.0, help="cluster.lease_ttl_s")
    parser.add_argument("--data", help="a dataset folder (default: 1024 synthetic samples)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="preemption-") as tmp:
        data = args.data or str(Path(tmp, "data", "train"))
        if not args.data:
            subprocess.run([CONTRAST, "data", "synth", "--out", str(Path(tmp, "data")), "--samples", "1024",
                            "--eval-samples", "8", "--image-size", "32", "--shard-size", "128"],
                           check=True, env={**os.environ, **ENV}, capture_output=True)
        base = uninterrupted(job(data, f"{tmp}/base", args))
        noticed = interrupted(job(data, f"{tmp}/notice", args), args.at, notice=True, ttl_s=args.ttl)
        killed = interrupted(job(data, f"{tmp}/kill", args), args.at, notice=False, ttl_s=args.ttl)
    step_s = base.wall_s / args.steps
    print(f"\n{args.steps} steps, checkpoint every {args.every}, preempted after step {args.at}; "
          f"uninterrupted run {base.wall_s:.1f} s (whole command, ~{step_s:.2f} s per step with start-up)")
    print(f"{'':24}{'notice (SIGTERM)':>20}{'no notice (SIGKILL)':>22}{'ratio':>8}")
    lost = (noticed.wall_s - base.wall_s, killed.wall_s - base.wall_s)
    rows = [("wall time, s", noticed.wall_s, killed.wall_s), ("time lost, s", *lost),
            ("  of it lease wait, s", noticed.lease_wait_s, killed.lease_wait_s),
            ("steps redone", noticed.redone, killed.redone)]
    for name, a, b in rows:
        ratio = f"{b / a:.2f}" if a > 0 else "-"
        print(f"{name:24}{a:>20.1f}{b:>22.1f}{ratio:>8}")


if __name__ == "__main__":
    main()
