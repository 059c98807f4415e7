"""Export a published checkpoint as plain safetensors, a Hugging Face CLIP directory, or open_clip's layout.

The built-in towers are CLIP's architecture, so the weights map one-to-one; the only conversions are
the packed q/k/v projection (split for Hugging Face) and the projection matrices (we and open_clip
compute x @ P; Hugging Face stores a Linear, i.e. Pᵀ). Text pooling agrees in all three because our
tokenizer's end token is its largest id: open_clip takes the argmax of the ids, and the exported
Hugging Face config's `eos_token_id` is that id (transformers pools at its first occurrence).
The tokenizer travels with every export.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from pipeline import storage
from pipeline.data.transforms import MEAN, STD
from pipeline.layout import TOKENIZER
from pipeline.log import get_logger
from pipeline.models.configs import TextSpec, ViTSpec
from pipeline.models.dual import DualEncoder
from pipeline.models.published import Published, load_published

log = get_logger(__name__)

FORMATS = ("safetensors", "hf", "open_clip")

# Per-block renames: our name → (open_clip name, Hugging Face name). The packed qkv is handled apart.
_BLOCK_NAMES = {
    "norm1": ("ln_1", "layer_norm1"),
    "norm2": ("ln_2", "layer_norm2"),
    "attn.proj": ("attn.out_proj", "self_attn.out_proj"),
    "mlp.fc1": ("mlp.c_fc", "mlp.fc1"),
    "mlp.fc2": ("mlp.c_proj", "mlp.fc2"),
}


def export(checkpoint: str, fmt: str, out: str) -> str:
    """Write the published checkpoint `checkpoint` to the folder URL `out` in format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    published = load_published(checkpoint)
    writer: Callable[[Published, Path], None] = {"safetensors": _write_safetensors, "hf": _write_hf,
                                                 "open_clip": _write_open_clip}[fmt]
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        writer(published, Path(tmp))
        (Path(tmp) / TOKENIZER).write_text(published.tokenizer.to_json(), encoding="utf-8")
        storage.upload_dir(tmp, out)
    log.info("exported %s as %s to %s", checkpoint, fmt, out)
    return out


# ------------------------------------------------------------------------------------- safetensors
def _write_safetensors(published: Published, out: Path) -> None:
    model, tok = published.model, published.tokenizer
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {"model": model.describe(), "step": published.step, "eot_id": tok.eot_id, "pad_id": tok.pad_id}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------- Hugging Face
def hf_config(model: DualEncoder, eot_id: int, pad_id: int) -> dict[str, Any]:
    """The `transformers.CLIPConfig` (as a dict) of a dual encoder with the built-in towers."""
    image, text = _builtin_towers(model, "hf")
    if image.pool != "cls":
        raise ValueError("export --format hf: Hugging Face CLIP pools the class token; this model uses mean pooling")
    return {
        "projection_dim": model.spec.embed_dim,
        "text_config": {
            "vocab_size": model.vocab_size, "hidden_size": text.width, "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads, "intermediate_size": int(text.width * text.mlp_ratio),
            "max_position_embeddings": model.context_length, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "eos_token_id": eot_id, "pad_token_id": pad_id, "bos_token_id": None},
        "vision_config": {
            "image_size": model.image_size, "patch_size": image.patch_size, "hidden_size": image.width,
            "num_hidden_layers": image.layers, "num_attention_heads": image.heads,
            "intermediate_size": int(image.width * image.mlp_ratio), "hidden_act": "gelu", "layer_norm_eps": 1e-5},
    }


def hf_state_dict(model: DualEncoder) -> dict[str, torch.Tensor]:
    """Our weights under `transformers.CLIPModel`'s names."""
    sd = model.state_dict()
    out = {
        "logit_scale": sd["logit_scale"].reshape(()),
        "vision_model.embeddings.patch_embedding.weight": sd["image_tower.patch_embed.weight"],
        "vision_model.embeddings.class_embedding": sd["image_tower.cls_token"],
        "vision_model.embeddings.position_embedding.weight": sd["image_tower.pos_embed"],
        "visual_projection.weight": sd["image_tower.proj"].t(),
        "text_model.embeddings.token_embedding.weight": sd["text_tower.token_embed.weight"],
        "text_model.embeddings.position_embedding.weight": sd["text_tower.pos_embed"],
        "text_projection.weight": sd["text_tower.proj"].t(),
    }
    for ours, theirs in (("image_tower.norm_pre", "vision_model.pre_layrnorm"),
                         ("image_tower.norm_post", "vision_model.post_layernorm"),
                         ("text_tower.norm_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
    for tower, theirs in (("image_tower", "vision_model"), ("text_tower", "text_model")):
        out.update(_blocks(sd, tower, f"{theirs}.encoder.layers", hf=True))
    return {k: v.contiguous() for k, v in out.items()}


def _write_hf(published: Published, out: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    model, tok = published.model, published.tokenizer
    if model.logit_bias is not None:
        log.warning("export --format hf: transformers.CLIPModel has no logit bias; the learned bias %.3f is "
                    "recorded in config.json as `logit_bias` but not applied by CLIPModel", float(model.logit_bias))
    config = CLIPConfig(**hf_config(model, tok.eot_id, tok.pad_id))
    if model.logit_bias is not None:
        config.logit_bias = float(model.logit_bias)
    clip = CLIPModel(config)
    clip.load_state_dict(hf_state_dict(model), strict=True)
    clip.save_pretrained(str(out))
    names = HFTokenizer.from_str(tok.to_json())
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.context_length,
                        "pad_token": names.id_to_token(tok.pad_id), "eos_token": names.id_to_token(tok.eot_id)}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    size = model.image_size
    processor = {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
                 "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
                 "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD)}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------- open_clip
def open_clip_config(model: DualEncoder) -> dict[str, Any]:
    """open_clip's model config (`model_cfg` of open_clip_config.json) for the built-in towers."""
    image, text = _builtin_towers(model, "open_clip")
    cfg: dict[str, Any] = {
        "embed_dim": model.spec.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {"image_size": model.image_size, "layers": image.layers, "width": image.width,
                       "head_width": image.width // image.heads, "patch_size": image.patch_size,
                       "mlp_ratio": image.mlp_ratio, "pool_type": "tok" if image.pool == "cls" else "avg"},
        "text_cfg": {"context_length": model.context_length, "vocab_size": model.vocab_size, "width": text.width,
                     "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio, "pad_id": 0,
                     "pool_type": "argmax"},
    }
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias)
    return cfg


def open_clip_state_dict(model: DualEncoder) -> dict[str, torch.Tensor]:
    """Our weights under open_clip's `CLIP` names (visual.*, token_embedding, transformer.*, ...)."""
    sd = model.state_dict()
    out = {
        "logit_scale": sd["logit_scale"].reshape(()),
        "visual.conv1.weight": sd["image_tower.patch_embed.weight"],
        "visual.class_embedding": sd["image_tower.cls_token"],
        "visual.positional_embedding": sd["image_tower.pos_embed"],
        "visual.proj": sd["image_tower.proj"],
        "token_embedding.weight": sd["text_tower.token_embed.weight"],
        "positional_embedding": sd["text_tower.pos_embed"],
        "text_projection": sd["text_tower.proj"],
    }
    if "logit_bias" in sd:
        out["logit_bias"] = sd["logit_bias"].reshape(())
    for ours, theirs in (("image_tower.norm_pre", "visual.ln_pre"), ("image_tower.norm_post", "visual.ln_post"),
                         ("text_tower.norm_final", "ln_final")):
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
    out.update(_blocks(sd, "image_tower", "visual.transformer.resblocks", hf=False))
    out.update(_blocks(sd, "text_tower", "transformer.resblocks", hf=False))
    return {k: v.contiguous() for k, v in out.items()}


def _write_open_clip(published: Published, out: Path) -> None:
    model, tok = published.model, published.tokenizer
    save_file(open_clip_state_dict(model), str(out / "open_clip_model.safetensors"))
    config = {"model_cfg": open_clip_config(model),
              "preprocess_cfg": {"size": model.image_size, "mean": list(MEAN), "std": list(STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"},
              "tokenizer": {"file": TOKENIZER, "eot_id": tok.eot_id, "pad_id": tok.pad_id}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------- shared
def _builtin_towers(model: DualEncoder, fmt: str) -> tuple[ViTSpec, TextSpec]:
    image, text = model.spec.image, model.spec.text
    if not (isinstance(image, ViTSpec) and isinstance(text, TextSpec)):
        raise ValueError(f"export --format {fmt} needs the built-in ViT and text towers; this checkpoint has a "
                         f"pretrained Hugging Face tower (export it with --format safetensors)")
    return image, text


def _blocks(sd: dict[str, torch.Tensor], tower: str, prefix: str, hf: bool) -> dict[str, torch.Tensor]:
    """Rename one tower's blocks; the packed qkv stays packed for open_clip, is split for HF."""
    out: dict[str, torch.Tensor] = {}
    i = 0
    while f"{tower}.transformer.blocks.{i}.norm1.weight" in sd:
        ours, theirs = f"{tower}.transformer.blocks.{i}", f"{prefix}.{i}"
        for name, (oc_name, hf_name) in _BLOCK_NAMES.items():
            for p in ("weight", "bias"):
                out[f"{theirs}.{hf_name if hf else oc_name}.{p}"] = sd[f"{ours}.{name}.{p}"]
        for p in ("weight", "bias"):
            qkv = sd[f"{ours}.attn.qkv.{p}"]
            if hf:
                for part, t in zip(("q_proj", "k_proj", "v_proj"), qkv.chunk(3, dim=0)):
                    out[f"{theirs}.self_attn.{part}.{p}"] = t
            else:
                out[f"{theirs}.attn.in_proj_{p}"] = qkv
        i += 1
    return out
