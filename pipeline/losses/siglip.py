"""siglip — pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

    L = −(1/N) Σ_i Σ_j log σ(z_ij·(t·u_i·v_j + b)),   z_ii = +1, z_ij = −1 (i ≠ j).

With x_ij = t·u_i·v_j + b, −log σ(−x) = softplus(x) and −log σ(x) = softplus(x) − x, so row i is
Σ_j softplus(x_ij) − x_ii: a plain sum over the columns (the global texts), then the local positive.
Hard negatives are more columns with z = −1: the sum runs over [V; H].
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.base import ContrastiveLoss, Pairs, mask


class SiglipLoss(ContrastiveLoss):
    name = "siglip"
    default_temperature = 0.1    # t = 10, with b = −10
    uses_bias = True

    def compute(self, p: Pairs) -> Tensor:
        def softplus_logits(x: Tensor, cols: slice, bias: Tensor) -> Tensor:
            """softplus(t·u_i·c_j + b), with x = t·u_i·c_j; 0 for another pair with the same caption."""
            return mask(F.softplus(x + bias), p.duplicates(cols), 0.0)
        negatives_and_positive, _ = self.pairwise(p.u, p.candidates, softplus_logits, p.bias, row="sum",
                                                  scale=p.scale)
        positive = p.scale * (p.u * p.v).sum(1) + p.bias
        return (negatives_and_positive - positive).mean()
