"""mochi — clip with hard negatives mixed per anchor (Kalantidis et al. 2020, "Hard Negative Mixing for
Contrastive Learning", MoCHi).

For each anchor q (an image u_i in I→T, a text v_i in T→I) let Ñ_q be its n hardest negatives: the n
columns of the gathered global batch (plus the hard negatives, I→T) with the largest q·c_j, its own
positive and its duplicate captions left out. MoCHi adds s + s' synthetic negatives of its own:
    h_k  = normalize(α_k·n_a + (1 − α_k)·n_b),   n_a, n_b ∈ Ñ_q,  α_k ~ U(0, 1)       (k = 1..s)
    h'_k = normalize(β_k·q + (1 − β_k)·n_c),      n_c ∈ Ñ_q,       β_k ~ U(0, 0.5)     (k = 1..s')
and the anchor's InfoNCE log-sum-exp runs over its columns and its synthetic negatives:
    ℓ_i = logaddexp(LSE_j s·q_i·c_j, LSE_k s·q_i·h_ik) − s·u_i·v_i,   L = ½ (mean ℓ^{I→T} + mean ℓ^{T→I}).
The draws (which members of Ñ_q, α, β) are a function of (seed, step, global row) only: the same at any
world size, tiling or chunking. Gradients flow through the synthetic points into the negatives they mix
(in-batch negatives are trained; MoCo's queue keys, which MoCHi mixes, carry none).

Ñ_q comes from the tiled kernel's top-k (`pairwise_topk`, a selection with no gradient); the synthetic
logits are O(n_local·(s + s')·D), row-local, beside clip's single pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.base import ContrastiveLoss, Pairs, leave_out, mask
from pipeline.losses.clip import infonce_lse
from pipeline.losses.tiled import pairwise_topk


class MochiLoss(ContrastiveLoss):
    name = "mochi"
    default_temperature = 0.07

    def __init__(self, n: int = 16, s: int = 16, s_prime: int = 8, seed: int = 0, tiled: bool = False,
                 tile_size: int = 1024) -> None:
        super().__init__(tiled=tiled, tile_size=tile_size)
        for key, value, least in (("n", n, 1), ("s", s, 0), ("s_prime", s_prime, 0), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"mochi: {key} must be an integer >= {least}, got {value!r}")
        if s + s_prime == 0:
            raise ValueError("mochi: s + s_prime must be at least 1 (no synthetic negative otherwise)")
        self.n, self.s, self.s_prime, self.seed = n, s, s_prime, seed
        self.step = 0

    def extra_repr(self) -> str:
        return f"n={self.n}, s={self.s}, s_prime={self.s_prime}, seed={self.seed}, {super().extra_repr()}"

    def at_step(self, step: int) -> None:
        """Draw this step's mixing (the train loop calls it before each step)."""
        self.step = int(step)

    def draws(self, rows: int, dtype: torch.dtype, device: torch.device) -> list[dict[str, Tensor]]:
        """Per direction (I→T, T→I), for every global row: positions in Ñ (as fractions) and the weights."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) % 2**63)
        out = []
        for _ in range(2):
            d = dict(pair=torch.rand(rows, self.s, 2, generator=g, dtype=torch.float64),
                     alpha=torch.rand(rows, self.s, generator=g, dtype=torch.float64),
                     anchor_pos=torch.rand(rows, self.s_prime, generator=g, dtype=torch.float64),
                     beta=0.5 * torch.rand(rows, self.s_prime, generator=g, dtype=torch.float64))
            out.append({k: v.to(device=device, dtype=dtype) for k, v in d.items()})
        return out

    def synthetic_lse(self, p: Pairs, q: Tensor, columns: Tensor, draw: dict[str, Tensor]) -> Tensor:
        """LSE_k s·q_i·h_ik over anchor i's synthetic negatives (−inf for an anchor without negatives)."""
        k = min(self.n, columns.shape[0] - 1)

        def negatives(dots: Tensor, cols: slice) -> Tensor:
            return mask(leave_out(dots, cols, p.rows), p.duplicates(cols))
        values, hardest = pairwise_topk(q, columns, negatives, k, self.tile_size if self.tiled else None)
        count = torch.isfinite(values).sum(1, keepdim=True)                       # |Ñ_q| per anchor

        def member(fraction: Tensor) -> Tensor:                                  # fraction ∈ [0, 1) → a member
            pos = (fraction * count.unsqueeze(-1) if fraction.ndim == 3 else fraction * count).long()
            pos = pos.clamp(max=(count - 1).clamp_min(0).reshape(-1, *([1] * (pos.ndim - 1))))
            return columns[hardest.gather(1, pos.reshape(len(q), -1)).reshape(pos.shape)]
        mixed = []
        if self.s:
            a, b = member(draw["pair"]).unbind(2)
            alpha = draw["alpha"].unsqueeze(-1)
            mixed.append(F.normalize(alpha * a + (1 - alpha) * b, dim=-1))
        if self.s_prime:
            beta = draw["beta"].unsqueeze(-1)
            mixed.append(F.normalize(beta * q.unsqueeze(1) + (1 - beta) * member(draw["anchor_pos"]), dim=-1))
        logits = p.scale * torch.einsum("nd,nkd->nk", q, torch.cat(mixed, 1))
        return torch.where(count > 0, logits, -math.inf).logsumexp(1)

    def compute(self, p: Pairs) -> Tensor:
        image_to_text, text_to_image = infonce_lse(self, p)
        i2t, t2i = (
            {key: value[p.rows] for key, value in d.items()}
            for d in self.draws(p.N, p.u.dtype, p.u.device))
        image_to_text = torch.logaddexp(image_to_text, self.synthetic_lse(p, p.u, p.candidates, i2t))
        text_to_image = torch.logaddexp(text_to_image, self.synthetic_lse(p, p.v, p.U, t2i))
        positive = p.scale * (p.u * p.v).sum(1)
        return 0.5 * ((image_to_text - positive).mean() + (text_to_image - positive).mean())
