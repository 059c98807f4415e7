"""Resume refuses what cannot continue, before any worker starts, with one message naming what changed
(the model, the loss, the global batch, the data sources), and lets through what may change (steps and
the lr schedule's length, eval settings, the worker count). The checkpoint holds a real data stream's
state after two batches; its DeepSpeed files are stand-ins (nothing here loads them)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import open_train_stream
from pipeline.models import run_tokenizer
from pipeline.orchestrate import preflight
from tests.helpers.checkpoints import write_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEP = 2


@pytest.fixture(scope="module")
def resumable(synth, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run_dir with a checkpoint at step 2 of a 2-worker run of 32-sample batches; its overrides."""
    data = synth(256, shard_size=32) / "train"
    run = tmp_path_factory.mktemp("run")
    settings = [f"run_dir={run}", f"data.train_urls=[{data}]", "data.image_size=32", "data.context_length=32",
                "train.global_batch=32", "cluster.num_workers=2", "eval.schedule=off", "train.steps=10",
                "gradcache.chunk_size=8"]
    cfg = load_config(str(REPO / "configs/demo.yaml"), settings)
    stream = open_train_stream(cfg, rank=0, world_size=1, tokenizer=run_tokenizer(cfg))
    try:
        batches = iter(stream)
        for _ in range(STEP):
            next(batches)
        state = stream.state_dict()
    finally:
        stream.close()
    write_checkpoint(str(run), STEP, cfg, data_state=state)
    return data, settings


def refusal(settings: list[str], capsys) -> str:
    """`contrast train` with `settings`: it must stop with one message (exit 1: a user error)."""
    assert main(["train", str(REPO / "configs/demo.yaml"), *settings]) == 1
    err = capsys.readouterr().err
    assert "contrast train: " in err
    return err


def test_a_changed_model_is_refused_naming_the_setting(resumable, capsys):
    _, settings = resumable
    err = refusal([*settings, "model.name=small"], capsys)
    assert "holds checkpoints of a different model" in err
    assert "model.name: 'tiny' in the checkpoint, 'small' now" in err


def test_a_changed_loss_is_refused_unless_allowed(resumable, capsys):
    _, settings = resumable
    err = refusal([*settings, "loss.name=siglip"], capsys)
    assert "was trained with loss.name = 'clip'" in err and "train.allow_loss_change=true" in err


def test_a_changed_global_batch_is_refused(resumable, capsys):
    _, settings = resumable
    err = refusal([*settings, "train.global_batch=64"], capsys)
    assert "cannot resume the data stream" in err and "train.global_batch: saved 32, now 64" in err


def test_a_changed_source_list_is_refused(resumable, synth, capsys):
    data, settings = resumable
    other = synth(128, shard_size=32) / "train"                           # 4 shards, not 8
    mixture = [*settings, "data.train_urls=[]",
               f"data.sources=[{{name: web, urls: [{data}]}}, {{name: more, urls: [{other}]}}]"]
    err = refusal(mixture, capsys)
    assert "the source names, in order: saved ['train'], now ['web', 'more']" in err
    err = refusal([*settings, f"data.train_urls=[{other}]"], capsys)       # same source name, other shards
    assert "the shard list (names, counts) of source 'train' changed" in err


@pytest.mark.parametrize("change", [["train.steps=500", "train.warmup_steps=50", "train.lr=3e-4"],
                                    ["eval.every_k=3", "eval.batch_size=64"],
                                    ["cluster.num_workers=4"], ["cluster.num_workers=1"]])
def test_what_may_change_on_resume_passes(resumable, change):
    _, settings = resumable
    preflight(load_config(str(REPO / "configs/demo.yaml"), [*settings, *change]))


def test_contrast_config_shows_the_world_sizes_the_data_layout_allows(capsys):
    """6 virtual streams split over 1, 2, 3 or 6 workers; of the range [1, 4], 4 cannot read them."""
    settings = ["data.streams=6", "train.global_batch=12", "gradcache.chunk_size=3"]
    assert main(["config", str(REPO / "configs/demo.yaml"), *settings, "cluster.num_workers=[1,4]"]) == 0
    assert ("# worker counts the data layout allows (6 virtual streams, data.streams): 1, 2, 3, 6; a resume may "
            "change to any of them; cluster.num_workers = [1, 4] trains on 1, 2, 3 workers") in capsys.readouterr().out
    assert main(["config", str(REPO / "configs/demo.yaml"), *settings, "cluster.num_workers=4"]) == 1
    assert "Worker counts this data layout allows: [1, 2, 3, 6]" in capsys.readouterr().err
