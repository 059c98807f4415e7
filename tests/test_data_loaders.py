"""Loader processes inside real Ray Train workers, on a weighted mixture of two sources.

Two runs of the same 2-worker DeepSpeed job: `data.num_workers=0`, and `data.num_workers=2` with one
training worker SIGKILLed after the first checkpoint (Ray Train restarts the group, which resumes).
A watcher lists, under this module's raylet, the training worker processes and their loader
processes (forks that keep the worker's title) while the runs train. Checked: the same final weights,
loader processes in the second run and none in the first, the killed worker's loaders gone within
seconds, none left after the run, and the per-source and duplicate-rate scalars in TensorBoard.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

import psutil
import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.layout import published_url
from pipeline.models import load_published
from tests.helpers.compare import max_abs_diff
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 4
WORKER_TITLE = "ray::RayTrainWorker"


@pytest.fixture(scope="module")
def sources(synth) -> dict[str, str]:
    return {"web": str(synth(256, shard_size=64, seed=41) / "train"),
            "curated": str(synth(64, shard_size=64, seed=42) / "train")}       # one shard, 8 streams


@pytest.fixture(scope="module")
def raylet(local_ray) -> int:
    """The module's local Ray's raylet pid (every worker process descends from it)."""
    from ray._private import worker
    return worker._global_node.all_processes["raylet"][0].process.pid


class Watcher(threading.Thread):
    """Polls the training workers (the raylet's children titled RayTrainWorker) and their loader
    processes (their children with the same title); `on_poll` may act."""

    def __init__(self, raylet: int, on_poll: Optional[Callable[[Watcher], None]] = None):
        super().__init__(daemon=True)
        self.raylet, self.on_poll = raylet, on_poll
        self.loaders: dict[int, psutil.Process] = {}          # every loader process seen
        self.loaders_of: dict[int, set[int]] = {}             # worker pid → its loader pids
        self.done = threading.Event()

    def workers(self) -> list[psutil.Process]:
        return [p for p in _children(psutil.Process(self.raylet)) if _titled(p)]

    def run(self) -> None:
        while not self.done.is_set():
            for w in self.workers():
                for child in _children(w):
                    if _titled(child):
                        self.loaders.setdefault(child.pid, child)
                        self.loaders_of.setdefault(w.pid, set()).add(child.pid)
            if self.on_poll:
                self.on_poll(self)
            time.sleep(0.1)


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children()
    except psutil.NoSuchProcess:
        return []


def _titled(p: psutil.Process) -> bool:
    try:
        return bool(p.cmdline()) and p.cmdline()[0].startswith(WORKER_TITLE)
    except psutil.Error:
        return False


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def train(run_dir: str, sources: dict[str, str], raylet: int, *overrides: str,
          on_poll: Optional[Callable[[Watcher], None]] = None) -> Watcher:
    from pipeline.orchestrate import train as run
    listed = ", ".join(f"{{name: {n}, urls: [{u}], weight: {w}}}" for (n, u), w in zip(sources.items(), (0.7, 0.3)))
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"data.sources=[{listed}]", f"data.tokenizer={sources['web']}/tokenizer.json",
        "data.image_size=32", "data.context_length=32", "data.shuffle_buffer=32", "model.name=tiny",
        "loss.name=clip", "train.global_batch=16", f"train.steps={STEPS}", "train.lr=1e-3", "train.warmup_steps=2",
        "train.log_every=1", "train.precision=fp32", "gradcache.chunk_size=4", "deepspeed.zero_optimization.stage=1",
        "cluster.num_workers=2", f"checkpoint.every_steps={EVERY}", "checkpoint.keep=2", "eval.schedule='off'",
        "logging.progress=false", *overrides])
    watch = Watcher(raylet, on_poll)
    watch.start()
    try:
        run(cfg)
    finally:
        watch.done.set()
        watch.join()
    return watch


@pytest.fixture(scope="module")
def without_loaders(sources, raylet, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("k0"))
    return run_dir, train(run_dir, sources, raylet, "data.num_workers=0")


@pytest.fixture(scope="module")
def with_loaders_and_a_kill(sources, raylet, tmp_path_factory):
    """num_workers=2; after the first checkpoint is published, one training worker is SIGKILLed and the
    time its loader processes took to vanish is recorded."""
    run_dir = str(tmp_path_factory.mktemp("k2"))
    killed: dict = {}

    def kill_after_the_first_checkpoint(watch: Watcher) -> None:
        if killed or not storage.is_complete(published_url(run_dir, EVERY)):
            return
        worker = min(watch.workers(), key=lambda p: p.pid)
        loaders = [watch.loaders[pid] for pid in watch.loaders_of.get(worker.pid, ())]
        os.kill(worker.pid, signal.SIGKILL)
        start = time.monotonic()
        while any(alive(p) for p in loaders) and time.monotonic() - start < 10:
            time.sleep(0.02)
        killed.update(worker=worker.pid, loaders=len(loaders), gone_s=time.monotonic() - start,
                      left=[p.pid for p in loaders if alive(p)])

    watch = train(run_dir, sources, raylet, "data.num_workers=2", "cluster.max_failures=1",
                  on_poll=kill_after_the_first_checkpoint)
    return run_dir, watch, killed


def test_loader_processes_train_the_same_weights_and_leave_nothing(without_loaders, with_loaders_and_a_kill):
    reference_dir, reference_watch = without_loaders
    run_dir, watch, killed = with_loaders_and_a_kill
    assert not reference_watch.loaders, "num_workers=0 starts no loader process"
    assert killed.get("loaders") == 2, f"the killed worker had its 2 loader processes: {killed}"
    assert not killed["left"] and killed["gone_s"] < 3, f"its loaders outlived it: {killed}"
    assert len(watch.loaders_of) >= 3, f"the restarted group started loaders again: {watch.loaders_of}"
    time.sleep(1)
    left = [pid for pid, p in watch.loaders.items() if alive(p)]
    assert not left, f"loader processes left after the run: {left}"
    final = [load_published(published_url(d, STEPS)).model.state_dict() for d in (reference_dir, run_dir)]
    assert max_abs_diff(*final) <= 1e-6


def test_per_source_and_duplicate_scalars(without_loaders):
    series = scalars(storage.join(without_loaders[0], "tensorboard"))
    last = {tag: dict(values).get(STEPS) for tag, values in series.items()}
    assert last["data/web/samples"] + last["data/curated/samples"] == STEPS * 16
    assert abs(last["data/web/samples"] / (STEPS * 16) - 0.7) < 0.05
    assert last["data/web/bad_samples"] == last["data/curated/bad_samples"] == 0
    rates = [v for _, v in series["data/duplicate_rate"]]
    assert len(rates) == STEPS and all(0 <= r <= 1 for r in rates)
