"""Matryoshka representation learning (Kusupati et al. 2022): one loss over nested prefixes of the embedding.

    L = Σ_{d ∈ dims} loss( ‖u_{:d}‖⁻¹·u_{:d}, ‖v_{:d}‖⁻¹·v_{:d}, negatives ‖h_{:d}‖⁻¹·h_{:d} )

so the first d coordinates of an embedding, renormalised, are an embedding of their own (cheaper
search at 64 or 128 dimensions). The wrapper is itself a loss of the embeddings, so the gradient
cache computes it once per step on the cached embeddings and replays the towers once: no extra
encoder pass per dimension (sentence-transformers needs a dedicated cached variant for this).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.base import ContrastiveLoss


def truncate(x: Tensor, dim: int) -> Tensor:
    """The first `dim` coordinates of each embedding (last axis), renormalised to unit length."""
    return F.normalize(x[..., :dim], dim=-1)


class Matryoshka(nn.Module):
    """`loss` summed over the truncations of the embeddings to each of `dims` (largest first is usual)."""

    def __init__(self, loss: ContrastiveLoss, dims: Sequence[int]):
        super().__init__()
        dims = list(dims)
        if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims) \
                or len(set(dims)) != len(dims):
            raise ValueError(f"matryoshka_dims = {dims!r}: expected distinct positive embedding sizes, "
                             "e.g. [384, 128, 64]")
        self.loss, self.dims = loss, dims

    # what the training loop and the model ask of any loss
    name = property(lambda self: self.loss.name)
    uses_bias = property(lambda self: self.loss.uses_bias)
    uses_weights = property(lambda self: self.loss.uses_weights)
    default_temperature = property(lambda self: self.loss.default_temperature)
    masks_duplicates = property(lambda self: self.loss.masks_duplicates)
    multi_positive = property(lambda self: self.loss.multi_positive)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"

    def forward(self, image: Tensor, text: Tensor, *, logit_scale: Tensor | float,
                logit_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                weights_from: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
                caption_ids: Optional[Tensor] = None, positives: Optional[Tensor] = None) -> Tensor:
        if max(self.dims) > image.shape[-1]:
            raise ValueError(f"matryoshka_dims = {self.dims}: the embeddings have only {image.shape[-1]} dimensions; "
                             f"use sizes up to {image.shape[-1]}")
        return sum(self.loss(truncate(image, d), truncate(text, d), logit_scale=logit_scale, logit_bias=logit_bias,
                             labels=labels, weights_from=weights_from, caption_ids=caption_ids,
                             negatives=None if negatives is None else truncate(negatives, d),
                             positives=None if positives is None else truncate(positives, d))
                   for d in self.dims)
