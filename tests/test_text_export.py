"""Text–text exports: `SentenceTransformer(DIR).encode(texts)` gives our embeddings (shared or two encoders,
mean/CLS/last pooling, with or without a projection), the plain Hugging Face folder rebuilds them by hand,
and the CLI refuses what a format cannot hold."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.data import load_tokenizer
from pipeline.layout import published_url
from pipeline.models import build_model, load_published, save_published
from tests.helpers.text import minilm_path, text_config

TEXTS = ["How do I sort a dictionary by value?", "Return a new sorted list from the items in iterable.",
         "ünïcode and a rather longer sentence that goes on for a while to test the padding of the batch"]


def publish_text(root: Path, *overrides: str) -> str:
    path = minilm_path()
    cfg = text_config(path, f"run_dir={root}", f"data.tokenizer={path}/tokenizer.json", "data.context_length=32",
                      *overrides)
    tok = load_tokenizer(cfg.data.tokenizer, 32)
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=0, context_length=32, vocab_size=tok.vocab_size)
    if not cfg.model.shared_tower:
        with torch.no_grad():                             # make the two encoders differ
            for p in model.passage_encoder.model.encoder.layer[-1].parameters():
                p.mul_(0.9)
    return save_published(model, tok, published_url(cfg.run_dir, 1), 1, run_config=cfg)


@pytest.mark.parametrize("overrides", [[], ["model.projection_dim=48", "model.text.pool=cls"],
                                       ["model.shared_tower=false", "model.text.pool=last"]],
                         ids=["minilm-as-is", "projection-cls", "two-encoders-last-token"])
def test_sentence_transformers_loads_the_export_and_gives_our_embeddings(tmp_path, overrides):
    from sentence_transformers import SentenceTransformer
    ckpt = publish_text(tmp_path / "run", *overrides)
    out = tmp_path / "st"
    assert main(["export", ckpt, "--format", "sentence_transformers", "--out", str(out)]) == 0
    p = load_published(ckpt)
    tokens = p.tokenizer(TEXTS)
    ours = {"query": p.model.encode_query(tokens), "passage": p.model.encode_passage(tokens)}
    folders = {"query": out, "passage": out} if p.model.spec.shared else {k: out / k for k in ours}
    for side, folder in folders.items():
        theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
        assert theirs.shape == ours[side].shape
        assert (theirs - ours[side]).abs().max() < 1e-5, side
    if not p.model.spec.shared:
        assert (ours["query"] - ours["passage"]).abs().max() > 1e-3
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folders["query"] / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", *(["Dense"] if "model.projection_dim=48" in overrides else []),
                       "Normalize"]


def test_plain_hugging_face_folder_rebuilds_our_embeddings_by_hand(tmp_path):
    from transformers import AutoModel, AutoTokenizer
    ckpt = publish_text(tmp_path / "run", "model.projection_dim=24")
    out = tmp_path / "hf"
    assert main(["export", ckpt, "--format", "hf", "--out", str(out)]) == 0
    note = json.loads((out / "embedding.json").read_text())
    assert note["pooling"] == "mean" and note["projection"] == "projection.safetensors"
    tokenizer, encoder = AutoTokenizer.from_pretrained(str(out)), AutoModel.from_pretrained(str(out)).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=note["max_length"], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    by_hand = F.normalize(pooled @ load_file(str(out / "projection.safetensors"))["weight"].T, dim=-1)
    p = load_published(ckpt)
    assert (by_hand - p.model.encode_query(p.tokenizer(TEXTS))).abs().max() < 1e-5


def test_formats_a_checkpoint_cannot_hold_are_refused(tmp_path, capsys):
    ckpt = publish_text(tmp_path / "run")
    assert main(["export", ckpt, "--format", "open_clip", "--out", str(tmp_path / "x")]) == 1
    assert "a text–text checkpoint exports as one of sentence_transformers, hf, safetensors" in capsys.readouterr().err
    assert main(["export", ckpt, "--format", "safetensors", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "model.safetensors").exists()
