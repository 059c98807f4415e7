"""Fine-tuning from an import, end to end: an open_clip folder (the hand-written fixture, with open_clip's
CLIP BPE) trained by real Ray Train workers under ZeRO-3 with the gradient cache; the loss falls, a resume
is exact, and the export of the result loads back as a new run's starting point. LiT: the imported image
tower locked, a new text tower on the data's tokenizer."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline import storage
from pipeline.config import load_config
from pipeline.layout import checkpoint_url, published_url
from pipeline.models import build_run_model, load_published
from pipeline.models.export import export
from tests.helpers.compare import max_abs_diff
from tests.helpers.open_clip import open_clip_folder
from tests.helpers.tensorboard import scalars
from tests.test_import import CONTEXT, OC_CFG, SIZE

pytestmark = pytest.mark.slow


def fine_tune(run_dir: str, dataset: str, source: str, *overrides: str) -> None:
    from pipeline.orchestrate import train
    train(load_config(None, [
        f"run_dir={run_dir}", f"data.train_urls=[{dataset}]", f"model.init_from={source}",
        f"data.image_size={SIZE}", f"data.context_length={CONTEXT}", "data.shuffle_buffer=32", "loss.name=clip",
        "train.global_batch=16", "train.steps=8", "train.lr=1e-3", "train.warmup_steps=1", "train.log_every=1",
        "gradcache.chunk_size=4", "deepspeed.zero_optimization.stage=3", "cluster.num_workers=2",
        "checkpoint.every_steps=4", "eval.schedule='off'", *overrides]))


@pytest.fixture
def source(tmp_path):
    open_clip_folder(tmp_path / "oc", OC_CFG)
    return tmp_path / "oc"


def test_an_imported_model_fine_tunes_resumes_exactly_and_exports(local_ray, synth, source, tmp_path):
    dataset = str(synth(256, image_size=SIZE, shard_size=32) / "train")
    run = str(tmp_path / "run")
    fine_tune(run, dataset, str(source))
    losses = [v for _, v in sorted(scalars(storage.join(run, "tensorboard"))["train/loss"])]
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.1, losses

    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    for unfinished in (checkpoint_url(resumed, 8), published_url(resumed, 8)):
        storage.remove(storage.join(unfinished, storage.COMPLETE))
    fine_tune(resumed, dataset, str(source))
    final = load_published(published_url(run, 8))
    assert final.tokenizer.is_clip_bpe, "the import's tokenizer fed the training stream and travels on"
    assert max_abs_diff(load_published(published_url(resumed, 8)).model.state_dict(), final.model.state_dict()) <= 1e-6

    export(published_url(run, 8), "open_clip", str(tmp_path / "export"))
    again = build_run_model(load_config(None, [f"model.init_from={tmp_path / 'export'}", f"data.image_size={SIZE}",
                                               f"data.context_length={CONTEXT}"]), 0)
    assert max_abs_diff(again.state_dict(), final.model.state_dict()) == 0.0
    start = build_run_model(load_config(None, [f"model.init_from={source}", f"data.image_size={SIZE}",
                                               f"data.context_length={CONTEXT}"]), 0)
    assert not torch.equal(start.image_tower.proj, final.model.image_tower.proj), "training changed the weights"


def test_lit_on_an_imported_image_tower(local_ray, synth, source, tmp_path):
    """1 worker, ZeRO 1, 4 steps: the locked imported image tower ends as imported; the new text tower trains on
    the data's tokenizer."""
    dataset = str(synth(256, image_size=SIZE, shard_size=32) / "train")
    run = str(tmp_path / "lit")
    fine_tune(run, dataset, str(source), "model.init_towers=[image]", "model.image.lock=true", "model.name=tiny",
              "data.context_length=32", "train.steps=4", "cluster.num_workers=1", "deepspeed.zero_optimization.stage=1")
    trained = load_published(published_url(run, 4))
    start = build_run_model(load_config(None, [f"model.init_from={source}", f"data.image_size={SIZE}",
                                               f"data.context_length={CONTEXT}"]), 0)
    image = {k: v for k, v in trained.model.state_dict().items() if k.startswith("image_tower.")}
    assert max_abs_diff(image, {k: start.state_dict()[k] for k in image}) == 0.0
    assert not trained.tokenizer.is_clip_bpe and trained.model.text_tower.proj.shape == (128, 24)
