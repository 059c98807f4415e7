"""SIGTERM (Slurm, Kubernetes) to a real `contrast train`: to the driver, then to one worker of the rerun.
Each time the workers checkpoint the step after the signal and the run exits 143 saying where to resume;
the next rerun continues from exactly that step, so no step is trained twice and TensorBoard holds each
step once; no process of a stopped run is left behind. (Unit: the worker's signal handler itself.)"""
from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.layout import checkpoint_url
from pipeline.train import interrupts
from tests.helpers.driver import Driver, left_after, logged_steps, titles
from tests.helpers.tensorboard import scalars

REPO = Path(__file__).resolve().parents[1]
STEPS = 60


def test_a_worker_signal_while_training_asks_for_a_stop_and_otherwise_goes_to_rays_handler():
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))   # stands for Ray's
    try:
        interrupts.install_signal_handlers()
        with interrupts.training():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert interrupts.pending_signal() == signal.SIGTERM and seen == []
            verdict = interrupts.Boundary("unused", notices=False).check(step=3, loss=1.0, grad_norm=1.0)
            assert verdict.stop == signal.SIGTERM and not verdict.notice
        os.kill(os.getpid(), signal.SIGTERM)              # no training running: Ray stopping its worker
        time.sleep(0.05)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_non_finite_step_stops_every_rank_unsaved():
    with pytest.raises(interrupts.NonFiniteError, match="step 7: the loss or the gradient norm is not finite"):
        interrupts.Boundary("unused", notices=False).check(step=7, loss=float("nan"), grad_norm=1.0)


@pytest.mark.slow
def test_sigterm_to_the_driver_then_to_a_worker_checkpoints_the_next_step_and_reruns_continue(synth, tmp_path):
    data = synth(512, shard_size=64) / "train"
    run = tmp_path / "run"
    args = ["train", str(REPO / "configs/demo.yaml"), f"run_dir={run}", f"data.train_urls=[{data}]",
            "data.image_size=32", "data.context_length=32", f"train.steps={STEPS}", "train.global_batch=32",
            "cluster.num_workers=2", "checkpoint.every_steps=100", "eval.schedule=off", "train.log_every=1",
            "gradcache.chunk_size=8"]
    outputs = []

    def interrupted(driver: Driver, whom: str, after_step: int) -> int:
        """Signal the driver or one of its workers after `after_step`; the step the run stopped at."""
        driver.wait_for(rf"step {after_step}/{STEPS}")
        tree = driver.tree()
        os.kill(driver.proc.pid if whom == "driver" else driver.train_workers()[-1], signal.SIGTERM)
        assert driver.finish(timeout_s=120) == 128 + signal.SIGTERM, driver.output[-3000:]
        outputs.append(driver.output)
        m = re.search(r"contrast train: interrupted at step (\d+) \(SIGTERM\); rerun the same command to resume "
                      r"from step (\d+)", driver.output)
        assert m and m.group(1) == m.group(2), driver.output[-3000:]
        assert "Traceback" not in driver.output.split("interrupted at step")[-1]
        left = left_after(tree)
        assert left == [], f"no process of the stopped run is left: {titles(left)}"
        return int(m.group(1))

    first = interrupted(Driver(*args), "driver", after_step=5)
    assert first > 5 and storage.is_complete(checkpoint_url(str(run), first))

    rerun = Driver(*args)
    rerun.wait_for(rf"resumed from \S+/step_{first:08d} \(step {first}\)")
    second = interrupted(rerun, "worker", after_step=first + 3)
    assert second > first + 3 and storage.is_complete(checkpoint_url(str(run), second))

    last = Driver(*args)
    assert last.finish() == 0, last.output[-3000:]
    outputs.append(last.output)
    assert re.search(rf"resumed from \S+/step_{second:08d} \(step {second}\)", last.output)

    assert logged_steps("".join(outputs)) == Counter(range(1, STEPS + 1)), "no step trained twice, none skipped"
    logged = Counter(step for step, _ in scalars(storage.join(str(run), "tensorboard"))["train/loss"])
    assert logged == Counter(range(1, STEPS + 1))


@pytest.mark.slow
def test_a_second_signal_to_the_driver_stops_at_once(synth, tmp_path):
    data = synth(512, shard_size=64) / "train"
    driver = Driver("train", str(REPO / "configs/demo.yaml"), f"run_dir={tmp_path / 'run'}",
                    f"data.train_urls=[{data}]", "data.image_size=32", "data.context_length=32", "train.steps=400",
                    "train.global_batch=32", "cluster.num_workers=2", "eval.schedule=off", "train.log_every=1",
                    "gradcache.chunk_size=8", "checkpoint.grace_s=120")
    driver.wait_for(r"step 3/400")
    tree = driver.tree()
    os.kill(driver.proc.pid, signal.SIGTERM)
    time.sleep(0.3)                                # well inside the grace period: the workers still train
    again = time.monotonic()
    os.kill(driver.proc.pid, signal.SIGTERM)
    assert driver.finish(timeout_s=60) == 128 + signal.SIGTERM, driver.output[-3000:]
    assert time.monotonic() - again < 5, "the second signal does not wait for the grace period"
    assert "contrast: SIGTERM again: stopping now" in driver.output
    left = left_after(tree)
    assert left == [], f"no process of the stopped run is left: {titles(left)}"
