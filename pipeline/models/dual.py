"""The dual encoder: two towers, L2-normalised embeddings, a learnable logit scale (and bias).

One forward entry point, `model(image=..., text=...)`, serves the train loop and the gradient
cache, so DeepSpeed ZeRO-3 gathers every parameter (the logit scale included) through module hooks.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.layout import TOWERS
from pipeline.log import get_logger
from pipeline.models.configs import TEXT_MODEL, ModelSpec, named_spec
from pipeline.models.logits import LearnedLogits, logit_init
from pipeline.models.text_dual import TextDualEncoder, build_text_model
from pipeline.models.towers import build_tower, freeze, read_hf_spec
from pipeline.models.transformer import at_least_fp32

log = get_logger(__name__)


class DualEncoder(LearnedLogits, nn.Module):
    """Image and text towers whose normalised embeddings meet in one `embed_dim` space.

    The logit scale is a parameter θ with s = exp(θ); θ starts at ln(1/τ₀) and is kept in
    `LOGIT_SCALE_BOUNDS` after each optimizer step (`clamp_logit_scale`; the training engine also
    clamps its optimizer's master copy). `logit_bias` exists for losses that use one (SigLIP), else it is None.
    """

    def __init__(self, spec: ModelSpec, *, image_size: int, context_length: int, vocab_size: int,
                 dropout: float = 0.0, init_temperature: float = 0.07, init_bias: Optional[float] = None,
                 learn_temperature: bool = True, patch_dropout: float = 0.0):
        super().__init__()
        self.spec = spec
        self.image_size = image_size
        self.context_length = context_length
        self.vocab_size = vocab_size
        sizes = dict(image_size=image_size, context_length=context_length, vocab_size=vocab_size,
                     embed_dim=spec.embed_dim, dropout=dropout)
        self.image_tower = build_tower(spec.image, "image", patch_dropout=patch_dropout, **sizes)
        self.text_tower = build_tower(spec.text, "text", **sizes)
        self.init_logits(init_temperature, init_bias, learn_temperature)
        self.locked_towers: set[str] = set()

    # ------------------------------------------------------------------------------ encoding
    def tower(self, name: str) -> nn.Module:
        if name not in TOWERS:
            raise ValueError(f"unknown tower {name!r}; expected one of {TOWERS}")
        return self.image_tower if name == "image" else self.text_tower

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels → (N, D) unit vectors (fp32)."""
        self.check_images(images)
        return self._encode("image", images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids, L ≤ context length → (N, D) unit vectors (fp32)."""
        self.check_tokens(tokens)
        return self._encode("text", tokens)

    def check_images(self, images: torch.Tensor) -> None:
        """A readable error for images this model cannot encode."""
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"encode_image: expected images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """A readable error for token ids this model cannot encode."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(f"encode_text: expected integer token ids of shape (N, L ≤ {self.context_length}), "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() and not tokens.is_meta and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"encode_text: token ids must lie in [0, {self.vocab_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]: was the text tokenised with this "
                             f"model's tokenizer?")

    def _encode(self, name: str, x: torch.Tensor) -> torch.Tensor:
        frozen = torch.no_grad() if name in self.locked_towers else contextlib.nullcontext()
        with frozen:
            features = self.tower(name)(x)
        return F.normalize(at_least_fp32(features), dim=-1)

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Embeddings of whichever inputs are given, plus s = exp(θ) and the bias (None without one)."""
        return {
            "image": self.encode_image(image) if image is not None else None,
            "text": self.encode_text(text) if text is not None else None,
            **self.logit_outputs(),
        }

    # ------------------------------------------------------------------------------ training
    def lock(self, name: str, unlock_last: int = 0) -> None:
        """Freeze a tower (LiT); with `unlock_last = n` its last n blocks and what follows them train.

        A fully frozen tower runs without a graph and in eval mode, and is listed in `locked_towers`.
        """
        tower = self.tower(name)
        freeze(tower, unlock_last, f"model.{name}")
        if unlock_last == 0:
            self.locked_towers.add(name)
            tower.eval()

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        for name in self.locked_towers:
            self.tower(name).eval()                       # no dropout in a frozen tower
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (memory for compute), in both towers."""
        for tower in (self.image_tower, self.text_tower):
            if hasattr(tower, "transformer"):
                tower.transformer.grad_checkpointing = enabled
            else:
                tower.set_grad_checkpointing(enabled)

    def compile_towers(self, **options: Any) -> None:
        """`torch.compile` each tower in place (`nn.Module.compile`: parameter names unchanged, so
        checkpoints and published weights are those of the plain model). `options` go to torch.compile.

        Random operators (dropout, patch dropout) keep eager mode's kernels (inductor's
        `fallback_random`): drawn from the default generator as in eager mode, so the gradient cache's
        RNG replay gives its second pass the masks of the first, and a compiled step equals an eager one.
        """
        import torch._inductor.config as inductor
        inductor.fallback_random = True
        for tower in (self.image_tower, self.text_tower):
            tower.compile(**options)

    def describe(self) -> dict[str, Any]:
        """What rebuilds this model: the spec, the data-dependent sizes, the scale/bias setup."""
        return {"spec": self.spec.to_dict(), "image_size": self.image_size, "context_length": self.context_length,
                "vocab_size": self.vocab_size, "has_bias": self.logit_bias is not None}


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
        from pipeline.models.coca import CocaModel
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

