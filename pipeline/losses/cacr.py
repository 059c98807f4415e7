"""cacr — contrastive attraction and contrastive repulsion (Zheng et al. 2021, "Contrastive Attraction
and Contrastive Repulsion for Representation Learning", arXiv 2105.03746).

With the point-to-point cost c(a, b) = ‖a − b‖² = 2 − 2a·b (unit rows), the loss moves every anchor
towards its positives and away from its negatives under two conditional distributions:
    attraction  CA_i = Σ_{p ∈ P(i)} π⁺_ip · c(u_i, v_p),   π⁺_ip ∝ exp(+t⁺ · c(u_i, v_p))  (far positives weigh more)
    repulsion   CR_i = Σ_{j ∉ P(i)} π⁻_ij · c(u_i, v_j),   π⁻_ij ∝ exp(−t⁻ · c(u_i, v_j))  (near negatives weigh more)
    L = ½ (mean_i [CA^{I→T}_i − CR^{I→T}_i] + mean_i [CA^{T→I}_i − CR^{T→I}_i]).
Here t⁻ = s/2 with s the logit scale, so π⁻_ij = softmax_j(s·u_i·v_j) over the negatives: the scale is the
repulsion temperature (Wang & Liu's knob), held fixed (`loss.learn_temperature: false`: learned, it would
only fall, since a flatter π⁻ raises the repulsion CR). One positive per anchor makes CA_i = c(u_i, v_i).
π± are differentiated (the objective as written), not stop-gradient sampling weights.

In the tiled kernel CR is three passes over the column tiles of (s·u_local)·[V; H]ᵀ:
  1. the row and column LSEs of s·u_i·v_j over the negatives (the column ones all-reduced across ranks),
  2. Σ_j exp(s·u_i·v_j − LSE_i)·c_ij per row (I→T),
  3. Σ_i exp(s·u_i·v_j − LSE_j)·c_ij per column (T→I), summed across ranks.
The LSEs enter passes 2 and 3 as per-row / per-column parameters of the term, so their gradient flows
back into pass 1. Hard negatives H are I→T columns only (as in clip); duplicate captions are left out of
the negatives.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.distributed import all_reduce_logsumexp, all_reduce_sum
from pipeline.losses.base import ContrastiveLoss, Pairs, leave_out, mask


def floor(lse: Tensor) -> Tensor:
    """An LSE with −inf (no negative at all) raised to the smallest float, so exp(−inf − it) is 0, not NaN."""
    return lse.clamp_min(torch.finfo(lse.dtype).min)


class CacrLoss(ContrastiveLoss):
    name = "cacr"
    default_temperature = 0.2    # s = 5: repulsion weights π⁻ ∝ exp(−2.5·‖u − v‖²)
    fixed_temperature = True

    def compute(self, p: Pairs) -> Tensor:
        n_all = p.V.shape[0]

        def logits(dots: Tensor, cols: slice, s: Tensor) -> Tensor:
            """s·u_i·c_j over the negatives: the row's own positive and its duplicates left out."""
            return mask(leave_out(s * dots, cols, p.rows), p.duplicates(cols))

        def weighted_cost(lse_of: str):
            def term(dots: Tensor, cols: slice, s: Tensor, lse: Tensor) -> Tensor:
                lse = lse.unsqueeze(1) if lse_of == "row" else lse[cols].unsqueeze(0)
                return torch.exp(logits(dots, cols, s) - lse) * (2 - 2 * dots)
            return term

        row_lse, col_lse = self.pairwise(p.u, p.candidates, logits, p.scale, row="lse", col="lse")
        col_lse = floor(all_reduce_logsumexp(col_lse[:n_all]))                   # (N,) LSE over all images
        repulsion_i2t, _ = self.pairwise(p.u, p.candidates, weighted_cost("row"), p.scale, floor(row_lse), row="sum")
        _, repulsion_t2i = self.pairwise(p.u, p.V, weighted_cost("col"), p.scale, col_lse, row="sum", col="sum")
        repulsion_t2i = all_reduce_sum(repulsion_t2i)[p.rows]
        attraction = 2 - 2 * (p.u * p.v).sum(1)
        return (attraction - 0.5 * (repulsion_i2t + repulsion_t2i)).mean()
