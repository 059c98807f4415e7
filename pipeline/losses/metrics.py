"""Embedding geometry (Wang & Isola 2020; Wang & Liu 2021): alignment, uniformity, tolerance.

    align(u, v)  = mean_i ‖u_i − v_i‖²
    unif(x)      = log mean_{i<j} exp(−2‖x_i − x_j‖²)        (= log mean over ordered pairs i ≠ j)
    xunif(u, v)  = log mean_{i≠j} exp(−2‖u_i − v_j‖²)
    tolerance    = mean z_i·z_j over pairs i ≠ j of the same label, within each modality

‖a − b‖² is taken as 2 − 2a·b (unit rows; pdist has a NaN gradient at coincident rows), so
exp(−2‖a − b‖²) = exp(4a·b − 4). The log-means are not row-separable: each rank reduces its rows
to one LSE, the LSEs are combined across ranks, then the log of the mean is taken.
These functions are differentiable (clip_gap uses them as loss terms).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from pipeline.distributed import all_gather, all_reduce_logsumexp, all_reduce_sum, get_world_size, local_rows
from pipeline.losses.base import class_labels, leave_out
from pipeline.losses.tiled import pairwise_reduce

METRICS_TILE = 4096     # embedding_metrics runs without a graph; tiles only bound its memory


def alignment(u: Tensor, v: Tensor) -> Tensor:
    """mean_i ‖u_i − v_i‖² over this rank's rows (the rows are equal in number on every rank)."""
    return (u - v).pow(2).sum(1).mean()


def log_mean_gaussian(x: Tensor, Y: Tensor, leave: Tensor, tile_size: Optional[int] = None) -> Tensor:
    """log mean over all ranks' pairs (i, j ≠ leave_i) of exp(4 x_i·Y_j − 4); x local rows, Y gathered.

    With `leave` = the rows' own indices and Y = all x, this is unif(x); with Y = the other modality,
    xunif. The same value is returned on every rank.
    """
    def pairs(x4: Tensor, cols: slice) -> Tensor:
        return leave_out(x4, cols, leave)
    rows_lse, _ = pairwise_reduce(4 * x, Y, pairs, tile_size=tile_size)
    n = Y.shape[0]
    return all_reduce_logsumexp(torch.logsumexp(rows_lse, 0)) - 4 - math.log(n * (n - 1))


def _same_label_dots(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ x_i·x_j, number of pairs) over ordered pairs i ≠ j with equal labels, via class sums."""
    _, class_of = torch.unique(labels, return_inverse=True)
    sums = x.new_zeros(int(class_of.max()) + 1, x.shape[1]).index_add(0, class_of, x)
    sizes = torch.bincount(class_of).to(x.dtype)
    return sums.pow(2).sum() - x.pow(2).sum(), sizes.pow(2).sum() - len(x)


@torch.no_grad()
def embedding_metrics(image: Tensor, text: Tensor, labels: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Alignment, uniformity per modality and (when some pairs share a label) tolerance, over the global
    batch; every rank gets the same values. Call it on every rank, with or without labels."""
    u, v = image.detach().float(), text.detach().float()
    U, V = all_gather(torch.cat([u, v], 1)).split(u.shape[1], 1)
    mine = local_rows(len(u))
    rows = torch.arange(mine.start, mine.stop, device=u.device)
    metrics = {
        "alignment": all_reduce_sum(alignment(u, v)) / get_world_size(),
        "uniformity_image": log_mean_gaussian(u, U, rows, METRICS_TILE),
        "uniformity_text": log_mean_gaussian(v, V, rows, METRICS_TILE),
    }
    _, all_labels = class_labels(labels, len(u), u.device)     # gathered whether or not there are labels
    dots_u, pairs = _same_label_dots(U, all_labels)
    dots_v, _ = _same_label_dots(V, all_labels)
    if pairs > 0:                                              # the same answer on every rank
        metrics["tolerance"] = (dots_u + dots_v) / (2 * pairs)
    return metrics
