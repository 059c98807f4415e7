"""hcl — contrastive learning with hard negative samples (Robinson et al. 2021, arXiv 2010.04592).

Over the 2N anchors Z = [u; v] with t = 1/s, positive z_i⁺ (the other view) and the M = 2N − 2
other anchors as negatives (with caption ids, less both views of every other pair with the same
caption: M_i per anchor), importance weights ω_ij = softmax_j(β·z_i·z_j/t) give
    Ng_i = max( M/(1−τ⁺) · (Σ_j ω_ij e^{z_i·z_j/t} − τ⁺·e^{z_i·z_i⁺/t}),  M·e^{−1/t} ),
    L = mean_i −log( e^{z_i·z_i⁺/t} / (e^{z_i·z_i⁺/t} + Ng_i) ).
In log space: log Σ_j ω_ij e^{x_ij} = LSE_j((β+1)·x_ij) − LSE_j(β·x_ij) with x = s·z_i·z_j, and the
debiasing subtraction is done as log(e^A − τ⁺e^P) = A + log(−expm1(P − A + ln τ⁺)), which is only
taken where it is positive; elsewhere the floor M·e^{−s} wins.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.losses.base import ContrastiveLoss, Pairs, Views, caption_counts, leave_out, mask


class HclLoss(ContrastiveLoss):
    name = "hcl"
    default_temperature = 0.5

    def __init__(self, beta: float = 1.0, tau_plus: float = 0.1, tiled: bool = False, tile_size: int = 1024) -> None:
        super().__init__(tiled=tiled, tile_size=tile_size)
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"hcl: beta must be finite and >= 0, got {beta!r}")
        if not 0 <= tau_plus < 1:
            raise ValueError(f"hcl: tau_plus must be in [0, 1), got {tau_plus!r}")
        self.beta, self.tau_plus = float(beta), float(tau_plus)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, tau_plus={self.tau_plus}, {super().extra_repr()}"

    def compute(self, p: Pairs) -> Tensor:
        views = Views.of(p)

        def negatives(x: Tensor, cols: slice) -> Tensor:
            return mask(leave_out(x, cols, views.me, views.partner), views.duplicates(cols))

        def negatives_lse(factor: float) -> Tensor:                 # LSE_j factor·x_ij over the negatives
            return self.pairwise(views.z, views.Z, negatives, scale=factor * p.scale)[0]

        log_m = self._log_negative_counts(p).repeat(2)
        positive = p.scale * (views.z * views.partner_z).sum(1)
        log_reweighted = negatives_lse(self.beta + 1) - negatives_lse(self.beta)   # log Σ_j ω_ij e^{x_ij}
        log_negatives = torch.maximum(log_m - p.scale, log_m - math.log(1 - self.tau_plus)
                                      + self._log_debiased(log_reweighted, positive))
        return (torch.logaddexp(positive, log_negatives) - positive).mean()

    @staticmethod
    def _log_negative_counts(p: Pairs) -> Tensor:
        """log M_i per local pair: M = 2N − 2 (+ the N·k hard negatives), less the two views of every other
        pair with its caption."""
        hard = 0 if p.H is None else p.H.shape[0]
        m = torch.full_like(p.u[:, 0], 2.0 * p.N - 2 + hard)
        if p.ids is not None:
            m = m - 2 * (caption_counts(p.ids, p.all_ids) - 1)
        return m.log()

    def _log_debiased(self, a: Tensor, positive: Tensor) -> Tensor:
        """log(e^a − τ⁺·e^positive), or −inf where that is not positive."""
        if self.tau_plus == 0:
            return a
        delta = positive - a + math.log(self.tau_plus)
        safe = delta.clamp_max(-1e-30)               # keeps the unused branch finite (no NaN gradient)
        return torch.where(delta < 0, a + torch.log(-torch.expm1(safe)), -math.inf)
