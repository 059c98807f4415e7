"""clip — symmetric InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision").

    ℓ^{I→T}_i = LSE_j(s·u_i·v_j) − s·u_i·v_i,   ℓ^{T→I}_i = LSE_j(s·v_i·u_j) − s·u_i·v_i,
    L = ½ (mean_i ℓ^{I→T}_i + mean_i ℓ^{T→I}_i).

Both directions come from ONE block (s·u_local)·V_allᵀ: its rows give I→T for this rank's images;
its columns give, for every text, the LSE over this rank's images, which combined across ranks
(an all-reduced log-sum-exp) is T→I for the texts this rank owns. No second matmul.
"""
from __future__ import annotations

from torch import Tensor

from pipeline.distributed import all_reduce_logsumexp
from pipeline.losses.base import ContrastiveLoss, Pairs, mask


def infonce_lse(loss: ContrastiveLoss, p: Pairs) -> tuple[Tensor, Tensor]:
    """(LSE_j s·u_i·v_j for this rank's images, LSE_j s·v_i·u_j for this rank's texts), over the global
    batch; the pairs of another pair with the same caption are left out (when `p` carries caption ids)."""
    def logits(x: Tensor, cols: slice) -> Tensor:
        return mask(x, p.duplicates(cols))
    image_to_text, text_partial = loss.pairwise(p.scale * p.u, p.V, logits, row="lse", col="lse")
    text_to_image = all_reduce_logsumexp(text_partial)[p.rows]
    return image_to_text, text_to_image


class ClipLoss(ContrastiveLoss):
    name = "clip"
    default_temperature = 0.07

    def compute(self, p: Pairs) -> Tensor:
        image_to_text, text_to_image = infonce_lse(self, p)
        positive = p.scale * (p.u * p.v).sum(1)
        return 0.5 * ((image_to_text - positive).mean() + (text_to_image - positive).mean())
