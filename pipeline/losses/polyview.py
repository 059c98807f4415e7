"""polyview — several captions per image as positives, aggregated as MV-InfoNCE (Koromilas, Georgiou,
Bouritsas, Giannakopoulos, Nicolaou, Panagakis 2025, "A Principled Framework for Multi-View Contrastive
Learning", arXiv 2507.06979), restricted to the cross-modal pairs of CLIP.

Row i of the global batch is one image u_i and its k captions v_i^1..v_i^k (`text` is caption 1,
`positives` captions 2..k). MV-InfoNCE puts every positive pair of an instance in ONE term, the instance's
alignment energy, against each view's energy over all the other embeddings (the paper's P1-P3: simultaneous
alignment, complete interactions, one term per instance). In the image-caption graph (image–caption pairs
only, as in clip):
    P_i   = LSE_a s·u_i·v_i^a                                   (the k positives, in one log-sum-exp)
    ℓ^I_i = LSE_{j,a} s·u_i·v_j^a − P_i                          (the image's energy over all N·k captions)
    ℓ^T_i = (1/k) Σ_a LSE_j s·v_i^a·u_j − P_i                    (each caption's energy over all N images)
    L = ½ (mean_i ℓ^I_i + mean_i ℓ^T_i).
With k = 1 this is exactly clip. (The paper's code counts the ordered pairs of the numerator, a constant
log 2 here, left out.) Duplicate captions (`caption_ids` (n, k): rows sharing any caption) are left out of
each other's negatives, in both directions. Hard negatives (`negatives=`) are more I→T columns, as in clip.

One pass of the tiled kernel over (s·u_local)·[V; X]ᵀ gives both directions, as in clip: its rows are ℓ^I's
LSE, its columns the per-caption LSE over this rank's images, all-reduced across ranks for ℓ^T.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.distributed import all_reduce_logsumexp
from pipeline.losses.base import ContrastiveLoss, Pairs, mask


class PolyviewLoss(ContrastiveLoss):
    name = "polyview"
    default_temperature = 0.07
    multi_positive = True

    def compute(self, p: Pairs) -> Tensor:
        n_all = p.V.shape[0]
        extra = 0 if p.X is None else p.X.shape[0] // n_all                 # k − 1
        captions = n_all * (1 + extra)
        # columns: every caption (V, then X row-major), then the hard negatives (I→T only, never masked)
        columns = torch.cat([c for c in (p.V, p.X, p.H) if c is not None])
        everyone = torch.arange(n_all, device=p.u.device)
        owner = torch.cat([everyone, everyone.repeat_interleave(extra),
                           everyone.new_full((columns.shape[0] - captions,), -1)])

        def logits(dots: Tensor, cols: slice) -> Tensor:
            if p.ids is None:
                return dots
            who = owner[cols]
            group = torch.where(who >= 0, p.all_ids[who.clamp_min(0)], -1)     # groups are >= 0
            return mask(dots, (p.ids.unsqueeze(1) == group.unsqueeze(0)) & (p.rows.unsqueeze(1) != who.unsqueeze(0)))
        image_to_text, caption_partial = self.pairwise(p.scale * p.u, columns, logits, row="lse", col="lse")
        caption_lse = all_reduce_logsumexp(caption_partial[:captions])       # (N·k,) over every image
        mine = [p.rows] + [n_all + p.rows * extra + a for a in range(extra)]
        text_to_image = torch.stack([caption_lse[c] for c in mine], 1).mean(1)
        own = p.v.unsqueeze(1) if p.x is None else torch.cat([p.v.unsqueeze(1), p.x], 1)   # (n, k, D)
        positive = (p.scale * torch.einsum("nd,nkd->nk", p.u, own)).logsumexp(1)
        return 0.5 * ((image_to_text - positive).mean() + (text_to_image - positive).mean())
