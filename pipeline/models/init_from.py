"""`model.init_from`: start a run from an existing checkpoint, its architecture and its tokenizer.

Accepted (any fsspec URL):

* an open_clip hub-style folder: `open_clip_config.json` + `open_clip_model.safetensors` (or
  `open_clip_pytorch_model.bin`); the tokenizer is the folder's own when `text_cfg.hf_tokenizer_name`
  is set, else open_clip's built-in CLIP BPE (`pipeline.data.clip_tokenizer`, the same ids);
* an open_clip training checkpoint (`epoch_N.pt`: a `state_dict`, `module.` prefixes) with
  `model.init_from_config`: the name of a public shape (ViT-B-32, ViT-B-16, ViT-L-14, each also
  `-quickgelu`) or an open_clip model-config JSON;
* a Hugging Face `CLIPModel` or `SiglipModel` folder (config.json, safetensors or a .bin, its tokenizer);
* a published checkpoint of ours (run_dir/published/step_N).

The architecture follows the checkpoint (`convert`), never `model.name`; what our towers cannot
express is refused by name. Weights are read from safetensors, or unpickled with
`torch.load(weights_only=True)`: a pickle that would run code is refused. `model.init_towers`
chooses the towers taken from the checkpoint; the others are new (`model.name`'s, or
`model.<tower>.hf_path`), projecting into the checkpoint's embedding space.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from tokenizers import Tokenizer as HFTokenizer

from pipeline import storage
from pipeline.config import Config, ConfigError, ModelConfig, register_check
from pipeline.data import Tokenizer, clip_tokenizer, data_tokenizer, with_start_token
from pipeline.layout import MANIFEST, TOKENIZER, TOWERS, WEIGHTS
from pipeline.log import get_logger
from pipeline.models.build import build_model, count_parameters, resolve_spec
from pipeline.models.coca import CocaModel
from pipeline.models.configs import NAMED_SPECS, TEXT_MODEL, DecoderSpec, ModelSpec
from pipeline.models.convert import (
    HF_CONFIG,
    HF_TOKENIZER_CONFIG,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_SAFETENSORS,
    Architecture,
    ConversionError,
    hf_architecture,
    import_state_dict,
    named_open_clip_cfg,
    open_clip_architecture,
)
from pipeline.models.dual import DualEncoder
from pipeline.models.published import CheckpointError, Published, load_published, read_manifest
from pipeline.models.text_dual import TextDualEncoder

log = get_logger(__name__)

OPEN_CLIP_WEIGHTS = (OPEN_CLIP_SAFETENSORS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class Source:
    """A checkpoint to start from, read as far as its configs: what it is, its architecture, its files."""
    url: str
    kind: str                 # open_clip folder | open_clip checkpoint | Hugging Face CLIPModel | ... | published
    fmt: str                  # the `convert` format of its weights, or "ours"
    arch: Architecture
    weights: str              # the file (or index) holding its weights
    tokenizer: str            # where its tokenizer comes from: a tokenizer.json URL, or "clip_bpe"

    def describe(self) -> str:
        return f"{self.kind} {self.url} ({storage.join(self.url, self.weights) if self.weights else self.url})"


# ------------------------------------------------------------------------------------ reading sources
@lru_cache(maxsize=16)
def inspect_source(url: str, config: Optional[str] = None) -> Source:
    """What `url` holds, from its configs only (no weights read). Raises CheckpointError / ConversionError."""
    url = str(url).rstrip("/")
    if storage.is_complete(url) and storage.exists(storage.join(url, MANIFEST)):
        m = read_manifest(url)["model"]
        arch = Architecture(ModelSpec.from_dict(m["spec"]), m["image_size"], m["context_length"], m["vocab_size"],
                            bool(m["has_bias"]))
        return Source(url, "published checkpoint", "ours", arch, WEIGHTS, storage.join(url, TOKENIZER))
    if storage.exists(storage.join(url, OPEN_CLIP_CONFIG)):
        return _open_clip_folder(url)
    if storage.exists(storage.join(url, HF_CONFIG)):
        return _hf_folder(url)
    fs, path = storage.filesystem(url)
    if fs.isfile(path):
        return _open_clip_checkpoint(url, config)
    raise CheckpointError(f"model.init_from = {url}: found no {OPEN_CLIP_CONFIG} (open_clip folder), {HF_CONFIG} "
                          "(Hugging Face CLIPModel/SiglipModel folder), published checkpoint (COMPLETE + "
                          "manifest.json) or checkpoint file there")


def _open_clip_folder(url: str) -> Source:
    where = storage.join(url, OPEN_CLIP_CONFIG)
    doc = storage.read_json(where)
    if not isinstance(doc, dict) or not isinstance(doc.get("model_cfg"), dict):
        raise CheckpointError(f"{where}: expected a mapping with 'model_cfg' (open_clip's hub-style config)")
    arch = open_clip_architecture(doc["model_cfg"], where)
    weights = next((w for w in OPEN_CLIP_WEIGHTS if storage.exists(storage.join(url, w))), None)
    if weights is None:
        raise CheckpointError(f"{url}: an open_clip folder without weights: expected one of "
                              f"{', '.join(OPEN_CLIP_WEIGHTS)}")
    tokenizer = _open_clip_tokenizer(doc["model_cfg"], url, where)
    return Source(url, "open_clip folder", "open_clip", arch, weights, tokenizer)


def _open_clip_checkpoint(url: str, config: Optional[str]) -> Source:
    if not config:
        raise CheckpointError(f"model.init_from = {url} is a checkpoint file: set model.init_from_config to its "
                              "open_clip model config, a name (ViT-B-32, ViT-B-16, ViT-L-14, or one of them + "
                              "'-quickgelu') or a model-config JSON")
    model_cfg = named_open_clip_cfg(config)
    if model_cfg is None:
        if not config.endswith(".json") or not storage.exists(config):
            raise CheckpointError(f"model.init_from_config = {config}: not a known open_clip config name (ViT-B-32, "
                                  "ViT-B-16, ViT-L-14, optionally + '-quickgelu') nor an existing JSON file")
        doc = storage.read_json(config)
        model_cfg = doc.get("model_cfg", doc) if isinstance(doc, dict) else None
        if not isinstance(model_cfg, dict):
            raise CheckpointError(f"model.init_from_config = {config}: expected an open_clip model config (a mapping)")
    arch = open_clip_architecture(model_cfg, config)
    if (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name"):
        raise CheckpointError(f"model.init_from_config = {config} names a Hugging Face tokenizer, which cannot be "
                              "fetched here: start from a hub-style folder holding it instead")
    return Source(url, "open_clip checkpoint", "open_clip", arch, "", _open_clip_tokenizer(model_cfg, url, config))


def _open_clip_tokenizer(model_cfg: dict[str, Any], url: str, where: str) -> str:
    """The folder's tokenizer.json when the config declares one, else open_clip's built-in CLIP BPE."""
    text = model_cfg.get("text_cfg") or {}
    kwargs = text.get("tokenizer_kwargs") or {}
    if text.get("hf_tokenizer_name"):
        if set(kwargs) - {"clean"} or kwargs.get("clean", "whitespace") != "whitespace":
            raise ConversionError(f"{where}: text_cfg.tokenizer_kwargs = {kwargs!r}: not supported")
        return storage.join(url, TOKENIZER)
    if kwargs and kwargs != {"clean": "lower"}:
        raise ConversionError(f"{where}: text_cfg.tokenizer_kwargs = {kwargs!r}: only open_clip's default CLIP BPE "
                              "('lower' cleaning, truncation) is supported")
    if int(text.get("vocab_size", 49408)) != 49408:
        raise ConversionError(f"{where}: text_cfg.vocab_size = {text.get('vocab_size')} without hf_tokenizer_name: "
                              "open_clip's built-in CLIP BPE has 49408 tokens")
    return "clip_bpe"


def _hf_folder(url: str) -> Source:
    try:
        from transformers import AutoConfig
    except ImportError:
        raise CheckpointError(f"model.init_from = {url} is a Hugging Face folder: reading it needs transformers "
                              "(pip install 'contrastive-pipeline[hf]')") from None
    where = storage.join(url, HF_CONFIG)
    raw = storage.read_json(where)
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind not in ("clip", "siglip"):
        raise ConversionError(f"{where}: model_type {kind!r}: expected 'clip' (CLIPModel) or 'siglip' (SiglipModel)")
    config = AutoConfig.for_model(**raw).to_dict()
    arch, fmt = hf_architecture(config, where)
    weights = next((w for w in HF_WEIGHTS if storage.exists(storage.join(url, w))), None)
    if weights is None:
        raise CheckpointError(f"{url}: a Hugging Face folder without weights: expected one of {', '.join(HF_WEIGHTS)}")
    name = {"hf_clip": "Hugging Face CLIPModel", "hf_siglip": "Hugging Face SiglipModel"}[fmt]
    return Source(url, name, fmt, arch, weights, storage.join(url, TOKENIZER))


# ------------------------------------------------------------------------------------ weights and tokenizer
def read_weights(url: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or a weights-only unpickling of a torch file (a pickle that would
    run code is refused, naming the file); open_clip's `state_dict` wrapper and `module.` prefixes removed."""
    data = storage.read_bytes(url)
    if url.endswith(".safetensors"):
        try:
            obj: Any = load_safetensors(data)
        except (SafetensorError, ValueError) as e:
            raise CheckpointError(f"{url}: not a readable safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{url}: refused: this pickle holds more than tensors and plain values, and "
                                  f"unpickling it could run code ({str(e).splitlines()[0]}). Convert it to "
                                  "safetensors where you trust it") from None
        except (RuntimeError, EOFError) as e:
            raise CheckpointError(f"{url}: not a readable torch checkpoint ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{url}: expected a state dict (names → tensors), or a checkpoint holding one "
                              "under 'state_dict'")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _source_state(source: Source) -> dict[str, torch.Tensor]:
    """The source's weights under our names, exactly (every weight used, none missing)."""
    if source.fmt == "ours":
        return load_published(source.url).model.state_dict()
    url = source.url if not source.weights else storage.join(source.url, source.weights)
    if url.endswith(".index.json"):
        files = sorted(set(storage.read_json(url)["weight_map"].values()))
        theirs = {k: v for f in files for k, v in read_weights(storage.join(source.url, f)).items()}
    else:
        theirs = read_weights(url)
    prefix = "text." if any(k.startswith("text.") for k in theirs) else ""
    return import_state_dict({k: v.float() if v.is_floating_point() else v for k, v in theirs.items()},
                             source.arch, source.fmt, url, text_prefix=prefix)


def source_tokenizer(source: Source) -> Tokenizer:
    """The tokenizer the source's text tower was trained with, at its context length."""
    context = source.arch.context_length
    if source.tokenizer == "clip_bpe":
        return clip_tokenizer(context)
    if not storage.exists(source.tokenizer):
        raise CheckpointError(f"{source.url}: no {TOKENIZER} beside the model: the text tower needs its tokenizer "
                              "(save the fast tokenizer with the model, e.g. tokenizer.save_pretrained(folder))")
    tok = HFTokenizer.from_str(storage.read_bytes(source.tokenizer).decode("utf-8"))
    pad = _declared_pad(source.url)
    if pad is not None and tok.token_to_id(pad) is not None:
        tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
    tokenizer = Tokenizer(tok, context)
    text = source.arch.spec.text
    pools_at = {"eos": getattr(text, "eos_id", None), "argmax": tokenizer.vocab_size - 1}.get(getattr(text, "pool", ""))
    if pools_at is not None and tokenizer.eot_id != pools_at:
        raise ConversionError(f"{source.tokenizer}: the text tower pools at token {pools_at} ({text.pool}), but this "
                              f"tokenizer ends rows with {tokenizer.eot_id}: they do not belong together")
    return tokenizer


def _declared_pad(url: str) -> Optional[str]:
    """The padding token a Hugging Face folder declares (tokenizer_config.json or special_tokens_map.json)."""
    for name in (HF_TOKENIZER_CONFIG, "special_tokens_map.json"):
        path = storage.join(url, name)
        if storage.exists(path):
            pad = (storage.read_json(path) or {}).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None


def load_model(url: str, config: Optional[str] = None) -> Published:
    """Any checkpoint `model.init_from` accepts, loaded whole for inference (eval mode, its own tokenizer):
    a published checkpoint as `load_published` reads it, an import with the manifest {"source", "kind"}.
    What the curation stage embeds with."""
    source = inspect_source(str(url).rstrip("/"), config)
    if source.fmt == "ours":
        return load_published(source.url)
    arch = source.arch
    cls = DualEncoder if arch.spec.decoder is None else CocaModel
    model = cls(arch.spec, image_size=arch.image_size, context_length=arch.context_length,
                vocab_size=arch.vocab_size, init_bias=0.0 if arch.has_bias else None)
    state = _source_state(source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source.url}: weights do not fit its architecture: {e}") from None
    manifest = {"step": 0, "source": source.url, "kind": source.kind, "model": model.describe()}
    return Published(model.eval(), source_tokenizer(source), manifest)


# ------------------------------------------------------------------------------------ the run's model
def run_source(cfg_model: ModelConfig) -> Optional[Source]:
    """The checkpoint of `model.init_from` (configs read), or None."""
    return inspect_source(cfg_model.init_from, cfg_model.init_from_config) if cfg_model.init_from else None


def run_spec(cfg_model: ModelConfig) -> ModelSpec:
    """The run's architecture: the imported towers from `model.init_from`, the others as configured."""
    source = run_source(cfg_model)
    if source is None:
        return resolve_spec(cfg_model)
    own = resolve_spec(cfg_model) if set(TOWERS) - set(cfg_model.init_towers) else source.arch.spec
    towers = {t: getattr(source.arch.spec if t in cfg_model.init_towers else own, t) for t in TOWERS}
    return ModelSpec(source.arch.spec.embed_dim, towers["image"], towers["text"], _run_decoder(cfg_model, source))


def _run_decoder(cfg_model: ModelConfig, source: Source) -> Optional[DecoderSpec]:
    """A CoCa run's decoder (`model.name` a CoCa one): the source's when it has one and both towers come from it
    (its weights are loaded too), else the named spec's. None for the other models."""
    named = NAMED_SPECS.get(cfg_model.name)
    if named is None or named.decoder is None:
        return None
    return source.arch.spec.decoder if _imports_decoder(cfg_model, source) else named.decoder


def _imports_decoder(cfg_model: ModelConfig, source: Source) -> bool:
    named = NAMED_SPECS.get(cfg_model.name)
    return bool(named and named.decoder and source.arch.spec.decoder is not None
                and set(cfg_model.init_towers) == set(TOWERS))


def run_sizes(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Image size, context length and vocabulary of the run's model: the imported towers' own."""
    source = run_source(cfg.model)
    imported = set(cfg.model.init_towers) if source else set()
    return {"image_size": source.arch.image_size if "image" in imported else cfg.data.image_size,
            "context_length": source.arch.context_length if "text" in imported else cfg.data.context_length,
            "vocab_size": source.arch.vocab_size if "text" in imported else vocab_size}


def run_tokenizer(cfg: Config) -> Optional[Tokenizer]:
    """The tokenizer that comes with an imported text tower; None: the data's (`data.tokenizer`). A CoCa model's
    (either) with a start token before each caption (`with_start_token`): its decoder predicts every word."""
    source = run_source(cfg.model)
    tokenizer = source_tokenizer(source) if source and "text" in cfg.model.init_towers else None
    if cfg.model.name in NAMED_SPECS and NAMED_SPECS[cfg.model.name].decoder is not None:
        tokenizer = with_start_token(tokenizer or data_tokenizer(cfg))
    return tokenizer


def build_run_model(cfg: Config, vocab_size: int, pad_id: int = 0) -> DualEncoder | TextDualEncoder:
    """The run's dual encoder: `build_model`, with the towers of `model.init_from` and their weights.

    The logit scale is the checkpoint's unless `loss.init_temperature` is set; its logit bias is kept
    when the loss uses one (else dropped), and a loss with a bias on a checkpoint without starts at −10.
    The text–text model (`model.name: text`, `pad_id` its tokenizer's padding id) starts from its
    `hf_path` encoders instead (`model.init_from` is refused for it by `check_init_from`).
    """
    if cfg.model.name == TEXT_MODEL:
        return build_model(cfg.model, image_size=cfg.data.image_size, context_length=cfg.data.context_length,
                           vocab_size=vocab_size, loss_name=cfg.loss.name, init_temperature=cfg.loss.init_temperature,
                           learn_temperature=cfg.loss.learn_temperature, pad_id=pad_id)
    source = run_source(cfg.model)
    state = _source_state(source) if source else {}      # read (and checked) before the model is allocated
    model = build_model(cfg.model, **run_sizes(cfg, vocab_size), loss_name=cfg.loss.name,
                        init_temperature=cfg.loss.init_temperature, learn_temperature=cfg.loss.learn_temperature,
                        spec=run_spec(cfg.model))
    if source is None:
        return model
    keep = tuple(f"{t}_tower." for t in cfg.model.init_towers) + (("decoder.",) if _imports_decoder(cfg.model, source)
                                                                    else ())
    wanted = {k: v for k, v in state.items() if k.startswith(keep)}
    if cfg.loss.init_temperature is None:
        wanted["logit_scale"] = state["logit_scale"]
    if model.logit_bias is not None and "logit_bias" in state:
        wanted["logit_bias"] = state["logit_bias"]
    elif "logit_bias" in state:
        log.info("init_from: the checkpoint's logit bias %.3f is dropped: loss %s uses none",
                 float(state["logit_bias"]), cfg.loss.name)
    try:
        missing, unexpected = model.load_state_dict(wanted, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"model.init_from = {source.url}: weights do not fit its architecture: {e}") from None
    missing = [k for k in missing if k.startswith(keep)]
    if missing or unexpected:
        raise CheckpointError(f"model.init_from = {source.url}: weights missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
    for tower in cfg.model.init_towers:
        log.info("%s tower: weights from %s", tower, source.describe())
    return model


def run_parameter_counts(cfg: Config, vocab_size: int) -> dict[str, int]:
    """`count_parameters` of the run's model (built on the meta device, no weights read)."""
    spec = None if cfg.model.name == TEXT_MODEL else run_spec(cfg.model)
    return count_parameters(cfg.model, **run_sizes(cfg, vocab_size), loss_name=cfg.loss.name, spec=spec)


def weight_sources(cfg: Config) -> dict[str, str]:
    """Where each tower's weights (and the tokenizer) come from, in words, for `contrast config`."""
    source = run_source(cfg.model)
    out = {}
    for tower in TOWERS:
        if source and tower in cfg.model.init_towers:
            out[tower] = f"{source.describe()}: {_shape(getattr(source.arch.spec, tower))}"
        elif cfg.model.tower(tower).hf_path:
            out[tower] = f"pretrained Hugging Face model {cfg.model.tower(tower).hf_path} (model.{tower}.hf_path)"
        else:
            out[tower] = f"new, random ({cfg.model.name}'s {tower} tower)"
        if cfg.model.tower(tower).lock:
            out[tower] += ", locked"
    if source and "text" in cfg.model.init_towers:
        out["tokenizer"] = ("open_clip's built-in CLIP BPE (49408 tokens)" if source.tokenizer == "clip_bpe"
                            else source.tokenizer)
    else:
        out["tokenizer"] = cfg.data.tokenizer or "the tokenizer.json beside the training data"
    return out


def _shape(spec: Any) -> str:
    fields = {k: v for k, v in spec.__dict__.items() if k != "kind" and not isinstance(v, dict)}
    return ", ".join(f"{k}={v}" for k, v in fields.items())


# ------------------------------------------------------------------------------------ config check
@register_check
def check_init_from(cfg: Config) -> list[str]:
    """The `model.init_*` keys agree with each other and with the data keys (no file read here: a run config
    stored in a checkpoint must stay valid where the checkpoint it started from is gone; see `check_source`)."""
    m = cfg.model
    if not m.init_from:
        return [cfg.problem("model.init_from_config", "unset without model.init_from")] if m.init_from_config else []
    if m.name == TEXT_MODEL:
        return [cfg.problem("model.init_from", "unset with model.name = text (its encoders come from "
                            "model.text.hf_path / model.image.hf_path)")]
    if not m.init_towers or set(m.init_towers) - set(TOWERS) or len(set(m.init_towers)) != len(m.init_towers):
        return [cfg.problem("model.init_towers", "a non-empty list of distinct towers among image, text")]
    problems = [cfg.problem(f"model.{tower}.hf_path", f"unset: the {tower} tower comes from model.init_from")
                for tower in m.init_towers if m.tower(tower).hf_path]
    if "text" in m.init_towers and cfg.data.tokenizer:
        problems.append(cfg.problem("data.tokenizer", "unset: the imported text tower brings its tokenizer "
                                    "(or leave text out of model.init_towers)"))
    return problems


def check_source(cfg: Config) -> None:
    """`model.init_from` is a checkpoint we can express exactly, its sizes are the data's, its tokenizer
    fits its text tower: a ConfigError listing every problem (the driver calls it before training starts)."""
    m = cfg.model
    if not m.init_from:
        return
    try:
        source = run_source(m)
    except (CheckpointError, ConversionError, OSError, json.JSONDecodeError) as e:
        raise ConfigError("invalid config:\n  - " + cfg.problem("model.init_from",
                                                               f"a checkpoint we can start from ({e})")) from None
    assert source is not None
    problems = []
    if "image" in m.init_towers and cfg.data.image_size != source.arch.image_size:
        problems.append(cfg.problem("data.image_size", f"{source.arch.image_size}, the image size of model.init_from"))
    if "text" in m.init_towers:
        if cfg.data.context_length != source.arch.context_length:
            problems.append(cfg.problem("data.context_length",
                                        f"{source.arch.context_length}, the context length of model.init_from"))
        try:
            source_tokenizer(source)
        except (CheckpointError, ConversionError, ValueError) as e:
            problems.append(cfg.problem("model.init_from", f"a text tower with its own tokenizer ({e})"))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
