"""clip_gap — CLIP plus uniformity and alignment (Fahim, Murphy & Fyshe 2024, "It's Not a Modality
Gap: Characterizing and Addressing the Contrastive Gap").

    L = clip + ½ (unif(u) + unif(v)) + align(u, v)  [+ xunif(u, v) when cross_uniformity=True]

with align, unif and xunif as in `metrics.py`. The unif/xunif log-means are over the global batch:
every rank adds the same global value, so the mean over ranks is the global loss.
"""
from __future__ import annotations

from torch import Tensor

from pipeline.losses.base import Pairs
from pipeline.losses.clip import ClipLoss
from pipeline.losses.metrics import alignment, log_mean_gaussian


class ClipGapLoss(ClipLoss):
    name = "clip_gap"

    def __init__(self, cross_uniformity: bool = False, tiled: bool = False, tile_size: int = 1024) -> None:
        super().__init__(tiled=tiled, tile_size=tile_size)
        if not isinstance(cross_uniformity, bool):
            raise ValueError(f"clip_gap: cross_uniformity must be true or false, got {cross_uniformity!r}")
        self.cross_uniformity = cross_uniformity

    def extra_repr(self) -> str:
        return f"cross_uniformity={self.cross_uniformity}, {super().extra_repr()}"

    def compute(self, p: Pairs) -> Tensor:
        tile = self.tile_size if self.tiled else None
        uniformity = 0.5 * (log_mean_gaussian(p.u, p.U, p.rows, tile) + log_mean_gaussian(p.v, p.V, p.rows, tile))
        loss = super().compute(p) + uniformity + alignment(p.u, p.v)
        if self.cross_uniformity:
            loss = loss + log_mean_gaussian(p.u, p.V, p.rows, tile)
        return loss
