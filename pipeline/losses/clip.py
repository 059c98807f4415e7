"""clip — symmetric InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision").

    ℓ^{I→T}_i = LSE_j(s·u_i·v_j) − s·u_i·v_i,   ℓ^{T→I}_i = LSE_j(s·v_i·u_j) − s·u_i·v_i,
    L = ½ (mean_i ℓ^{I→T}_i + mean_i ℓ^{T→I}_i).

Both directions come from ONE block s·u_local·V_allᵀ: its rows give I→T for this rank's images;
its columns give, for every text, the LSE over this rank's images, which combined across ranks
(an all-reduced log-sum-exp) is T→I for the texts this rank owns. No second matmul.

With hard negatives H the I→T (query→passage) LSE runs over [V; H]; the T→I direction keeps the
positives as its anchors. `symmetric=False` keeps only I→T: the one-directional InfoNCE of text
retrievers (sentence-transformers' MultipleNegativesRankingLoss).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from pipeline.distributed import all_reduce_logsumexp
from pipeline.losses.base import ContrastiveLoss, Pairs, mask


def infonce_lse(loss: ContrastiveLoss, p: Pairs, both: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(LSE_j s·u_i·c_j over the candidates c = [V; H] for this rank's images, LSE_j s·v_i·u_j for this rank's
    texts, or None without `both`), over the global batch; the pairs of another pair with the same
    caption are left out (when `p` carries caption ids)."""
    def logits(x: Tensor, cols: slice) -> Tensor:
        return mask(x, p.duplicates(cols))
    image_to_text, text_partial = loss.pairwise(p.u, p.candidates, logits, row="lse", col="lse" if both else None,
                                                scale=p.scale)
    if not both:
        return image_to_text, None
    text_to_image = all_reduce_logsumexp(text_partial[:p.V.shape[0]])[p.rows]
    return image_to_text, text_to_image


class ClipLoss(ContrastiveLoss):
    name = "clip"
    default_temperature = 0.07

    def __init__(self, symmetric: bool = True, tiled: bool = False, tile_size: int = 1024) -> None:
        super().__init__(tiled=tiled, tile_size=tile_size)
        if not isinstance(symmetric, bool):
            raise ValueError(f"{self.name}: symmetric must be true or false, got {symmetric!r}")
        self.symmetric = symmetric

    def extra_repr(self) -> str:
        return f"symmetric={self.symmetric}, {super().extra_repr()}"

    def compute(self, p: Pairs) -> Tensor:
        image_to_text, text_to_image = infonce_lse(self, p, both=self.symmetric)
        positive = p.scale * (p.u * p.v).sum(1)
        if text_to_image is None:
            return (image_to_text - positive).mean()
        return 0.5 * ((image_to_text - positive).mean() + (text_to_image - positive).mean())
