"""polyview — several captions per image as positives, aggregated as MV-InfoNCE (Koromilas, Georgiou,
Bouritsas, Giannakopoulos, Nicolaou, Panagakis 2025, "A Principled Framework for Multi-View Contrastive
Learning", arXiv 2507.06979), on the image–caption pairs of CLIP.

Row i of the global batch is one image u_i and its k captions v_i^1..v_i^k (`text` is caption 1,
`positives` captions 2..k). MV-InfoNCE gives every instance ONE term (the paper's P1-P3: simultaneous
alignment, complete interactions, one term per instance): the energy of all its positive pairs over the
energy of all pairs its views take part in. In the image–caption graph (image–caption pairs only, as in clip):
    P_i = Σ_a exp(s·u_i·v_i^a)                                  (each positive pair, counted from both ends: 2 P_i)
    D_i = Σ_{j,a} exp(s·u_i·v_j^a) + Σ_a Σ_j exp(s·v_i^a·u_j)   (the image's pairs, then each caption's)
    ℓ_i = −log(2 P_i / D_i) = LSE(I→T row of u_i ∪ T→I rows of v_i^1..v_i^k) − LSE_a s·u_i·v_i^a − ln 2,
    L = mean_i ℓ_i ≥ 0.
The ratio is a probability (each positive pair is in D_i twice), so ℓ_i ≥ 0, 0 only when the positives carry
all the energy. With k = 1, ℓ_i = logaddexp(LSE_j s·u_i·v_j, LSE_j s·v_i·u_j) − s·u_i·v_i − ln 2: clip's two
directions in one log instead of averaged. Duplicate captions (`caption_ids` (n, k): rows sharing any caption)
are left out of each other's negatives, in both directions. Hard negatives (`negatives=`) are more I→T columns,
as in clip.

One pass of the tiled kernel over (s·u_local)·[V; X]ᵀ gives both parts, as in clip: its rows are the image's
LSE, its columns the per-caption LSE over this rank's images, all-reduced across ranks.
"""
from __future__ import annotations

import math

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
        image_to_text, caption_partial = self.pairwise(p.u, columns, logits, row="lse", col="lse", scale=p.scale)
        caption_lse = all_reduce_logsumexp(caption_partial[:captions])       # (N·k,) over every image
        mine = [p.rows] + [n_all + p.rows * extra + a for a in range(extra)]
        text_to_image = torch.stack([caption_lse[c] for c in mine], 1).logsumexp(1)   # LSE over the k captions
        own = p.v.unsqueeze(1) if p.x is None else torch.cat([p.v.unsqueeze(1), p.x], 1)   # (n, k, D)
        positive = (p.scale * torch.einsum("nd,nkd->nk", p.u, own)).logsumexp(1)
        return (torch.logaddexp(image_to_text, text_to_image) - positive - math.log(2)).mean()
