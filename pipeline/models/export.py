"""Export a published checkpoint as plain safetensors, a Hugging Face model folder, or open_clip's layout.

The weights and configs are converted by `pipeline.models.convert` (one name table both ways, so an
imported model exports back bit for bit). Each folder works in its ecosystem as it is:

* ``open_clip``: `open_clip.create_model_and_transforms("local-dir:DIR")` and
  `open_clip.get_tokenizer("local-dir:DIR")` give our embeddings from raw strings and images. The
  config declares the folder's own tokenizer (`text_cfg.hf_tokenizer_name`), except for models that
  use open_clip's built-in CLIP BPE (imported ones), which it then picks itself;
* ``hf``: `AutoProcessor` + `AutoModel` (`CLIPModel`, or `SiglipModel` for SigLIP towers, whose
  logit bias it keeps); a model that neither can hold exactly (e.g. CLIP towers trained with a logit
  bias) is refused with what does not fit;
* ``safetensors``: our own state dict and description.

Every export carries the tokenizer and a model card (README.md): the run config, data, steps and the
eval metrics of that step when run_dir/eval has them.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from pipeline import storage
from pipeline.data.transforms import MEAN, STD
from pipeline.layout import TOKENIZER, eval_result_url, run_dir_of_published
from pipeline.log import get_logger
from pipeline.models import convert
from pipeline.models.configs import ModelSpec
from pipeline.models.convert import (
    HF_TOKENIZER_CONFIG,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_SAFETENSORS,
    Architecture,
    ConversionError,
    export_state_dict,
    misfits,
    open_clip_model_cfg,
)
from pipeline.models.dual import DualEncoder
from pipeline.models.published import Published, load_published
from pipeline.models.text_dual import TextDualSpec

log = get_logger(__name__)

FORMATS = ("safetensors", "hf", "open_clip")
CARD = "README.md"


def export(checkpoint: str, fmt: str, out: str) -> str:
    """Write the published checkpoint `checkpoint` to the folder URL `out` in format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    published = load_published(checkpoint)
    writer: Callable[[Published, Path], str] = {"safetensors": _write_safetensors, "hf": _write_hf,
                                                "open_clip": _write_open_clip}[fmt]
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        usage = writer(published, Path(tmp))
        (Path(tmp) / TOKENIZER).write_text(published.tokenizer.to_json(), encoding="utf-8")
        (Path(tmp) / CARD).write_text(model_card(published, checkpoint, fmt, usage), encoding="utf-8")
        storage.upload_dir(tmp, out)
    log.info("exported %s as %s to %s", checkpoint, fmt, out)
    return out


def architecture(model: DualEncoder) -> Architecture:
    """The architecture of a dual encoder, as `convert` describes it."""
    return Architecture(model.spec, model.image_size, model.context_length, model.vocab_size,
                        model.logit_bias is not None)


def open_clip_config(model: DualEncoder, hf_tokenizer: bool = True) -> dict[str, Any]:
    """open_clip's `model_cfg` of a dual encoder (see `convert.open_clip_model_cfg`)."""
    return open_clip_model_cfg(architecture(model), hf_tokenizer)


def open_clip_state_dict(model: DualEncoder) -> dict[str, torch.Tensor]:
    """A dual encoder's weights under open_clip's names."""
    return export_state_dict(model.state_dict(), architecture(model), "open_clip")


def hf_config(model: DualEncoder, eot_id: int, pad_id: int) -> dict[str, Any]:
    """The `CLIPConfig` / `SiglipConfig` (as a dict) of a dual encoder, whichever holds it (`hf_format`)."""
    arch = architecture(model)
    return convert.hf_config(arch, hf_format(arch), eot_id, pad_id)


def hf_state_dict(model: DualEncoder) -> dict[str, torch.Tensor]:
    """A dual encoder's weights under `CLIPModel`'s or `SiglipModel`'s names."""
    arch = architecture(model)
    return export_state_dict(model.state_dict(), arch, hf_format(arch))


# ------------------------------------------------------------------------------------- safetensors
def _write_safetensors(published: Published, out: Path) -> str:
    model, tok = published.model, published.tokenizer
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {"model": model.describe(), "step": published.step, "eot_id": tok.eot_id, "pad_id": tok.pad_id}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return ("Our own layout: `model.safetensors` is the state dict of `pipeline.models.DualEncoder`, "
            "`config.json` its description (`DualEncoder.describe()`), `tokenizer.json` its tokenizer.")


# ------------------------------------------------------------------------------------- Hugging Face
def hf_format(arch: Architecture) -> str:
    """hf_siglip or hf_clip, whichever holds `arch` exactly; else a refusal naming what fits neither."""
    for fmt in ("hf_siglip", "hf_clip"):
        if not misfits(arch, fmt):
            return fmt
    hint = "; --format open_clip holds it" if not misfits(arch, "open_clip") else ""
    raise ConversionError("export --format hf: neither CLIPModel nor SiglipModel holds this model exactly. "
                          f"CLIPModel lacks: {'; '.join(misfits(arch, 'hf_clip'))}. SiglipModel lacks: "
                          f"{'; '.join(misfits(arch, 'hf_siglip'))}{hint}")


def _write_hf(published: Published, out: Path) -> str:
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    model, tok = published.model, published.tokenizer
    arch = architecture(model)
    fmt = hf_format(arch)
    config_cls, model_cls = (SiglipConfig, SiglipModel) if fmt == "hf_siglip" else (CLIPConfig, CLIPModel)
    hf_model = model_cls(config_cls(**convert.hf_config(arch, fmt, tok.eot_id, tok.pad_id)))
    hf_model.load_state_dict(export_state_dict(model.state_dict(), arch, fmt), strict=True)
    hf_model.save_pretrained(str(out))
    _write_hf_tokenizer_config(published, out)
    size = model.image_size
    processor = {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
                 "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
                 "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD)}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    name = model_cls.__name__
    return (f"A Hugging Face `{name}` folder:\n\n```python\nfrom transformers import AutoModel, AutoProcessor\n"
            f"model, processor = AutoModel.from_pretrained(DIR), AutoProcessor.from_pretrained(DIR)\n"
            f"inputs = processor(text=captions, images=pil_images, padding='max_length', "
            f"max_length={model.context_length}, return_tensors='pt')\n"
            f"image = model.get_image_features(pixel_values=inputs['pixel_values'])\n"
            f"text = model.get_text_features(input_ids=inputs['input_ids'])\n```\n\n"
            "(in transformers 5 the features are the outputs' `pooler_output`); normalise them to unit length.")


def _write_hf_tokenizer_config(published: Published, out: Path) -> None:
    write_hf_tokenizer_config(published.tokenizer, published.model.context_length, out)


def write_hf_tokenizer_config(tok: Any, context_length: int, out: Path) -> None:
    """tokenizer_config.json for our tokenizer `tok` (`pipeline.data.Tokenizer`): `AutoTokenizer` (and
    open_clip's HFTokenizer) load the folder's tokenizer.json as a fast tokenizer. The pre-tokenizer's
    `add_prefix_space` is spelled out: transformers 4.x's `PreTrainedTokenizerFast` otherwise rewrites it to
    False, and our byte-level BPE would encode a caption's first word without its space ("a" for "Ġa")."""
    text = tok.to_json()
    names = HFTokenizer.from_str(text)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
              "pad_token": names.id_to_token(tok.pad_id), "eos_token": names.id_to_token(tok.eot_id)}
    pre_tokenizer = json.loads(text).get("pre_tokenizer") or {}
    if "add_prefix_space" in pre_tokenizer:
        config["add_prefix_space"] = pre_tokenizer["add_prefix_space"]
    (out / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------- open_clip
def _write_open_clip(published: Published, out: Path) -> str:
    model, tok = published.model, published.tokenizer
    arch = architecture(model)
    model_cfg = open_clip_model_cfg(arch, hf_tokenizer=not tok.is_clip_bpe)
    save_file(export_state_dict(model.state_dict(), arch, "open_clip"), str(out / OPEN_CLIP_SAFETENSORS))
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"size": model.image_size, "mean": list(MEAN), "std": list(STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    _write_hf_tokenizer_config(published, out)
    which = ("its built-in CLIP BPE (this model's tokenizer)" if tok.is_clip_bpe
             else "the folder's tokenizer.json (declared by text_cfg.hf_tokenizer_name; pushed to the Hugging Face "
                  "hub, set it to the repository's id for `hf-hub:` loading)")
    return ("An open_clip hub-style folder:\n\n```python\nimport open_clip\nmodel, _, preprocess = "
            "open_clip.create_model_and_transforms('local-dir:DIR')\n"
            "tokenizer = open_clip.get_tokenizer('local-dir:DIR')\n"
            "image = model.encode_image(preprocess(pil_image)[None], normalize=True)\n"
            "text = model.encode_text(tokenizer(captions), normalize=True)\n```\n\n"
            f"open_clip tokenizes with {which}. CLIP_benchmark: `clip_benchmark eval --model local-dir:DIR "
            "--pretrained none ...`.")


# ------------------------------------------------------------------------------------- model card
def model_card(published: Published, checkpoint: str, fmt: str, usage: str) -> str:
    """README.md of an export: what the model is, how to load it, how it was trained, how it scored."""
    m, cfg = published.manifest, published.manifest.get("config") or {}
    model_cfg, data, train, loss = (cfg.get(k) or {} for k in ("model", "data", "train", "loss"))
    lines = [f"# Contrastive dual encoder, step {published.step} (`contrast export --format {fmt}`)", "",
             "## How to load", "", usage, "", "## Model", "",
             f"- {_towers(published.model.spec)}",
             f"- image size {published.image_size} px, context length {published.model.context_length} tokens, "
             f"vocabulary {published.model.vocab_size}",
             f"- {_logits(published.model)}",
             f"- started from: {model_cfg.get('init_from') or 'random initialisation'}"
             + (f" (towers: {', '.join(model_cfg.get('init_towers') or [])})" if model_cfg.get("init_from") else ""),
             "", "## Training", "",
             f"- step {published.step}, {m.get('samples_seen', 0):,} samples seen; source checkpoint `{checkpoint}`",
             f"- data: {', '.join(data.get('train_urls') or []) or 'unknown'}",
             f"- loss `{loss.get('name', '?')}`, global batch {train.get('global_batch', '?')}, "
             f"lr {train.get('lr', '?')}, {train.get('steps', '?')} steps planned",
             "", "## Evaluation", "", _metrics_table(checkpoint, published.step), "",
             "## Run config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip() if cfg else "(not recorded)",
             "```", ""]
    return "\n".join(lines)


def _logits(model: DualEncoder) -> str:
    bias = model.logit_bias
    return f"logit scale {float(model.logit_scale.detach().exp()):.3f}" + (
        f", logit bias {float(bias.detach()):.3f}" if bias is not None else "")


def _towers(spec: ModelSpec | TextDualSpec) -> str:
    def one(t: Any) -> str:
        if t.kind == "hf":
            return f"pretrained Hugging Face {t.config.get('model_type', '?')} tower"
        extra = f", patch {t.patch_size}, {t.pool} pooling" if t.kind == "vit" else f", {t.pool} pooling"
        return f"{t.layers} blocks × {t.width} wide ({t.heads} heads, {t.act}{extra})"
    if isinstance(spec, TextDualSpec):         # one encoder (or two) for queries and passages
        encoders = "one shared encoder" if spec.shared else "a query and a passage encoder"
        return f"embedding {spec.embed_dim}; text–text, {encoders}: {one(spec.tower)}"
    return f"embedding {spec.embed_dim}; image: {one(spec.image)}; text: {one(spec.text)}"


def _metrics_table(checkpoint: str, step: int) -> str:
    """The eval metrics of this step from run_dir/eval/step_N.json, as a markdown table (or why none)."""
    run_dir = run_dir_of_published(checkpoint)
    result: Optional[dict[str, Any]] = None
    if run_dir is not None and storage.exists(eval_result_url(run_dir, step)):
        result = storage.read_json(eval_result_url(run_dir, step))
    metrics = (result or {}).get("metrics") or {}
    if not metrics:
        return "No evaluation of this step was found in the run's eval/ folder (`contrast eval CHECKPOINT` writes one)."
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    return f"`contrast eval` of this step:\n\n| metric | value |\n| --- | --- |\n{rows}"
