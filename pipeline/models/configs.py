"""Named model configs and the architecture spec a model is built from.

A spec is the resolved architecture: tower widths, depths, heads, patch size, embedding size, or
the Hugging Face config of a pretrained tower. It is written into every published checkpoint, so a
checkpoint rebuilds exactly the model that wrote it, even if a named config changes later.
Image size, context length and vocabulary size come from the data (`data.image_size`, the tokenizer).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pipeline.config import Config, register_check

Activation = Literal["gelu", "quick_gelu", "gelu_tanh"]
ACTIVATIONS: tuple[str, ...] = ("gelu", "quick_gelu", "gelu_tanh")


@dataclass(frozen=True)
class ViTSpec:
    """A ViT image tower: patch embedding, class token, pre-norm blocks, pooling, projection.

    The defaults are CLIP's (and every named config's); the other values describe imported towers:
    QuickGELU (OpenAI's weights), fixed 2-D sin-cos positions, SigLIP's tower (no class token, no
    pre-norm, a patch bias, attention pooling `map`, no projection: the pooled width is the embedding).
    CoCa's (`coca`, open_clip's `attentional_pool`): `pool_queries` learned queries of width embed_dim attend
    over the final tokens, then a norm; the first query is the pooled embedding (projected), the others are
    the image tokens the captioning decoder attends to.
    """
    width: int
    layers: int
    heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    pool: Literal["cls", "mean", "map", "coca"] = "cls"
    act: Activation = "gelu"
    eps: float = 1e-5                      # LayerNorm epsilon
    class_token: bool = True
    norm_pre: bool = True
    patch_bias: bool = False
    positions: Literal["learned", "sincos"] = "learned"
    proj: bool = True
    pool_queries: int = 256                # pool `coca`: queries of the attentional pooler (the first is pooled)
    pool_heads: int = 8                    # pool `coca`: its heads
    kind: str = "vit"


@dataclass(frozen=True)
class TextSpec:
    """A text transformer: causal and pooled at the end token (the largest id: `argmax`) like CLIP, or
    at the first `eos_id` (`eos`), the first or the last position; SigLIP's is bidirectional, pooled
    last, with a biased projection. CoCa's (`appended`, open_clip's `embed_cls`) appends a learned class
    token after the caption and pools it (normed after pooling); its unnormed token states feed the
    captioning decoder, and padding keys are masked as open_clip's CoCa masks them."""
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    act: Activation = "gelu"
    eps: float = 1e-5
    causal: bool = True
    pool: Literal["argmax", "eos", "first", "last", "appended"] = "argmax"
    eos_id: Optional[int] = None           # the token `eos` pooling looks for
    proj_bias: bool = False
    pad_id: int = 0                        # pool `appended`: padding keys are masked
    kind: str = "text"


@dataclass(frozen=True)
class HFSpec:
    """A pretrained Hugging Face tower: its config (a dict, as `config.to_dict()`), pooling, source.
    Pooling: the first token ("cls"), the mean over non-padding tokens, or the last non-padding token."""
    config: dict[str, Any] = field(hash=False)
    pool: Literal["cls", "mean", "last"] = "mean"
    source: Optional[str] = None           # the hf_path it came from (informative only)
    kind: str = "hf"


@dataclass(frozen=True)
class DecoderSpec:
    """CoCa's multimodal text decoder: `layers` × (causal self-attention block, cross-attention block to the
    image tokens), a norm, a projection onto the vocabulary. Its width is the text tower's and the
    embedding size (the image tokens' width)."""
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    act: Activation = "gelu"
    eps: float = 1e-5
    kind: str = "decoder"


TowerSpec = Union[ViTSpec, TextSpec, HFSpec]


@dataclass(frozen=True)
class ModelSpec:
    embed_dim: int
    image: Union[ViTSpec, HFSpec]
    text: Union[TextSpec, HFSpec]
    decoder: Optional[DecoderSpec] = None  # CoCa: the captioning decoder

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.decoder is None:             # the specs written before CoCa stay byte for byte the same
            del d["decoder"]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelSpec:
        kinds = {"vit": ViTSpec, "text": TextSpec, "hf": HFSpec}

        def tower(t: dict[str, Any]) -> TowerSpec:
            if t.get("kind") not in kinds:
                raise ValueError(f"model spec: unknown tower kind {t.get('kind')!r}; expected one of {sorted(kinds)}")
            return kinds[t["kind"]](**t)
        decoder = DecoderSpec(**d["decoder"]) if d.get("decoder") else None
        return ModelSpec(embed_dim=int(d["embed_dim"]), image=tower(d["image"]), text=tower(d["text"]),
                         decoder=decoder)


# The public CLIP models (OpenAI; open_clip's configs of the same names), heads = width / 64.
# `tiny` is sized to train on 64x64 synthetic images on two CPU cores in minutes; `small` is
# open_clip's ViT-S-16 shape, for a single GPU.
NAMED_SPECS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(128, ViTSpec(width=128, layers=3, heads=4, patch_size=8),
                      TextSpec(width=128, layers=2, heads=4)),
    "small": ModelSpec(384, ViTSpec(width=384, layers=12, heads=6, patch_size=16),
                       TextSpec(width=384, layers=12, heads=6)),
    "ViT-B-32": ModelSpec(512, ViTSpec(width=768, layers=12, heads=12, patch_size=32),
                          TextSpec(width=512, layers=12, heads=8)),
    "ViT-B-16": ModelSpec(512, ViTSpec(width=768, layers=12, heads=12, patch_size=16),
                          TextSpec(width=512, layers=12, heads=8)),
    "ViT-L-14": ModelSpec(768, ViTSpec(width=1024, layers=24, heads=16, patch_size=14),
                          TextSpec(width=768, layers=12, heads=12)),
}


def _coca(embed: int, vit: ViTSpec, text: TextSpec, pool_heads: int) -> ModelSpec:
    """A CoCa spec: the ViT pooled by CoCa's attentional pooler, the text tower with an appended class token,
    a decoder as wide and deep as the text tower (open_clip's `coca_*` configs)."""
    vit = dataclasses.replace(vit, pool="coca", pool_heads=pool_heads)
    text = dataclasses.replace(text, pool="appended")
    return ModelSpec(embed, vit, text, DecoderSpec(width=text.width, layers=text.layers, heads=text.heads))


# CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models"): open_clip's
# coca_ViT-B-32 and coca_ViT-L-14 shapes; `coca_tiny` for the synthetic shapes on CPU.
NAMED_SPECS.update({
    "coca_tiny": _coca(128, ViTSpec(width=128, layers=3, heads=4, patch_size=8, pool_queries=32),
                       TextSpec(width=128, layers=2, heads=4), pool_heads=4),
    "coca_ViT-B-32": _coca(512, NAMED_SPECS["ViT-B-32"].image, NAMED_SPECS["ViT-B-32"].text, pool_heads=8),
    "coca_ViT-L-14": _coca(768, NAMED_SPECS["ViT-L-14"].image, NAMED_SPECS["ViT-L-14"].text, pool_heads=12),
})

MODEL_NAMES: tuple[str, ...] = tuple(NAMED_SPECS)
TEXT_MODEL = "text"                        # model.name of the text–text dual encoder (`text_dual`)


def named_spec(name: str) -> ModelSpec:
    if name not in NAMED_SPECS:
        raise ValueError(f"model.name = {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    return NAMED_SPECS[name]


@register_check
def check_model_config(cfg: Config) -> list[str]:
    """`model.name` exists, the image fits the built-in ViT's patches (unless the image tower is imported),
    which alone can be dropped (the text model checks itself)."""
    m = cfg.model
    if m.name == TEXT_MODEL:
        return []
    if m.name not in NAMED_SPECS:
        return [cfg.problem("model.name", "one of " + ", ".join(MODEL_NAMES + (TEXT_MODEL,)))]
    problems = []
    patch = NAMED_SPECS[m.name].image.patch_size
    imported = bool(m.init_from) and "image" in m.init_towers       # checked by pipeline.models.init_from
    if not m.image.hf_path and not imported and cfg.data.image_size % patch:
        problems.append(cfg.problem("data.image_size", f"a multiple of {m.name}'s patch size {patch} "
                                    f"(e.g. {max(patch, cfg.data.image_size // patch * patch)})"))
    if NAMED_SPECS[m.name].decoder is not None:
        problems += _coca_problems(cfg)
    if m.image.patch_dropout and m.image.hf_path:
        problems.append(cfg.problem("model.image.patch_dropout", "0 with model.image.hf_path: only the built-in "
                                    "ViT drops patches"))
    return problems


def _coca_problems(cfg: Config) -> list[str]:
    """A CoCa model: its own towers, one chunk size for images and captions, a sane caption loss."""
    problems = []
    for name in ("image", "text"):
        if cfg.model.tower(name).hf_path:
            problems.append(cfg.problem(f"model.{name}.hf_path", f"unset: {cfg.model.name}'s towers are its own"))
    g = cfg.gradcache
    if g.text_chunk_size and g.text_chunk_size != g.chunk_size:
        problems.append(cfg.problem("gradcache.text_chunk_size", f"0 or gradcache.chunk_size ({g.chunk_size}): "
                                    "a CoCa step decodes each caption with its own image, so both towers chunk alike"))
    if cfg.loss.caption_weight < 0:
        problems.append(cfg.problem("loss.caption_weight", "≥ 0"))
    if not 0.0 <= cfg.loss.caption_label_smoothing < 1.0:
        problems.append(cfg.problem("loss.caption_label_smoothing", "a fraction in [0, 1)"))
    return problems
