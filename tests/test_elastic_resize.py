"""Resuming on another number of workers under ZeRO 1, 2 and 3 (real Ray Train workers, real DeepSpeed).

For each stage, a 2-worker run of 6 steps is the reference; a copy of its run_dir whose step-6 checkpoint
is made unusable resumes from step 3 on 1 and on 4 workers. DeepSpeed's universal checkpoint re-shards the
optimizer state; the data stream continues the same global batches (the same losses, step by step); the
final weights equal the reference's up to float reduction order (small lr: PEERS item 10). One resume
finds the newest checkpoint damaged (a truncated optimizer shard) instead of unfinished: it falls back to
the previous one, says so, and counts it in TensorBoard.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.config import load_config
from pipeline.layout import checkpoint_url, published_url
from tests.helpers.compare import max_abs_diff
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow

STEPS, EVERY, LR = 6, 3, 1e-4
TOLERANCE = STEPS * LR * 1e-2          # world-size runs agree to ~lr·1e-2 per step (PEERS item 10)


@pytest.fixture(scope="module")
def dataset(synth) -> str:
    return str(synth(512, shard_size=64) / "train")


def train(run_dir: str, dataset: str, stage: int, workers: int):
    from pipeline.orchestrate import train as run
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"data.train_urls=[{dataset}]", "data.image_size=32", "data.context_length=16",
        "data.shuffle_buffer=64", "model.name=tiny", "loss.name=clip", "train.global_batch=16",
        f"train.steps={STEPS}", f"train.lr={LR}", "train.warmup_steps=1", "train.log_every=1",
        "train.precision=fp32", "gradcache.chunk_size=2", f"deepspeed.zero_optimization.stage={stage}",
        f"cluster.num_workers={workers}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep=3",
        "eval.schedule='off'", "cluster.auth=disabled"])
    run(cfg)


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    from pipeline.models import load_published
    return load_published(published_url(run_dir, STEPS)).model.state_dict()


def losses(run_dir: str) -> dict[int, float]:
    return dict(scalars(storage.join(run_dir, "tensorboard"))["train/loss"])


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"zero{s}")
def reference(request, local_ray, dataset, tmp_path_factory) -> tuple[int, str]:
    run_dir = str(tmp_path_factory.mktemp(f"zero{request.param}") / "run")
    train(run_dir, dataset, request.param, 2)
    return request.param, run_dir


def stopped_at_step_3(reference: str, into: Path, damage: bool = False) -> str:
    """A copy of the reference run_dir whose newest checkpoint (step 6) is unusable: unfinished (no
    COMPLETE), or with `damage` complete but with an optimizer shard truncated. Its step 6 is unpublished."""
    run = str(into / "run")
    shutil.copytree(reference, run)
    storage.remove(storage.join(published_url(run, STEPS), storage.COMPLETE))
    newest = Path(checkpoint_url(run, STEPS))
    if damage:
        shard = sorted((newest / "deepspeed").glob("*optim_states.pt"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (newest / storage.COMPLETE).unlink()
    return run


@pytest.mark.parametrize("workers", [1, 4])
def test_resume_on_another_world_size_continues_the_same_run(reference, dataset, tmp_path, workers):
    stage, ref = reference
    damage = stage == 1 and workers == 4
    run = stopped_at_step_3(ref, tmp_path, damage=damage)
    train(run, dataset, stage, workers)

    resumed, want = losses(run), losses(ref)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "each step logged once across both runs"
    assert [resumed[s] for s in range(4, STEPS + 1)] == pytest.approx([want[s] for s in range(4, STEPS + 1)],
                                                                      rel=1e-4), "the same batches"
    assert max_abs_diff(final_weights(run), final_weights(ref)) < TOLERANCE
    assert storage.is_complete(storage.join(checkpoint_url(run, EVERY), "universal")), "re-sharded through it"
    if damage:
        skipped = scalars(storage.join(run, "tensorboard"))["checkpoint/damaged_skipped"]
        assert skipped == [(EVERY, 1.0)]
