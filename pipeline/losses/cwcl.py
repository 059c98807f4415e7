"""cwcl — continuously weighted contrastive loss (Srinivasa et al. 2023, "CWCL: Cross-Modal Transfer
with Continuously Weighted Contrastive Loss").

With a = `weights_from` (the frozen / reference modality, rows L2-normalised) and w_ij = (a_i·a_j + 1)/2
(no gradient):
    L^{U→V} = (1/N) Σ_i [ LSE_j(s·u_i·v_j) − Σ_j w_ij·s·u_i·v_j / Σ_j w_ij ],
L^{V→U} the same with u and v swapped (same w), L = ½ (L^{U→V} + L^{V→U}); w = I gives clip.

The weights factor as w_ij = f_i·f_j with f_i = [a_i, 1]/√2, so the weighted sum is bilinear:
Σ_j w_ij·u_i·v_j = f_iᵀ (F_allᵀ V_all) u_i — O(N·D·D') and no pairwise matrix. The LSEs are clip's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.base import ContrastiveLoss, Pairs
from pipeline.losses.clip import infonce_lse


def weight_factors(a: Tensor) -> Tensor:
    """f with f_i·f_j = (cos(a_i, a_j) + 1)/2 ∈ [0, 1] (a is normalised here, so w_ii = 1 and Σ_j w_ij ≥ 1)."""
    a = F.normalize(a, dim=1)
    return torch.cat([a, torch.ones_like(a[:, :1])], 1) / math.sqrt(2)


class CwclLoss(ContrastiveLoss):
    name = "cwcl"
    default_temperature = 0.07
    uses_weights = True
    masks_duplicates = False     # its weights already count pairs with like references as positives
    factors = staticmethod(weight_factors)

    def compute(self, p: Pairs) -> Tensor:
        f, f_all = self.factors(p.weights), self.factors(p.all_weights)
        row_weight = f @ f_all.sum(0)                                        # Σ_j w_ij
        image_to_text, text_to_image = infonce_lse(self, p)
        weighted_i2t = p.scale * ((f @ (f_all.T @ p.V)) * p.u).sum(1) / row_weight
        weighted_t2i = p.scale * ((f @ (f_all.T @ p.U)) * p.v).sum(1) / row_weight
        return 0.5 * ((image_to_text - weighted_i2t).mean() + (text_to_image - weighted_t2i).mean())
