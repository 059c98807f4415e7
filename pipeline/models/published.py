"""Published checkpoints: the artifact between training and evaluation/export.

`run_dir/published/step_{N:08d}/` holds `model.safetensors` (fp32 weights, never a pickle),
`tokenizer.json`, `manifest.json` (step, samples seen, the model description that rebuilds it, the
full run config, the sha256 of the weights) and, written last, `COMPLETE`. Readers refuse a folder
without `COMPLETE`, and weights whose hash or format is wrong.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from pipeline import storage
from pipeline.data import Tokenizer, load_tokenizer
from pipeline.layout import COMPLETE, MANIFEST, TOKENIZER, WEIGHTS
from pipeline.models.coca import CocaModel
from pipeline.models.configs import TEXT_MODEL, ModelSpec
from pipeline.models.dual import DualEncoder
from pipeline.models.text_dual import TextDualEncoder, text_model_from_description

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A published checkpoint that cannot be read; the message names the file and the problem."""


@dataclass
class Published:
    """A published checkpoint, loaded: the dual encoder (eval mode), its tokenizer and its manifest.
    A text–text checkpoint holds a `TextDualEncoder` (`encode_query`, `encode_passage`; `image_size` None)."""
    model: DualEncoder | TextDualEncoder
    tokenizer: Tokenizer
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels → (N, D) unit vectors."""
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids from `tokenizer` → (N, D) unit vectors."""
        return self.model.encode_text(tokens)

    @property
    def can_caption(self) -> bool:
        """Whether the model has a captioning decoder (CoCa) and its tokenizer a start token to begin with."""
        return isinstance(self.model, CocaModel) and self.tokenizer.sot_id is not None

    def generate_ids(self, images: torch.Tensor, max_len: int = 0, strategy: str = "greedy",
                     beams: int = 4) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels → (N, ≤ max_len) caption ids: the tokenizer's start token, the words,
        its end token, then padding (`CocaModel.generate`; `max_len` 0: the context length)."""
        if not self.can_caption:
            why = ("its model has no captioning decoder (a CoCa model.name has one)"
                   if not isinstance(self.model, CocaModel)
                   else "its tokenizer has no start token (train it with CoCa: pipeline.data.with_start_token)")
            raise ValueError(f"generate: this checkpoint cannot caption: {why}")
        tok = self.tokenizer
        return self.model.generate(images, sot_id=tok.sot_id, eot_id=tok.eot_id, pad_id=tok.pad_id,
                                   max_len=max_len or self.model.context_length, strategy=strategy, beams=beams)

    def generate(self, images: torch.Tensor, max_len: int = 0, strategy: str = "greedy", beams: int = 4) -> list[str]:
        """Captions of (N, 3, S, S) normalised pixels, as strings (greedy or beam search; see `generate_ids`)."""
        return [self.decode_caption(row) for row in self.generate_ids(images, max_len, strategy, beams)]

    def decode_caption(self, ids: torch.Tensor) -> str:
        """The text of one caption's ids: what lies between the start token and the first end token."""
        ids = ids.tolist()
        if ids and ids[0] == self.tokenizer.sot_id:
            ids = ids[1:]
        if self.tokenizer.eot_id in ids:
            ids = ids[: ids.index(self.tokenizer.eot_id)]
        return self.tokenizer.decode(ids).strip()


def save_published(model: DualEncoder | TextDualEncoder, tokenizer: Any, url: str, step: int, *, samples_seen: int = 0,
                   run_config: Any = None, state_dict: Optional[dict[str, torch.Tensor]] = None) -> str:
    """Publish `model` (or `state_dict`, e.g. gathered from ZeRO-3) with its tokenizer at `url`.

    Files are written first and `COMPLETE` last, so a concurrent reader sees all or nothing.
    `run_config` is a `Config` (or its dict). Returns `url`.
    """
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: _for_saving(v) for k, v in state.items()}
    config = run_config.to_dict() if hasattr(run_config, "to_dict") else run_config
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        weights = Path(tmp) / WEIGHTS
        save_file(tensors, str(weights), metadata={"format": "pt"})
        (Path(tmp) / TOKENIZER).write_text(tokenizer.to_json(), encoding="utf-8")
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "samples_seen": int(samples_seen),
            "model": model.describe(),
            "config": config,
            "image_size": model.image_size,
            "context_length": model.context_length,
            "sha256": {WEIGHTS: _sha256_file(weights)},
        }
        storage.write_json(str(Path(tmp) / MANIFEST), manifest)
        storage.publish_dir(tmp, url, marker={"step": int(step)})
    return url


def load_published(url: str, device: str | torch.device = "cpu") -> Published:
    """The model, tokenizer and manifest of a published checkpoint (the model in eval mode).
    Raises `CheckpointError` for an unfinished, corrupt or foreign folder."""
    manifest = read_manifest(url)
    data = _read(url, WEIGHTS)
    want = manifest.get("sha256", {}).get(WEIGHTS)
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise CheckpointError(f"{storage.join(url, WEIGHTS)}: sha256 {got[:16]}… does not match the manifest's "
                              f"{str(want)[:16]}…: the weights are corrupt or were replaced")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{storage.join(url, WEIGHTS)}: not a readable safetensors file ({e})") from None
    model = model_from_description(manifest["model"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{storage.join(url, WEIGHTS)}: weights do not fit the model in the manifest: "
                              f"{e}") from None
    tokenizer = load_tokenizer(storage.join(url, TOKENIZER), manifest["context_length"])
    return Published(model.to(device).eval(), tokenizer, manifest)


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of a complete published checkpoint (refuses a folder without `COMPLETE`)."""
    if not storage.is_complete(url):
        raise CheckpointError(f"{url}: no {COMPLETE} marker: not a published checkpoint, "
                              "or one still being written")
    manifest = storage.read_json(storage.join(url, MANIFEST)) if storage.exists(storage.join(url, MANIFEST)) else None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{storage.join(url, MANIFEST)}: missing or not a version-{FORMAT_VERSION} "
                              "published-checkpoint manifest")
    return manifest


def model_from_description(desc: dict[str, Any]) -> DualEncoder | TextDualEncoder:
    """An (untrained) dual encoder with the architecture `describe()` recorded (image–text, CoCa: a spec with a
    decoder, or text–text)."""
    if desc.get("kind") == TEXT_MODEL:
        return text_model_from_description(desc)
    spec = ModelSpec.from_dict(desc["spec"])
    cls = CocaModel if spec.decoder is not None else DualEncoder
    return cls(spec, image_size=desc["image_size"], context_length=desc["context_length"],
               vocab_size=desc["vocab_size"], init_bias=0.0 if desc["has_bias"] else None)


def _for_saving(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t.float() if t.is_floating_point() else t).contiguous()


def _read(url: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(url, name))
    except FileNotFoundError:
        raise CheckpointError(f"{storage.join(url, name)}: missing from a published checkpoint") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
