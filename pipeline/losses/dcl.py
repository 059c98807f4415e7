"""dcl and dclw — Decoupled Contrastive Learning (Yeh et al. 2021, arXiv 2110.06848).

The positive is removed from the denominator. Over the 2N anchors Z = [u; v], with z_i⁺ the other
view of anchor i:
    l_i = −w_i·s·z_i·z_i⁺ + LSE_{j ∉ {i, i⁺}} s·z_i·z_j,     L = mean_i l_i
(= ½ (mean l^I + mean l^T) since both halves have N anchors).
dcl: w_i = 1. dclw: w_i = 2 − N·softmax_i(u_i·v_i / σ) over the GLOBAL batch, detached.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.distributed import all_reduce_logsumexp
from pipeline.losses.base import ContrastiveLoss, Pairs, Views, leave_out, mask


class DclLoss(ContrastiveLoss):
    name = "dcl"
    default_temperature = 0.1

    def positive_weights(self, p: Pairs) -> Tensor:
        """w_i per local pair (shared by its two anchors)."""
        return torch.ones_like(p.u[:, 0])

    def compute(self, p: Pairs) -> Tensor:
        views = Views.of(p)

        def negatives(x: Tensor, cols: slice) -> Tensor:
            return mask(leave_out(x, cols, views.me, views.partner), views.duplicates(cols))
        log_negatives, _ = self.pairwise(views.z, views.Z, negatives, scale=p.scale)
        weights = self.positive_weights(p).repeat(2)
        positive = p.scale * (views.z * views.partner_z).sum(1)
        return (log_negatives - weights * positive).mean()


class DclwLoss(DclLoss):
    name = "dclw"

    def __init__(self, sigma: float = 0.5, tiled: bool = False, tile_size: int = 1024) -> None:
        super().__init__(tiled=tiled, tile_size=tile_size)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"dclw: sigma must be a positive number, got {sigma!r}")
        self.sigma = float(sigma)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, {super().extra_repr()}"

    def positive_weights(self, p: Pairs) -> Tensor:
        """w_i = 2 − N·softmax_i(u_i·v_i/σ), the softmax normalised over all ranks' pairs; no gradient."""
        x = (p.u * p.v).sum(1).detach() / self.sigma
        log_total = all_reduce_logsumexp(torch.logsumexp(x, 0))
        return 2 - torch.exp(x - log_total + math.log(p.N))
