"""Building a model from its `model` config section: the named spec (or an imported one), pretrained towers,
locks, checkpointing; the dual encoder, CoCa (a spec with a decoder) or the text–text dual encoder."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from pipeline.config import ModelConfig
from pipeline.log import get_logger
from pipeline.models.coca import CocaModel
from pipeline.models.configs import TEXT_MODEL, ModelSpec, named_spec
from pipeline.models.dual import DualEncoder
from pipeline.models.logits import logit_init
from pipeline.models.text_dual import TextDualEncoder, build_text_model
from pipeline.models.towers import read_hf_spec

log = get_logger(__name__)


# ---------------------------------------------------------------------------------- building
def resolve_spec(cfg: ModelConfig) -> ModelSpec:
    """The named spec, with each tower that has `hf_path` replaced by that model's config."""
    spec = named_spec(cfg.name)
    towers = {}
    for name, tower_cfg in (("image", cfg.image), ("text", cfg.text)):
        if tower_cfg.unlock_last and not tower_cfg.lock:
            raise ValueError(f"model.{name}.unlock_last = {tower_cfg.unlock_last} needs model.{name}.lock = true")
        pool = tower_cfg.pool or ("mean" if name == "text" else "cls")
        towers[name] = read_hf_spec(tower_cfg.hf_path, f"model.{name}", pool) if tower_cfg.hf_path \
            else getattr(spec, name)
    if spec.decoder is not None and (cfg.image.hf_path or cfg.text.hf_path):
        raise ValueError(f"model.name = {cfg.name}: a CoCa model's towers are its own (no model.image/text.hf_path)")
    return ModelSpec(spec.embed_dim, towers["image"], towers["text"], spec.decoder)




def build_model(cfg_model: ModelConfig, *, image_size: int, context_length: int, vocab_size: int,
                loss_name: str = "clip", init_temperature: Optional[float] = None, learn_temperature: bool = True,
                load_pretrained: bool = True, pad_id: int = 0,
                spec: Optional[ModelSpec] = None) -> DualEncoder | TextDualEncoder:
    """The dual encoder of a `model` config section: named spec, pretrained towers, locks, checkpointing.

    The logit scale/bias start where the loss `loss_name` wants them (`loss.init_temperature`
    overrides the temperature). `load_pretrained=False` skips reading `hf_path` weights (for
    counting parameters on the meta device). `spec` replaces the configured one (an imported model's).
    `model.name: text` is the text–text dual encoder (`text_dual`; `pad_id` is its tokenizer's padding
    id, masked in pooling); `image_size` and `spec` are then unused.
    """
    if cfg_model.name == TEXT_MODEL:
        return build_text_model(cfg_model, context_length=context_length, vocab_size=vocab_size, pad_id=pad_id,
                                logits=logit_init(loss_name, init_temperature), learn_temperature=learn_temperature,
                                load_pretrained=load_pretrained)
    spec = spec or resolve_spec(cfg_model)
    tau, bias = logit_init(loss_name, init_temperature)
    cls: type[DualEncoder] = DualEncoder
    if spec.decoder is not None:                          # CoCa: its text tower masks this tokenizer's padding
        cls, spec = CocaModel, dataclasses.replace(spec, text=dataclasses.replace(spec.text, pad_id=pad_id))
    model = cls(spec, image_size=image_size, context_length=context_length, vocab_size=vocab_size,
                        dropout=cfg_model.dropout, init_temperature=tau, init_bias=bias,
                        learn_temperature=learn_temperature, patch_dropout=cfg_model.image.patch_dropout)
    for name, tower_cfg in (("image", cfg_model.image), ("text", cfg_model.text)):
        if tower_cfg.hf_path and load_pretrained:
            model.tower(name).load_pretrained(tower_cfg.hf_path)
            log.info("%s tower: pretrained weights from %s", name, tower_cfg.hf_path)
        if tower_cfg.lock:
            model.lock(name, tower_cfg.unlock_last)
    if cfg_model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def count_parameters(cfg_model: ModelConfig, *, image_size: int, context_length: int, vocab_size: int,
                     loss_name: str = "clip", spec: Optional[ModelSpec] = None) -> dict[str, int]:
    """Parameter counts {image, text, logit, total, trainable} ({encoder} or {query, passage} in place of
    image and text for the text model), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(cfg_model, image_size=image_size, context_length=context_length,
                            vocab_size=vocab_size, loss_name=loss_name, load_pretrained=False, spec=spec)
    towers = model.named_towers() if isinstance(model, TextDualEncoder) else \
        {"image": model.image_tower, "text": model.text_tower}
    if getattr(model, "decoder", None) is not None:
        towers["decoder"] = model.decoder
    counts = {name: sum(p.numel() for p in tower.parameters()) for name, tower in towers.items()}
    total = sum(p.numel() for p in model.parameters())
    return {**counts, "logit": total - sum(counts.values()), "total": total,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}

