"""Export a text–text checkpoint as a sentence-transformers model folder, or as a plain Hugging Face folder.

`--format sentence_transformers` writes what `SentenceTransformer(DIR)` loads and gives our embeddings:

    DIR/config.json, model.safetensors     the encoder (Transformer module; also a plain Hugging Face model)
    DIR/tokenizer.json, tokenizer_config.json
    DIR/sentence_bert_config.json          max_seq_length = the run's context length
    DIR/modules.json                       Transformer → Pooling → [Dense] → Normalize
    DIR/1_Pooling/config.json              mean, CLS or last token, as trained
    DIR/2_Dense/                           the projection (only with model.projection_dim), no bias, identity
    DIR/3_Normalize/

`--format hf` writes the encoder and tokenizer alone (AutoModel / AutoTokenizer) and `embedding.json`
saying how to pool, plus `projection.safetensors` when there is a projection. With two encoders
(`model.shared_tower: false`) each format writes `DIR/query/` and `DIR/passage/`, each a whole model.
The module names are sentence-transformers' long-standing ones, which its versions 2 to 6 load.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from pipeline import storage
from pipeline.data import Tokenizer
from pipeline.layout import TOKENIZER
from pipeline.log import get_logger
from pipeline.models.export import export
from pipeline.models.published import load_published, read_manifest
from pipeline.models.text_dual import TextDualEncoder
from pipeline.models.towers import HFTower

log = get_logger(__name__)

TEXT_FORMATS = ("sentence_transformers", "hf", "safetensors")
_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}
_SPECIAL = {"pad_token": ("[PAD]", "<pad>", "<|pad|>"), "unk_token": ("[UNK]", "<unk>"),
            "cls_token": ("[CLS]", "<s>"), "sep_token": ("[SEP]", "</s>", "<end>"), "mask_token": ("[MASK]", "<mask>")}


def is_text_checkpoint(checkpoint: str) -> bool:
    """Whether a published checkpoint holds a text–text model (from its manifest alone)."""
    return read_manifest(checkpoint)["model"].get("kind") == "text"


def export_text(checkpoint: str, fmt: str, out: str) -> str:
    """Write the text–text checkpoint `checkpoint` to the folder URL `out` in format `fmt`."""
    if fmt not in TEXT_FORMATS:
        raise ValueError(f"export --format {fmt}: a text–text checkpoint exports as one of {', '.join(TEXT_FORMATS)}")
    if fmt == "safetensors":
        return export(checkpoint, fmt, out)
    published = load_published(checkpoint)
    model = published.model
    if not isinstance(model, TextDualEncoder):
        raise ValueError(f"export --format {fmt}: {checkpoint} is an image–text checkpoint; these formats are for "
                         "text–text models (model.name: text)")
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        for name, encoder in encoders(model).items():
            folder = Path(tmp, name)
            write_encoder(encoder, published.tokenizer, folder)
            if fmt == "sentence_transformers":
                write_sentence_transformers(encoder, model.context_length, folder)
            else:
                write_embedding_note(encoder, model.context_length, folder)
        storage.upload_dir(tmp, out)
    log.info("exported %s as %s to %s", checkpoint, fmt, out)
    return out


def encoders(model: TextDualEncoder) -> dict[str, HFTower]:
    """Sub-folder → encoder: the shared one at the top, else query/ and passage/."""
    if model.spec.shared:
        return {"": model.encoder}
    return {"query": model.query_encoder, "passage": model.passage_encoder}


def write_encoder(encoder: HFTower, tokenizer: Tokenizer, folder: Path) -> None:
    """The Hugging Face encoder (config.json, model.safetensors) and a fast tokenizer AutoTokenizer loads."""
    encoder.model.save_pretrained(str(folder))
    (folder / TOKENIZER).write_text(tokenizer.to_json(), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tokenizer.context_length,
              "padding_side": "right", "truncation_side": "right", **special_tokens(tokenizer)}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokenizer's special tokens by role (those its vocabulary has); the pad token is its pad id's."""
    tok = HFTokenizer.from_str(tokenizer.to_json())
    found = {role: next((n for n in names if tok.token_to_id(n) is not None), None) for role, names in _SPECIAL.items()}
    found["pad_token"] = tok.id_to_token(tokenizer.pad_id)
    return {role: name for role, name in found.items() if name is not None}


def write_sentence_transformers(encoder: HFTower, context_length: int, folder: Path) -> None:
    """modules.json and the module folders after the Transformer: Pooling, the projection as Dense, Normalize."""
    hidden = int(encoder.model.config.hidden_size)
    modules: list[dict[str, Any]] = [{"path": "", "type": "sentence_transformers.models.Transformer"},
                                     {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    _json(folder / "sentence_bert_config.json", {"max_seq_length": context_length, "do_lower_case": False})
    _json(folder / "1_Pooling" / "config.json",
          {"word_embedding_dimension": hidden, **{flag: encoder.pool == pool for pool, flag in _POOLING.items()},
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
    if encoder.proj is not None:
        modules.append({"path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        _json(folder / "2_Dense" / "config.json", {"in_features": hidden, "out_features": encoder.proj.out_features,
                                                   "bias": False,
                                                   "activation_function": "torch.nn.modules.linear.Identity"})
        save_file({"linear.weight": encoder.proj.weight.detach().float().contiguous()},
                  str(folder / "2_Dense" / "model.safetensors"))
    modules.append({"path": "3_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "3_Normalize").mkdir()
    _json(folder / "modules.json", [{"idx": i, "name": str(i), **m} for i, m in enumerate(modules)])


def write_embedding_note(encoder: HFTower, context_length: int, folder: Path) -> None:
    """How to turn the plain encoder's output into our embedding: pooling, projection, normalisation."""
    note = {"pooling": encoder.pool, "normalize": True, "max_length": context_length,
            "projection": "projection.safetensors" if encoder.proj is not None else None,
            "how": "hidden = AutoModel(input_ids, attention_mask).last_hidden_state; pool it over the non-padding "
                   "tokens as `pooling` says; multiply by projection.weight transposed when there is one; "
                   "divide by the L2 norm"}
    if encoder.proj is not None:
        save_file({"weight": encoder.proj.weight.detach().float().contiguous()}, str(folder / "projection.safetensors"))
    _json(folder / "embedding.json", note)


def _json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
