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
    """
    width: int
    layers: int
    heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    pool: Literal["cls", "mean", "map"] = "cls"
    act: Activation = "gelu"
    eps: float = 1e-5                      # LayerNorm epsilon
    class_token: bool = True
    norm_pre: bool = True
    patch_bias: bool = False
    positions: Literal["learned", "sincos"] = "learned"
    proj: bool = True
    kind: str = "vit"


@dataclass(frozen=True)
class TextSpec:
    """A text transformer: causal and pooled at the end token (the largest id: `argmax`) like CLIP, or
    at the first `eos_id` (`eos`), the first or the last position; SigLIP's is bidirectional, pooled
    last, with a biased projection."""
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    act: Activation = "gelu"
    eps: float = 1e-5
    causal: bool = True
    pool: Literal["argmax", "eos", "first", "last"] = "argmax"
    eos_id: Optional[int] = None           # the token `eos` pooling looks for
    proj_bias: bool = False
    kind: str = "text"


@dataclass(frozen=True)
class HFSpec:
    """A pretrained Hugging Face tower: its config (a dict, as `config.to_dict()`), pooling, source."""
    config: dict[str, Any] = field(hash=False)
    pool: Literal["cls", "mean"] = "mean"
    source: Optional[str] = None           # the hf_path it came from (informative only)
    kind: str = "hf"


TowerSpec = Union[ViTSpec, TextSpec, HFSpec]


@dataclass(frozen=True)
class ModelSpec:
    embed_dim: int
    image: Union[ViTSpec, HFSpec]
    text: Union[TextSpec, HFSpec]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelSpec:
        kinds = {"vit": ViTSpec, "text": TextSpec, "hf": HFSpec}

        def tower(t: dict[str, Any]) -> TowerSpec:
            if t.get("kind") not in kinds:
                raise ValueError(f"model spec: unknown tower kind {t.get('kind')!r}; expected one of {sorted(kinds)}")
            return kinds[t["kind"]](**t)
        return ModelSpec(embed_dim=int(d["embed_dim"]), image=tower(d["image"]), text=tower(d["text"]))


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

MODEL_NAMES: tuple[str, ...] = tuple(NAMED_SPECS)


def named_spec(name: str) -> ModelSpec:
    if name not in NAMED_SPECS:
        raise ValueError(f"model.name = {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    return NAMED_SPECS[name]


@register_check
def check_model_config(cfg: Config) -> list[str]:
    """`model.name` exists, the image fits the built-in ViT's patches (unless the image tower is imported),
    which alone can be dropped."""
    m = cfg.model
    if m.name not in NAMED_SPECS:
        return [cfg.problem("model.name", "one of " + ", ".join(MODEL_NAMES))]
    problems = []
    patch = NAMED_SPECS[m.name].image.patch_size
    imported = bool(m.init_from) and "image" in m.init_towers       # checked by pipeline.models.init_from
    if not m.image.hf_path and not imported and cfg.data.image_size % patch:
        problems.append(cfg.problem("data.image_size", f"a multiple of {m.name}'s patch size {patch} "
                                    f"(e.g. {max(patch, cfg.data.image_size // patch * patch)})"))
    if m.image.patch_dropout and m.image.hf_path:
        problems.append(cfg.problem("model.image.patch_dropout", "0 with model.image.hf_path: only the built-in "
                                    "ViT drops patches"))
    return problems
