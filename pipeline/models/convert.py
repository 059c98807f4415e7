"""Our dual encoder in open_clip's and Hugging Face's terms, both ways: architectures and weight names.

Export (ours → theirs) and import (theirs → ours) read the same table of names (`_rules`), so a
round trip is exact by construction. Conversions are lossless: renames, transposes (we and open_clip
compute x @ P; Hugging Face stores a Linear, i.e. Pᵀ), the packed q/k/v split in three for Hugging
Face, and scalars of shape () vs (1,). Whatever a format cannot express exactly (`misfits`) is
refused with its name: nothing is ever loaded or written "mostly".

Formats: ``open_clip`` (its `CLIP` / `CustomTextCLIP` with the built-in ViT and text transformer),
``hf_clip`` (`transformers.CLIPModel`), ``hf_siglip`` (`transformers.SiglipModel`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from pipeline.models.configs import NAMED_SPECS, DecoderSpec, ModelSpec, TextSpec, ViTSpec

FORMATS = ("open_clip", "hf_clip", "hf_siglip")
# The other ecosystems' file names (theirs, not artifacts of ours: pipeline/layout.py has those)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_SAFETENSORS = "open_clip_model.safetensors"
HF_CONFIG = "config.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_HF_ACT_IN = {**{v: k for k, v in _HF_ACT.items()}, "gelu_new": "gelu_tanh"}
# Buffers some checkpoints carry that hold no weights (a causal mask, position ids): dropped on import.
_DERIVED = ("attn_mask", "position_ids")


class ConversionError(ValueError):
    """A checkpoint or a model that the other side cannot hold exactly; the message names what does not fit."""


@dataclass(frozen=True)
class Architecture:
    """What rebuilds a model exactly: the spec and the sizes that come with the weights."""
    spec: ModelSpec
    image_size: int
    context_length: int
    vocab_size: int
    has_bias: bool = False


# ------------------------------------------------------------------------------------ what fits where
def misfits(arch: Architecture, fmt: str) -> list[str]:
    """The features of `arch` that format `fmt` cannot express (empty: it fits exactly)."""
    image, text = arch.spec.image, arch.spec.text
    if not (isinstance(image, ViTSpec) and isinstance(text, TextSpec)):
        return ["a pretrained Hugging Face tower (model.*.hf_path) is not a CLIP tower"]
    out: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            out.append(what)
    if fmt == "open_clip":
        coca = arch.spec.decoder is not None
        need(image.class_token, "an image tower without class token (open_clip's ViT always has one)")
        need(not image.patch_bias, "a patch-embedding bias (open_clip's conv1 has none)")
        need(image.pool in ("cls", "mean") or (coca and image.pool == "coca"),
             f"image pooling {image.pool!r} (open_clip's ViT pools 'tok' or 'avg', its CoCa attentionally)")
        if coca:
            need(text.pool == "appended" and text.pad_id == 0 and not text.proj_bias,
                 "a CoCa text tower other than open_clip's (an appended class token, pad id 0, no projection bias)")
            need((arch.spec.decoder.act == "quick_gelu") == (image.act == "quick_gelu") and
                 arch.spec.decoder.eps == 1e-5 and arch.spec.decoder.mlp_ratio == 4.0,
                 "a decoder other than open_clip's (its MLP ratio is 4, its activation the towers', norm eps 1e-5)")
        need(image.proj, "an image tower without projection")
        need((image.act == "quick_gelu") == (text.act == "quick_gelu"),
             "QuickGELU in one tower only (open_clip's quick_gelu applies to both)")
    elif fmt == "hf_clip":
        need(image.class_token and image.norm_pre and not image.patch_bias and image.proj,
             "CLIP's image embeddings (class token, pre-norm, no patch bias, a projection)")
        need(image.pool == "cls", f"image pooling {image.pool!r} (CLIPModel pools the class token)")
        need(text.causal, "a bidirectional text tower (CLIPModel's is causal)")
        need(text.pool in ("argmax", "eos"), f"text pooling {text.pool!r} (CLIPModel pools the end token)")
        need(not text.proj_bias, "a text projection with bias (CLIPModel's has none)")
        need(not arch.has_bias, "a logit bias (CLIPModel has none)")
    elif fmt == "hf_siglip":
        need(not image.class_token and not image.norm_pre and image.patch_bias and not image.proj,
             "SigLIP's image embeddings (no class token, no pre-norm, a patch bias, no projection)")
        need(image.pool == "map", f"image pooling {image.pool!r} (SiglipModel pools with an attention head)")
        need(not text.causal, "a causal text tower (SiglipModel's is bidirectional)")
        need(text.pool == "last", f"text pooling {text.pool!r} (SiglipModel pools the last position)")
        need(text.proj_bias, "a text projection without bias (SiglipModel's head has one)")
        need(image.positions == "learned", "sin-cos image positions")
    else:
        raise ValueError(f"conversion format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return out


def require_fit(arch: Architecture, fmt: str, what: str) -> None:
    """Raise a `ConversionError` listing everything of `arch` that `fmt` cannot hold."""
    problems = misfits(arch, fmt)
    if problems:
        raise ConversionError(f"{what}: {fmt} cannot hold this model exactly: " + "; ".join(problems))


# ------------------------------------------------------------------------------------ weight names
@dataclass(frozen=True)
class _Rule:
    """One of our tensors and its counterpart(s): `same`, `T` (transposed), `scalar` (ours (1,), theirs ()),
    `split` (our packed q/k/v, their three tensors)."""
    ours: str
    theirs: tuple[str, ...]
    how: str = "same"


_BLOCK = {"open_clip": {"norm1": "ln_1", "norm2": "ln_2", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                        "mlp.fc2": "mlp.c_proj"},
          "hf": {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}}


def _pair(ours: str, theirs: str, how: str = "same") -> list[_Rule]:
    return [_Rule(f"{ours}.{p}", (f"{theirs}.{p}",), how) for p in ("weight", "bias")]


def _blocks(ours: str, theirs: str, layers: int, style: str) -> list[_Rule]:
    rules: list[_Rule] = []
    for i in range(layers):
        o, t = f"{ours}.transformer.blocks.{i}", f"{theirs}.{i}"
        for name, their_name in _BLOCK[style].items():
            rules += _pair(f"{o}.{name}", f"{t}.{their_name}")
        for p in ("weight", "bias"):
            if style == "open_clip":
                rules.append(_Rule(f"{o}.attn.qkv.{p}", (f"{t}.attn.in_proj_{p}",)))
            else:
                rules.append(_Rule(f"{o}.attn.qkv.{p}", tuple(f"{t}.self_attn.{x}_proj.{p}" for x in "qkv"), "split"))
    return rules


def _rules(arch: Architecture, fmt: str, text_prefix: str = "") -> list[_Rule]:
    """The complete name table of `arch` in `fmt` (which `misfits` has accepted)."""
    image, text = arch.spec.image, arch.spec.text
    assert isinstance(image, ViTSpec) and isinstance(text, TextSpec)
    i, t = "image_tower", "text_tower"
    if fmt == "open_clip":
        v, p = "visual", text_prefix
        rules = [_Rule(f"{i}.patch_embed.weight", (f"{v}.conv1.weight",)),
                 _Rule(f"{i}.cls_token", (f"{v}.class_embedding",)),
                 _Rule(f"{i}.pos_embed", (f"{v}.positional_embedding",)),
                 *(_pair(f"{i}.norm_pre", f"{v}.ln_pre") if image.norm_pre else []),
                 *_blocks(i, f"{v}.transformer.resblocks", image.layers, "open_clip"),
                 *_pair(f"{i}.norm_post", f"{v}.ln_post"),
                 _Rule(f"{i}.proj", (f"{v}.proj",)),
                 _Rule(f"{t}.token_embed.weight", (f"{p}token_embedding.weight",)),
                 _Rule(f"{t}.pos_embed", (f"{p}positional_embedding",)),
                 *_blocks(t, f"{p}transformer.resblocks", text.layers, "open_clip"),
                 *_pair(f"{t}.norm_final", f"{p}ln_final")]
        if text.proj_bias:
            rules += [_Rule(f"{t}.proj", (f"{p}text_projection.weight",), "T"),
                      _Rule(f"{t}.proj_bias", (f"{p}text_projection.bias",))]
        else:
            rules.append(_Rule(f"{t}.proj", (f"{p}text_projection",)))
        scalar = "scalar"
    else:
        v, p, e = "vision_model", "text_model", "embeddings"
        rules = [_Rule(f"{i}.patch_embed.weight", (f"{v}.{e}.patch_embedding.weight",)),
                 _Rule(f"{i}.pos_embed", (f"{v}.{e}.position_embedding.weight",)),
                 *_blocks(i, f"{v}.encoder.layers", image.layers, "hf"),
                 *_pair(f"{i}.norm_post", f"{v}.post_layernorm"),
                 _Rule(f"{t}.token_embed.weight", (f"{p}.{e}.token_embedding.weight",)),
                 _Rule(f"{t}.pos_embed", (f"{p}.{e}.position_embedding.weight",)),
                 *_blocks(t, f"{p}.encoder.layers", text.layers, "hf"),
                 *_pair(f"{t}.norm_final", f"{p}.final_layer_norm")]
        if fmt == "hf_clip":
            rules += [_Rule(f"{i}.cls_token", (f"{v}.{e}.class_embedding",)),
                      *_pair(f"{i}.norm_pre", f"{v}.pre_layrnorm"),
                      _Rule(f"{i}.proj", ("visual_projection.weight",), "T"),
                      _Rule(f"{t}.proj", ("text_projection.weight",), "T")]
            scalar = "scalar"
        else:
            h = f"{v}.head"
            rules += [_Rule(f"{i}.patch_embed.bias", (f"{v}.{e}.patch_embedding.bias",)),
                      _Rule(f"{i}.attn_pool.probe", (f"{h}.probe",)),
                      _Rule(f"{i}.attn_pool.qkv.weight", (f"{h}.attention.in_proj_weight",)),
                      _Rule(f"{i}.attn_pool.qkv.bias", (f"{h}.attention.in_proj_bias",)),
                      *_pair(f"{i}.attn_pool.proj", f"{h}.attention.out_proj"),
                      *_pair(f"{i}.attn_pool.norm", f"{h}.layernorm"),
                      *_pair(f"{i}.attn_pool.mlp.fc1", f"{h}.mlp.fc1"),
                      *_pair(f"{i}.attn_pool.mlp.fc2", f"{h}.mlp.fc2"),
                      _Rule(f"{t}.proj", (f"{p}.head.weight",), "T"),
                      _Rule(f"{t}.proj_bias", (f"{p}.head.bias",))]
            scalar = "same"
    if fmt == "open_clip" and arch.spec.decoder is not None:
        rules += _coca_rules(arch, text_prefix)
    rules.append(_Rule("logit_scale", ("logit_scale",), scalar))
    if arch.has_bias:
        rules.append(_Rule("logit_bias", ("logit_bias",), scalar))
    return rules


def _coca_rules(arch: Architecture, text_prefix: str) -> list[_Rule]:
    """open_clip's `CoCa`: the attentional pooler (`nn.MultiheadAttention` with kdim/vdim: q/k/v weights apart
    unless the tokens are as wide as the queries, biases packed), the appended class token, the decoder."""
    assert arch.spec.decoder is not None
    a, v = "image_tower.attn_pool", "visual.attn_pool"
    packed = arch.spec.image.width == arch.spec.embed_dim          # then torch packs q/k/v in one weight
    weights = [_Rule(f"{a}.{x}.weight", (f"{v}.attn.in_proj_weight",), f"join:{i}") for i, x in enumerate("qkv")] \
        if packed else [_Rule(f"{a}.{x}.weight", (f"{v}.attn.{x}_proj_weight",)) for x in "qkv"]
    rules = [_Rule(f"{a}.query", (f"{v}.query",)), *weights,
             *[_Rule(f"{a}.{x}.bias", (f"{v}.attn.in_proj_bias",), f"join:{i}") for i, x in enumerate("qkv")],
             *_pair(f"{a}.proj", f"{v}.attn.out_proj"), *_pair(f"{a}.norm_q", f"{v}.ln_q"),
             *_pair(f"{a}.norm_k", f"{v}.ln_k"),
             _Rule("text_tower.cls_token", (f"{text_prefix}cls_emb",))]
    d, layers = "text_decoder", arch.spec.decoder.layers
    rules += [_Rule(r.ours.replace("decoder.transformer.blocks.", "decoder.blocks."), r.theirs, r.how)
              for r in _blocks("decoder", f"{d}.resblocks", layers, "open_clip")]
    cross = {"norm1": "ln_1", "norm_kv": "ln_1_kv", "norm2": "ln_2", "attn.proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        rules += [r for name, theirs in cross.items() for r in _pair(f"decoder.cross.{i}.{name}",
                                                                      f"{d}.cross_attn.{i}.{theirs}")]
        rules += [_Rule(f"decoder.cross.{i}.attn.qkv.{p}", (f"{d}.cross_attn.{i}.attn.in_proj_{p}",))
                  for p in ("weight", "bias")]
    return rules + [*_pair("decoder.norm_final", f"{d}.ln_final"), _Rule("decoder.proj", (f"{d}.text_projection",))]


def export_state_dict(state: dict[str, torch.Tensor], arch: Architecture, fmt: str,
                      text_prefix: str = "") -> dict[str, torch.Tensor]:
    """Our state dict under `fmt`'s names (after `require_fit`)."""
    require_fit(arch, fmt, "export")
    out: dict[str, torch.Tensor] = {}
    joined: dict[str, list[torch.Tensor]] = {}
    for rule in _rules(arch, fmt, _text_prefix(arch, text_prefix)):
        t = state[rule.ours]
        if rule.how.startswith("join:"):                 # three of ours, packed in one of theirs (in q, k, v order)
            joined.setdefault(rule.theirs[0], []).append(t)
            out[rule.theirs[0]] = torch.cat(joined[rule.theirs[0]], dim=0)
        elif rule.how == "split":
            out.update(zip(rule.theirs, t.chunk(3, dim=0)))
        else:
            out[rule.theirs[0]] = _reshape(t, rule.how, ())
    if fmt == "hf_siglip" and not arch.has_bias:
        out["logit_bias"] = torch.zeros(1)               # SiglipModel always has one; 0 leaves logits unchanged
    return {k: v.contiguous() for k, v in out.items()}


def import_state_dict(theirs: dict[str, torch.Tensor], arch: Architecture, fmt: str, where: str,
                      text_prefix: str = "") -> dict[str, torch.Tensor]:
    """`fmt`'s state dict under our names; refuses any weight missing or left over, naming them."""
    require_fit(arch, fmt, where)
    rest = {k: v for k, v in theirs.items() if k.rsplit(".", 1)[-1] not in _DERIVED}
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    packed: dict[str, torch.Tensor] = {}
    for rule in _rules(arch, fmt, _text_prefix(arch, text_prefix)):
        if rule.how.startswith("join:"):                 # one third of a packed q/k/v tensor of theirs
            name = rule.theirs[0]
            if name not in packed and name in rest:
                packed[name] = rest.pop(name)
            if name not in packed:
                missing += [] if name in missing else [name]
                continue
            out[rule.ours] = packed[name].chunk(3, dim=0)[int(rule.how.split(":")[1])]
            continue
        if any(name not in rest for name in rule.theirs):
            missing += [name for name in rule.theirs if name not in rest]
            continue
        parts = [rest.pop(name) for name in rule.theirs]
        if rule.how == "split":
            out[rule.ours] = torch.cat(parts, dim=0)
        else:
            out[rule.ours] = _reshape(parts[0], rule.how, (1,))
    if fmt == "hf_siglip" and not arch.has_bias:
        rest.pop("logit_bias", None)
    if missing or rest:
        raise ConversionError(f"{where}: the weights do not match the {fmt} architecture of its config"
                              + (f"; missing {_few(missing)}" if missing else "")
                              + (f"; not understood {_few(sorted(rest))}" if rest else ""))
    return {k: v.contiguous() for k, v in out.items()}


def _text_prefix(arch: Architecture, text_prefix: str) -> str:
    """open_clip's CoCa keeps its text tower under `text.` (its `CustomTextCLIP` layout)."""
    return "text." if arch.spec.decoder is not None else text_prefix


def _reshape(t: torch.Tensor, how: str, scalar_shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor of a rule on the other side: as it is, transposed, or a scalar reshaped."""
    if how == "T":
        return t.t()
    return t.reshape(scalar_shape) if how == "scalar" else t


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ------------------------------------------------------------------------------------ open_clip configs
_OC_VISION = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value",
              "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre",
              "pos_embed_type",
              "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs", "norm_kwargs", "block_type",
              "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
              "timm_model_name"}
_OC_TEXT = {"context_length", "vocab_size", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "width", "heads",
            "layers", "mlp_ratio", "ls_init_value", "embed_cls", "pad_id", "eos_id", "no_causal_mask",
            "final_ln_after_pool", "pool_type", "proj_bias", "proj_type", "output_tokens", "act_kwargs", "norm_kwargs",
            "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
            "hf_model_name"}
_OC_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
           "nonscalar_logit_scale", "custom_text", "cast_dtype", "multimodal_cfg"}
_OC_MULTIMODAL = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value",
                  "attn_pooler_heads", "dim_head", "n_queries"}
# Options whose non-default values change what the tower computes and that our towers do not have.
_OC_OFF = ("ls_init_value", "attentional_pool", "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads",
           "scale_attn_inner", "scale_attn", "scale_fc", "timm_model_name", "embed_cls", "hf_model_name",
           "tokenizer_mode")


def open_clip_architecture(model_cfg: dict[str, Any], where: str) -> Architecture:
    """Our architecture of an open_clip model config (`model_cfg`), or a refusal naming what we lack."""
    problems: list[str] = []
    vision, text = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    multimodal = model_cfg.get("multimodal_cfg")
    coca = isinstance(multimodal, dict)                  # open_clip's CoCa: attentional pool, appended class token
    off = tuple(k for k in _OC_OFF if not (coca and k in ("attentional_pool", "embed_cls")))
    for section, cfg, known in (("", model_cfg, _OC_TOP), ("vision_cfg.", vision, _OC_VISION),
                                ("text_cfg.", text, _OC_TEXT), ("multimodal_cfg.", multimodal or {}, _OC_MULTIMODAL)):
        problems += [f"{section}{k} (not an option we know)" for k in cfg if k not in known]
        problems += [f"{section}{k} = {cfg[k]!r} (not supported)" for k in off
                     if cfg.get(k) not in (None, False, "default", "")]
    if coca:
        problems += _coca_cfg_problems(model_cfg, vision, text, multimodal)
    if isinstance(vision.get("layers"), (list, tuple)):
        problems.append("vision_cfg.layers is a list (a ModifiedResNet image tower)")
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        problems += [] if len(set(size)) == 1 else [f"vision_cfg.image_size = {size} (not square)"]
        size = size[0]
    pool = {"tok": "cls", "avg": "mean"}.get(vision.get("pool_type", "tok"))
    if pool is None:
        problems.append(f"vision_cfg.pool_type = {vision.get('pool_type')!r} (expected 'tok' or 'avg')")
    if vision.get("final_ln_after_pool") and pool == "mean":
        problems.append("vision_cfg.final_ln_after_pool with average pooling")
    positions = {"learnable": "learned", "sin_cos_2d": "sincos"}.get(vision.get("pos_embed_type", "learnable"))
    if positions is None:
        problems.append(f"vision_cfg.pos_embed_type = {vision.get('pos_embed_type')!r}")
    text_pool = text.get("pool_type", "argmax")
    if text_pool not in ("argmax", "eos", "first", "last"):
        problems.append(f"text_cfg.pool_type = {text_pool!r}")
    if text.get("proj_type", "linear") != "linear":
        problems.append(f"text_cfg.proj_type = {text.get('proj_type')!r} (expected 'linear')")
    quick = bool(model_cfg.get("quick_gelu", False))
    acts = {name: _open_clip_act(cfg, quick, name, problems) for name, cfg in (("vision", vision), ("text", text))}
    eps = {name: float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5)) for name, cfg in (("vision", vision),
                                                                                           ("text", text))}
    for name, cfg in (("vision_cfg", vision), ("text_cfg", text)):
        extra = set(cfg.get("norm_kwargs") or {}) - {"eps"}
        if extra:
            problems.append(f"{name}.norm_kwargs {sorted(extra)}")
    if problems:
        raise ConversionError(f"{where}: our towers cannot express this open_clip model: " + "; ".join(problems))
    width = int(vision.get("width", 768))
    image = ViTSpec(width=width, layers=int(vision.get("layers", 12)), heads=width // int(vision.get("head_width", 64)),
                    patch_size=int(vision.get("patch_size", 16)), mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
                    pool="coca" if coca else pool, act=acts["vision"], eps=eps["vision"],
                    norm_pre=not vision.get("no_ln_pre", False), positions=positions,
                    pool_queries=int(vision.get("attn_pooler_queries", 256)),
                    pool_heads=int(vision.get("attn_pooler_heads", 8)))
    tspec = TextSpec(width=int(text.get("width", 512)), layers=int(text.get("layers", 12)),
                     heads=int(text.get("heads", 8)), mlp_ratio=float(text.get("mlp_ratio", 4.0)), act=acts["text"],
                     eps=eps["text"], causal=not text.get("no_causal_mask", False),
                     pool="appended" if coca else text_pool,
                     eos_id=int(text.get("eos_id", 2)) if text_pool == "eos" and not coca else None,
                     proj_bias=bool(text.get("proj_bias", False)))
    decoder = None if not coca else DecoderSpec(width=int(multimodal.get("width", 512)),
                                                layers=int(multimodal.get("layers", 12)),
                                                heads=int(multimodal.get("heads", 8)),
                                                act="quick_gelu" if quick else "gelu")
    return Architecture(ModelSpec(int(model_cfg.get("embed_dim", 512)), image, tspec, decoder), image_size=int(size),
                        context_length=int(text.get("context_length", 77)),
                        vocab_size=int(text.get("vocab_size", 49408)),
                        has_bias=model_cfg.get("init_logit_bias") is not None)


def _coca_cfg_problems(model_cfg: dict[str, Any], vision: dict[str, Any], text: dict[str, Any],
                       multimodal: dict[str, Any]) -> list[str]:
    """What of an open_clip CoCa config our CocaModel does not compute alike."""
    problems = []
    if not vision.get("attentional_pool"):
        problems.append("multimodal_cfg without vision_cfg.attentional_pool (CoCa pools attentionally)")
    if not text.get("embed_cls"):
        problems.append("multimodal_cfg without text_cfg.embed_cls (CoCa appends a class token)")
    if text.get("correct_cls_mask") or int(text.get("pad_id", 0)) != 0:
        problems.append("text_cfg.correct_cls_mask / pad_id (we mask padding as the public CoCa weights do, pad 0)")
    if float(multimodal.get("mlp_ratio", 4.0)) != 4.0:
        problems.append(f"multimodal_cfg.mlp_ratio = {multimodal['mlp_ratio']} (open_clip's decoder ignores it: 4)")
    for k in ("ls_init_value", "dim_head", "n_queries"):
        if multimodal.get(k) is not None:
            problems.append(f"multimodal_cfg.{k} = {multimodal[k]!r} (not supported)")
    width, embed = int(multimodal.get("width", 512)), int(model_cfg.get("embed_dim", 512))
    if not width == int(text.get("width", 512)) == embed:
        problems.append(f"multimodal_cfg.width {width}: expected the text width and embed_dim ({embed})")
    if vision.get("attn_pooler_queries", 256) < 2:
        problems.append("vision_cfg.attn_pooler_queries < 2 (one pooled query plus the decoder's image tokens)")
    for k in ("context_length", "vocab_size"):
        if k in multimodal and multimodal[k] != text.get(k, {"context_length": 77, "vocab_size": 49408}[k]):
            problems.append(f"multimodal_cfg.{k} = {multimodal[k]} differs from text_cfg.{k}")
    return problems


def _open_clip_act(cfg: dict[str, Any], quick: bool, name: str, problems: list[str]) -> str:
    kwargs = cfg.get("act_kwargs") or {}
    if quick and kwargs:
        problems.append(f"{name}_cfg.act_kwargs with quick_gelu")
    if kwargs and kwargs != {"approximate": "tanh"}:
        problems.append(f"{name}_cfg.act_kwargs = {kwargs!r} (expected none or approximate=tanh)")
    return "quick_gelu" if quick else "gelu_tanh" if kwargs else "gelu"


def open_clip_model_cfg(arch: Architecture, hf_tokenizer: bool) -> dict[str, Any]:
    """open_clip's `model_cfg` for `arch`; `hf_tokenizer` declares the folder's own tokenizer
    (`text_cfg.hf_tokenizer_name`), else open_clip uses its built-in CLIP BPE."""
    require_fit(arch, "open_clip", "export --format open_clip")
    image, text = arch.spec.image, arch.spec.text
    assert isinstance(image, ViTSpec) and isinstance(text, TextSpec)

    def tower_extras(act: str, eps: float) -> dict[str, Any]:
        return {**({"act_kwargs": {"approximate": "tanh"}} if act == "gelu_tanh" else {}),
                **({"norm_kwargs": {"eps": eps}} if eps != 1e-5 else {})}
    vision = {"image_size": arch.image_size, "layers": image.layers, "width": image.width,
              "head_width": image.width // image.heads, "patch_size": image.patch_size, "mlp_ratio": image.mlp_ratio,
              "pool_type": "tok" if image.pool == "cls" else "avg", "no_ln_pre": not image.norm_pre,
              "pos_embed_type": "sin_cos_2d" if image.positions == "sincos" else "learnable",
              **tower_extras(image.act, image.eps)}
    text_cfg = {"context_length": arch.context_length, "vocab_size": arch.vocab_size, "width": text.width,
                "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio,
                "no_causal_mask": not text.causal, "pool_type": text.pool, "proj_bias": text.proj_bias,
                **({"eos_id": text.eos_id} if text.pool == "eos" else {}), **tower_extras(text.act, text.eps)}
    if hf_tokenizer:
        text_cfg["hf_tokenizer_name"] = "."      # with local-dir: open_clip reads the tokenizer in the folder
    cfg: dict[str, Any] = {"embed_dim": arch.spec.embed_dim, "quick_gelu": image.act == "quick_gelu",
                           "vision_cfg": vision, "text_cfg": text_cfg}
    decoder = arch.spec.decoder
    if decoder is not None:                      # open_clip's CoCa (its coca_ViT-B-32 config's keys)
        del vision["pool_type"], text_cfg["pool_type"], text_cfg["no_causal_mask"], text_cfg["proj_bias"]
        vision.update(attentional_pool=True, attn_pooler_queries=image.pool_queries,
                      attn_pooler_heads=image.pool_heads, output_tokens=True)
        text_cfg.update(embed_cls=True, output_tokens=True)
        cfg["multimodal_cfg"] = {"context_length": arch.context_length, "vocab_size": arch.vocab_size,
                                 "width": decoder.width, "heads": decoder.heads, "layers": decoder.layers,
                                 "attn_pooler_heads": image.pool_heads}
        cfg["custom_text"] = True
    if arch.has_bias:
        cfg["init_logit_bias"] = -10.0           # open_clip creates the parameter; the weights hold its value
    return cfg


def named_open_clip_cfg(name: str) -> Optional[dict[str, Any]]:
    """open_clip's built-in config of a public CLIP shape (ViT-B-32, ViT-B-16, ViT-L-14, each also
    ``-quickgelu``), for its training checkpoints; None for other names."""
    base = name.removesuffix("-quickgelu")
    if base not in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):
        return None
    spec = NAMED_SPECS[base]
    if name.endswith("-quickgelu"):
        spec = replace(spec, image=replace(spec.image, act="quick_gelu"), text=replace(spec.text, act="quick_gelu"))
    return open_clip_model_cfg(Architecture(spec, 224, 77, 49408), hf_tokenizer=False)


# ------------------------------------------------------------------------------------ Hugging Face configs
def hf_architecture(config: dict[str, Any], where: str) -> tuple[Architecture, str]:
    """Our architecture of a Hugging Face `CLIPModel` / `SiglipModel` config (complete, as `config.to_dict()`
    gives it), and its format (hf_clip, hf_siglip)."""
    kind = config.get("model_type")
    if kind not in ("clip", "siglip"):
        raise ConversionError(f"{where}: model_type {kind!r}: expected a Hugging Face 'clip' (CLIPModel) or "
                              "'siglip' (SiglipModel) config")
    vision, text = config["vision_config"], config["text_config"]
    problems = [f"{name}.hidden_act = {cfg['hidden_act']!r} (expected one of {sorted(_HF_ACT_IN)})"
                for name, cfg in (("vision_config", vision), ("text_config", text))
                if cfg["hidden_act"] not in _HF_ACT_IN]
    if vision.get("num_channels", 3) != 3:
        problems.append(f"vision_config.num_channels = {vision['num_channels']}")
    if kind == "siglip" and not vision.get("vision_use_head", True):
        problems.append("vision_config.vision_use_head = false (no pooled image embedding)")
    if problems:
        raise ConversionError(f"{where}: our towers cannot express this model: " + "; ".join(problems))

    def tower(cfg: dict[str, Any]) -> dict[str, Any]:
        width = int(cfg["hidden_size"])
        return {"width": width, "layers": int(cfg["num_hidden_layers"]), "heads": int(cfg["num_attention_heads"]),
                "mlp_ratio": int(cfg["intermediate_size"]) / width, "act": _HF_ACT_IN[cfg["hidden_act"]],
                "eps": float(cfg["layer_norm_eps"])}
    v, t = tower(vision), tower(text)
    if kind == "clip":
        eos = int(text["eos_token_id"])
        image = ViTSpec(**v, patch_size=int(vision["patch_size"]))
        tspec = TextSpec(**t, pool="argmax" if eos == 2 else "eos", eos_id=None if eos == 2 else eos)
        embed = int(config["projection_dim"])
    else:
        image = ViTSpec(**v, patch_size=int(vision["patch_size"]), pool="map", class_token=False, norm_pre=False,
                        patch_bias=True, proj=False)
        tspec = TextSpec(**t, causal=False, pool="last", proj_bias=True)
        embed = int(text.get("projection_size") or t["width"])
        if embed != v["width"]:
            raise ConversionError(f"{where}: text_config.projection_size {embed} differs from the image width "
                                  f"{v['width']}: SigLIP's embeddings must meet in one space")
    arch = Architecture(ModelSpec(embed, image, tspec), image_size=int(vision["image_size"]),
                        context_length=int(text["max_position_embeddings"]), vocab_size=int(text["vocab_size"]),
                        has_bias=kind == "siglip")
    return arch, f"hf_{kind}"


def hf_config(arch: Architecture, fmt: str, eot_id: int, pad_id: int) -> dict[str, Any]:
    """The `CLIPConfig` / `SiglipConfig` (as a dict) of `arch` for `fmt` (hf_clip or hf_siglip)."""
    require_fit(arch, fmt, "export --format hf")
    image, text = arch.spec.image, arch.spec.text
    assert isinstance(image, ViTSpec) and isinstance(text, TextSpec)
    if fmt == "hf_clip" and text.pool == "argmax" and eot_id != arch.vocab_size - 1:
        raise ConversionError(f"export --format hf: the text tower pools the largest token id, but the end token "
                              f"{eot_id} is not the largest id ({arch.vocab_size - 1}): CLIPModel would pool elsewhere")
    eos = text.eos_id if text.pool == "eos" else eot_id

    def tower(spec: Any) -> dict[str, Any]:
        return {"hidden_size": spec.width, "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
                "intermediate_size": round(spec.width * spec.mlp_ratio), "hidden_act": _HF_ACT[spec.act],
                "layer_norm_eps": spec.eps}
    text_cfg = {**tower(text), "vocab_size": arch.vocab_size, "max_position_embeddings": arch.context_length,
                "eos_token_id": eos, "pad_token_id": pad_id, "bos_token_id": None}
    vision_cfg = {**tower(image), "image_size": arch.image_size, "patch_size": image.patch_size}
    if fmt == "hf_siglip":
        text_cfg["projection_size"] = arch.spec.embed_dim
        vision_cfg["vision_use_head"] = True
        return {"text_config": text_cfg, "vision_config": vision_cfg}
    return {"projection_dim": arch.spec.embed_dim, "text_config": text_cfg, "vision_config": vision_cfg}
