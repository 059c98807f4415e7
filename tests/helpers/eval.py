"""Small real artifacts for the eval tests: a synthetic dataset and tiny published checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data import load_tokenizer
from pipeline.layout import published_url
from pipeline.models import build_model, save_published

EVAL_SETS = ["zeroshot_heldout", "retrieval", "relation"]


EVAL_DATA = dict(samples=200, eval_samples=48, shard_size=24, image_size=64)   # `synth` settings of the eval tests


def eval_config(data: Path, run_dir: Path, **eval_overrides) -> Config:
    cfg = Config()
    cfg.run_dir = str(run_dir)
    cfg.data.train_urls = [str(data / "train")]
    cfg.data.eval_dir = str(data / "eval")
    cfg.data.context_length = 32
    cfg.eval.sets = list(EVAL_SETS)
    cfg.eval.batch_size = 64
    cfg.eval.poll_s = 0.2
    cfg.eval.retry_s = 0.2
    for key, value in eval_overrides.items():
        setattr(cfg.eval, key, value)
    return cfg


def publish(cfg: Config, step: int) -> str:
    """A tiny untrained model (seeded by `step`) published at run_dir/published/step_N."""
    tok = load_tokenizer(cfg.data.train_urls[0], cfg.data.context_length)
    torch.manual_seed(step)
    model = build_model(cfg.model, image_size=cfg.data.image_size, context_length=cfg.data.context_length,
                        vocab_size=tok.vocab_size, loss_name=cfg.loss.name)
    url = published_url(cfg.run_dir, step)
    return save_published(model, tok, url, step, samples_seen=step * 8, run_config=cfg)
