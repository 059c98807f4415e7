"""The training stage end to end: real Ray Train workers, real DeepSpeed, gloo on CPU.

One local Ray serves the module; each run is a fixture, run once and shared by the tests that read it.
"""
from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch

from pipeline import storage
from pipeline.config import load_config
from pipeline.layout import checkpoint_url, published_url
from pipeline.train.checkpoint import latest_checkpoint
from tests.helpers.compare import max_abs_diff
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 32                      # 16 rows per worker with 2 workers
REQUIRED_TAGS = {
    "train/loss", "train/lr", "train/logit_scale", "train/temperature", "train/grad_norm", "train/alignment",
    "train/uniformity_image", "train/uniformity_text", "train/tolerance", "perf/samples_per_s",
    "perf/step_time_s", "perf/data_wait_fraction", "perf/peak_memory_gb", "data/bad_samples",
}


@pytest.fixture(scope="module")
def dataset(synth) -> str:
    return str(synth(512, shard_size=64) / "train")                # 8 shards


@pytest.fixture(scope="module")
def ray_cluster(s3_server, local_ray):
    """The module's local Ray, started after the S3 server so its workers see the endpoint."""


def train(run_dir: str, dataset: str, *overrides: str):
    from pipeline.orchestrate import train as run
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"data.train_urls=[{dataset}]", "data.image_size=32", "data.context_length=32",
        "data.shuffle_buffer=64", "model.name=tiny", "model.dropout=0.0", "loss.name=clip",
        f"train.global_batch={GLOBAL_BATCH}", "train.steps=8", "train.lr=2e-3", "train.warmup_steps=2",
        "train.log_every=1", "gradcache.chunk_size=4", "deepspeed.zero_optimization.stage=2",
        "cluster.num_workers=2", "checkpoint.every_steps=4", "checkpoint.keep=2", "eval.schedule='off'", *overrides])
    run(cfg)
    return cfg


def published(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    from pipeline.models import load_published
    return load_published(published_url(run_dir, step)).model.state_dict()


# ------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def s3_two_workers(ray_cluster, dataset):
    """2 workers, ZeRO 2, gradient cache of 4 chunks per worker, run_dir on S3."""
    return train("s3://test-bucket/runs/two", dataset, "train.steps=10", "checkpoint.every_steps=5")


@pytest.fixture(scope="module")
def one_worker(ray_cluster, dataset, tmp_path_factory):
    """1 worker, ZeRO 0 (no per-rank optimizer state, so its checkpoints resume on any world size)."""
    return train(str(tmp_path_factory.mktemp("one")), dataset, "train.steps=10", "checkpoint.every_steps=5",
                 "cluster.num_workers=1", "deepspeed.zero_optimization.stage=0")


@pytest.fixture(scope="module")
def two_workers_whole(ray_cluster, dataset, tmp_path_factory):
    """As `s3_two_workers` but the gradient cache's chunk is the whole local batch (one plain backward)."""
    return train(str(tmp_path_factory.mktemp("whole")), dataset, "train.steps=10", "checkpoint.every_steps=5",
                 f"gradcache.chunk_size={GLOBAL_BATCH // 2}")


@pytest.fixture(scope="module")
def dropout_run(ray_cluster, dataset, tmp_path_factory):
    """Dropout on, 4 chunks per worker, ZeRO 3, 8 steps: the uninterrupted run of the resume test."""
    return train(str(tmp_path_factory.mktemp("dropout")), dataset, "model.dropout=0.1",
                 "deepspeed.zero_optimization.stage=3")


# ------------------------------------------------------------------------------------- the tests
def test_two_workers_learn_and_log_every_scalar(s3_two_workers):
    run = s3_two_workers.run_dir
    series = scalars(storage.join(run, "tensorboard"))
    assert REQUIRED_TAGS <= set(series), f"missing: {REQUIRED_TAGS - set(series)}"
    loss = [v for _, v in sorted(series["train/loss"])]
    assert [s for s, _ in sorted(series["train/loss"])] == list(range(1, 11))
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.05, loss
    lr = dict(series["train/lr"])
    assert lr[1] == pytest.approx(1e-3) and lr[2] == pytest.approx(2e-3) and lr[10] < lr[5]
    assert all(v == 0 for _, v in series["data/bad_samples"])
    assert all(0 <= v <= 1 for _, v in series["perf/data_wait_fraction"])
    temperature, scale = dict(series["train/temperature"]), dict(series["train/logit_scale"])
    assert all(temperature[s] == pytest.approx(1 / scale[s]) for s in scale)
    assert latest_checkpoint(run) == checkpoint_url(run, 10)
    assert storage.is_complete(published_url(run, 5)) and storage.is_complete(published_url(run, 10))


def test_one_worker_ends_where_two_do(s3_two_workers, one_worker):
    two = published(s3_two_workers.run_dir, 10)
    one = published(one_worker.run_dir, 10)
    assert max_abs_diff(one, two) < 1e-5


def test_resume_on_another_world_size_continues_the_same_batches(one_worker, dataset, tmp_path):
    """The 1-worker run, stopped after step 5, resumed on 2 workers: same batches, same end weights."""
    reference = published(one_worker.run_dir, 10)
    run = str(tmp_path / "regrown")
    shutil.copytree(one_worker.run_dir, run)
    for unfinished in (checkpoint_url(run, 10), published_url(run, 10)):
        storage.remove(storage.join(unfinished, storage.COMPLETE))
    train(run, dataset, "train.steps=10", "checkpoint.every_steps=5", "deepspeed.zero_optimization.stage=0")
    assert max_abs_diff(published(run, 10), reference) < 1e-5


def test_gradient_cache_chunks_do_not_change_the_weights(s3_two_workers, two_workers_whole):
    """chunk = local batch / 4 vs the whole local batch. (Dropout stays off: a dropout mask is drawn
    per model call, so different chunkings draw different masks; the cache replays each call's own.)"""
    for step in (5, 10):
        chunked, whole = published(s3_two_workers.run_dir, step), published(two_workers_whole.run_dir, step)
        assert max_abs_diff(chunked, whole) < 1e-5, step


def test_resume_continues_exactly_and_ignores_unfinished_checkpoints(dropout_run, dataset, tmp_path):
    """Copy the 8-step ZeRO-3 run (dropout on), make its step-8 checkpoint unfinished (no COMPLETE), resume:
    it must continue from step 4 and end on the same weights; replayed steps are not logged again."""
    reference = published(dropout_run.run_dir, 8)
    run = str(tmp_path / "resumed")
    shutil.copytree(dropout_run.run_dir, run)
    for unfinished in (checkpoint_url(run, 8), published_url(run, 8)):
        storage.remove(storage.join(unfinished, storage.COMPLETE))
    assert latest_checkpoint(run) == checkpoint_url(run, 4)
    from pipeline.models import CheckpointError, load_published
    with pytest.raises(CheckpointError, match="COMPLETE"):
        load_published(published_url(run, 8))

    train(run, dataset, "model.dropout=0.1", "deepspeed.zero_optimization.stage=3")
    assert max_abs_diff(published(run, 8), reference) <= 1e-6
    assert latest_checkpoint(run) == checkpoint_url(run, 8)
    logged = Counter(step for step, _ in scalars(storage.join(run, "tensorboard"))["train/loss"])
    assert logged == Counter(range(1, 9)), "every step exactly once across both runs' event files"


# ------------------------------------------------------------------------ hardening (issue 17)
ONE_WORKER = ("checkpoint.every_steps=5", "cluster.num_workers=1", "deepspeed.zero_optimization.stage=0")


def copy_run(source: str, tmp_path) -> str:
    run = str(tmp_path / "copy")
    shutil.copytree(source, run)
    return run


def test_extending_a_finished_run_continues_the_cosine_over_the_new_length(one_worker, dataset, tmp_path):
    """train.steps 10 → 14: step 11 used to run at the old schedule's end value (lr 0)."""
    from pipeline.train.engine import lr_factor
    run = copy_run(one_worker.run_dir, tmp_path)
    train(run, dataset, "train.steps=14", *ONE_WORKER)
    lr = dict(scalars(storage.join(run, "tensorboard"))["train/lr"])
    expected = 2e-3 * lr_factor(10, warmup=2, total=14, min_ratio=0.0)       # optimizer step 10 is step 11
    assert expected > 1e-4 and lr[11] == pytest.approx(expected, rel=1e-6)
    assert lr[14] < lr[11]


def test_a_non_finite_step_stops_the_run_and_keeps_the_good_checkpoints(one_worker, dataset, tmp_path):
    """An absurd lr on resume: the weights blow up, the first non-finite step stops every rank, nothing
    of it is checkpointed and the last good checkpoints (keep=2) are not pruned."""
    from pipeline.orchestrate import TrainingError
    from pipeline.train.checkpoint import complete_steps
    run = copy_run(one_worker.run_dir, tmp_path)
    with pytest.raises(TrainingError, match="is not finite .*stopped without checkpointing this step"):
        train(run, dataset, "train.steps=20", "train.lr=1e38", *ONE_WORKER)
    assert complete_steps(run) == [5, 10]
    assert not storage.exists(checkpoint_url(run, 15)) and not storage.is_complete(published_url(run, 15))
    from pipeline.status import format_status, run_status
    status = run_status(run)
    kinds = [(e["kind"], e.get("resumed")) for e in status.events]
    assert kinds[-2:] == [("started", True), ("failed", None)], kinds
    assert "not finite" in status.events[-1]["errors"]["0"]
    assert "failed: worker 0: NonFiniteError" in format_status(status), format_status(status)


def test_status_reads_a_finished_run_from_its_artifacts_on_s3(s3_two_workers):
    """`contrast status` needs nothing but the run_dir: progress, checkpoints, published steps, events."""
    from pipeline.status import format_status, run_status
    status = run_status(s3_two_workers.run_dir)
    assert status.trainer is None and status.progress["step"] == status.progress["total"] == 10
    assert status.progress["sources"]["train"]["samples"] == 10 * GLOBAL_BATCH
    assert [c["step"] for c in status.checkpoints if c["state"] == "complete"] == [5, 10] and status.resume_step == 10
    assert status.published == [5, 10]
    assert [(e["kind"], e["step"]) for e in status.events] == [("started", 0), ("finished", 10)]
    text = format_status(status)
    assert "step 10/10 (100%)" in text and "started at step 0 of 10 with 2 workers" in text, text


def test_a_half_published_step_is_published_on_resume(one_worker, dataset, tmp_path):
    """A kill between a checkpoint and its published copy left published/step_N without COMPLETE for ever."""
    from pipeline.models import load_published
    run = copy_run(one_worker.run_dir, tmp_path)
    reference = published(run, 10)
    storage.remove(storage.join(published_url(run, 10), storage.COMPLETE))
    storage.remove(storage.join(published_url(run, 10), "model.safetensors"))
    train(run, dataset, "train.steps=10", *ONE_WORKER)
    assert storage.is_complete(published_url(run, 10))
    assert max_abs_diff(load_published(published_url(run, 10)).model.state_dict(), reference) == 0


def test_resume_refuses_another_tokenizer_or_loss(one_worker, dataset, tmp_path):
    """Checked by the driver before Ray starts: other token ids, or another objective, are not a resume."""
    from pipeline.config import ConfigError
    from pipeline.data import train_tokenizer
    from pipeline.orchestrate import absolute_paths, preflight
    run = copy_run(one_worker.run_dir, tmp_path)
    base = load_config(None, [f"run_dir={run}", f"data.train_urls=[{dataset}]", "data.image_size=32",
                              "data.context_length=32", "data.shuffle_buffer=64", f"train.global_batch={GLOBAL_BATCH}",
                              "train.steps=12", "train.warmup_steps=2", *ONE_WORKER])
    preflight(absolute_paths(base))                                         # the same settings resume
    with pytest.raises(ConfigError, match="loss.name = 'clip'.*train.allow_loss_change=true"):
        preflight(absolute_paths(load_config(None, [f"run_dir={run}", f"data.train_urls=[{dataset}]",
                                                    "data.image_size=32", "data.context_length=32",
                                                    "data.shuffle_buffer=64", f"train.global_batch={GLOBAL_BATCH}",
                                                    "loss.name=dcl", *ONE_WORKER])))
    other = tmp_path / "other-tokenizer.json"
    train_tokenizer(["entirely different words here"], vocab_size=300).save(str(other))
    base.data.tokenizer = str(other)
    with pytest.raises(ConfigError, match="was trained with another tokenizer"):
        preflight(absolute_paths(base))
