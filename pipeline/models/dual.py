"""The dual encoder: two towers, L2-normalised embeddings, a learnable logit scale (and bias).

One forward entry point, `model(image=..., text=...)`, serves the train loop and the gradient
cache, so DeepSpeed ZeRO-3 gathers every parameter (the logit scale included) through module hooks.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layout import TOWERS
from pipeline.log import get_logger
from pipeline.models.configs import ModelSpec
from pipeline.models.logits import LearnedLogits
from pipeline.models.towers import build_tower, freeze
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
