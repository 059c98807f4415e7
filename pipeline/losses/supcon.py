"""supcon and tcl — supervised contrastive losses over the 2N views Z = [u; v] with labels [y; y].

supcon (Khosla et al. 2020, "Supervised Contrastive Learning", the L_out form):
    L_i = −(1/|P(i)|) Σ_{p∈P(i)} s·z_i·z_p + LSE_{a≠i} s·z_i·z_a,   P(i) = {p ≠ i : y_p = y_i},
    L = mean over anchors with |P(i)| > 0 (counted over the global batch).
tcl (Animesh & Chandraker 2023, "Tuned Contrastive Learning", arXiv 2305.10675) changes the
denominator, per anchor:
    D_i = Σ_{p∈P(i)} exp(s·z_i·z_p) + k1·Σ_{p∈P(i)} exp(−z_i·z_p) + k2·Σ_{n: y_n≠y_i} exp(s·z_i·z_n),
computed as one LSE with ln k1, ln k2 added to their terms (k1 = 0, k2 = 1 is supcon).

Σ_{p∈P(i)} z_i·z_p = z_i·(C_{y_i} − z_i) with C_y the sum of all anchors of class y, so the
positive term costs O(N·D) and needs no pairwise matrix.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from pipeline.losses.base import ContrastiveLoss, Pairs, Views, global_mean, leave_out, mask


def duplicate_negatives(views: Views, cols: slice) -> Optional[Tensor]:
    """Anchors of another pair with the same caption and another label: false negatives, left out.
    (With the same label they are positives already.)"""
    dup = views.duplicates(cols)
    return None if dup is None else dup & (views.labels.unsqueeze(1) != views.all_labels[cols].unsqueeze(0))


def positive_sums(views: Views) -> tuple[Tensor, Tensor]:
    """(Σ_{p∈P(i)} z_i·z_p, |P(i)|) for each local anchor, P over all ranks' anchors."""
    classes, all_class = torch.unique(views.all_labels, return_inverse=True)
    my_class = all_class[views.me]
    class_sums = views.Z.new_zeros(len(classes), views.Z.shape[1]).index_add(0, all_class, views.Z)
    class_sizes = torch.bincount(all_class, minlength=len(classes))
    dots = (views.z * (class_sums[my_class] - views.z)).sum(1)
    return dots, class_sizes[my_class] - 1


class SupConLoss(ContrastiveLoss):
    name = "supcon"
    default_temperature = 0.1

    def log_denominator(self, views: Views, scale: Tensor) -> Tensor:
        """LSE_{a≠i} s·z_i·z_a over all ranks' anchors."""
        def others(x: Tensor, cols: slice) -> Tensor:
            return mask(leave_out(x, cols, views.me), duplicate_negatives(views, cols))
        return self.pairwise(views.z, views.Z, others, scale=scale)[0]

    def compute(self, p: Pairs) -> Tensor:
        views = Views.of(p)
        positive_dots, n_positives = positive_sums(views)
        per_anchor = self.log_denominator(views, p.scale) - p.scale * positive_dots / n_positives.clamp_min(1)
        return global_mean(per_anchor, n_positives > 0)


class TclLoss(SupConLoss):
    name = "tcl"

    def __init__(self, k1: float = 5000.0, k2: float = 1.0, tiled: bool = False, tile_size: int = 1024) -> None:
        super().__init__(tiled=tiled, tile_size=tile_size)
        if not (k1 >= 0 and k2 >= 0 and math.isfinite(k1) and math.isfinite(k2)):
            raise ValueError(f"tcl: k1 and k2 must be finite and >= 0, got k1={k1!r}, k2={k2!r}")
        self.k1, self.k2 = float(k1), float(k2)

    def extra_repr(self) -> str:
        return f"k1={self.k1}, k2={self.k2}, {super().extra_repr()}"

    def log_denominator(self, views: Views, scale: Tensor) -> Tensor:
        """log D_i: positives contribute exp(s·d) + k1·exp(−d), negatives k2·exp(s·d); self left out."""
        log_k1, log_k2 = (math.log(k) if k > 0 else -math.inf for k in (self.k1, self.k2))

        def term(dots: Tensor, cols: slice, s: Tensor) -> Tensor:
            same = views.labels.unsqueeze(1) == views.all_labels[cols].unsqueeze(0)
            positive = torch.logaddexp(s * dots, log_k1 - dots)
            terms = leave_out(torch.where(same, positive, log_k2 + s * dots), cols, views.me)
            return mask(terms, duplicate_negatives(views, cols))
        return self.pairwise(views.z, views.Z, term, scale)[0]
