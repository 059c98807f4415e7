"""CoCa's captioning loss: token cross-entropy of the decoder's next-token logits, padding ignored.

The term is a mean over every non-padding target token of the *global* batch, so that it does not depend
on how the batch is split over ranks or gradient-cache chunks: each rank contributes
world · Σ_local CE / T_global (T_global: the global batch's target tokens, summed over ranks once per
step), which is per sample, so any chunk's part is computed by itself, and whose mean over ranks (what
DDP and DeepSpeed average) is the global mean. The train step adds `weight` times it to the contrastive
loss (CoCa's 2.0) and logs the two apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distributed import all_reduce_sum, get_world_size


class CaptionLoss:
    """`weight` × token cross-entropy (with `label_smoothing`), targets equal to `pad_id` ignored."""

    def __init__(self, weight: float = 2.0, label_smoothing: float = 0.0, pad_id: int = 0):
        if weight < 0:
            raise ValueError(f"loss.caption_weight = {weight}: expected ≥ 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss.caption_label_smoothing = {label_smoothing}: expected a fraction in [0, 1)")
        self.weight, self.label_smoothing, self.pad_id = weight, label_smoothing, pad_id

    def tokens(self, targets: Tensor) -> Tensor:
        """The global batch's number of target tokens (a collective: every rank calls it once per step)."""
        count = (targets != self.pad_id).sum().to(torch.float64)
        return all_reduce_sum(count).clamp(min=1.0)

    def __call__(self, logits: Tensor, targets: Tensor, global_tokens: Tensor) -> Tensor:
        """This rank's (unweighted) part for some of its rows: world · Σ CE / `global_tokens`, in fp32 (fp64 logits
        stay fp64). `logits` (n, L, V), `targets` (n, L)."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        ce = F.cross_entropy(logits.to(dtype).flatten(0, 1), targets.flatten(), ignore_index=self.pad_id,
                             reduction="sum", label_smoothing=self.label_smoothing)
        return ce * get_world_size() / global_tokens.to(dtype)
