"""isogclr — individualized temperatures (Qiu, Hu, Yuan, Zhou, Wang, Yang 2023, "Not All Semantics are Created
Equal: Contrastive Self-supervised Learning with Automatic Temperature Individualization", ICML 2023, iSogCLR;
code: github.com/zhqiu/contrastive-learning-iSogCLR, bimodal_exps/models/losses.py `SogCLR_DRO_Loss`).

Every image i and every caption i has its own temperature τ_i, learned with the model. With
h_ij = u_i·c_j − u_i·v_i (a negative's logit over the positive's, c = [V; H]) and S_i the image's negatives
(every other column, duplicates of its caption left out), the per-sample robust (KL-DRO) objective is

    F_i(w, τ_i) = τ_i·log g_i + τ_i·ρ,   g_i = (1/|S_i|) Σ_{j∈S_i} exp(h_ij/τ_i)        (paper Eq. 4, 5)

and the same for caption i over the images (h'_ij = u_j·v_i − u_i·v_i, j ≠ i). L = mean_i F_i^I + mean_i F_i^T
(the paper sums the two sides). g_i is a mean over the dataset's negatives, estimated by a per-sample moving
average u_i (the paper's inner-function estimator, Alg. 1 line 5):

    u_i ← (1 − γ)·u_i + γ·g_i(batch),    u_i ← g_i(batch) at the sample's first visit

(the first visit as the authors' unimodal code, their 2023 bimodal code and LibAUC's GCLoss_v2, which take
γ = 1 in the first epoch; from u_i = 0 it would be γ·g_i, a first estimate 1/γ too small);

the model's gradient uses it in place of g_i (Eq. 6): ∇_w F_i ≈ τ_i·∇g_i / u_i; and τ_i follows the
gradient of F_i in τ (Eq. 7), with a momentum m_i and a projection (Alg. 1 lines 7–8, the code's update):

    G_i = log u_i + ρ − (1/u_i)·(1/|S_i|) Σ_j exp(h_ij/τ_i)·h_ij/τ_i
    m_i ← (1 − β_u)·m_i + β_u·clip(G_i, ±5),   τ_i ← Π_[τ_min, τ_max](τ_i − η·m_i)

Defaults are the paper's code's bimodal run (its README: γ = 0.8, η = 0.03 constant; `clip.py`: ρ = 8,
β_u = 0.9; the loss: τ ∈ [0.005, 1], clip 5) except τ_init = 0.07, clip's starting temperature: the paper's
0.01 is for a pretrained tower; from scratch every first visit is at τ_init and at 0.01 the demo's embeddings
collapse (docs/losses-family-ii.md, the ablation).

The returned value is Σ of τ_i·(log u_i + ρ) (the objective as estimated) and τ_i·(g_i − sg g_i)/u_i (zero,
carrying the gradient τ_i·∇g_i/u_i): its gradient is the paper's estimator. The model's logit scale takes no
part (loss.learn_temperature: false). The state (τ, log u, m per image and per caption) lives in a
`SampleTable` keyed by the batch's `sample_ids` (n, 2): the image's id and its caption's. The forward only
computes the new state; `after_step()` writes it (the train loop calls it once per optimizer step), so the
gradient cache, repeated calls or a gradcheck see one step's state.

Tiling: log g_i is a row LSE of the kernel on (u/τ)·[V; H]ᵀ (the positive's logit a per-row parameter),
the caption side one on (v/τ')·Uᵀ; the τ-gradient's Σ softmax·h/τ is one more pass per side, without
gradient. Memory O(n_local × tile); the cost is two passes with gradient (clip: one) and two without.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor

from pipeline.losses.base import ContrastiveLoss, Pairs, caption_counts, leave_out, mask
from pipeline.losses.sample_table import SampleTable
from pipeline.losses.tiled import Term

TAU, LOG_U, MOMENTUM, SIDE = range(4)    # the table's columns: one row per image id (side 0) and caption id (1)


class IsogclrLoss(ContrastiveLoss):
    name = "isogclr"
    default_temperature = 0.07           # the model's scale is not used; τ_init of the per-sample ones
    uses_sample_ids = True
    fixed_temperature = True             # the shared scale is unused: loss.learn_temperature must be false

    def __init__(self, gamma: float = 0.8, rho: float = 8.0, tau_init: float = 0.07, eta: float = 0.03,
                 beta_u: float = 0.9, tau_min: float = 0.005, tau_max: float = 1.0, grad_clip: float = 5.0,
                 tiled: bool = False, tile_size: int = 1024) -> None:
        super().__init__(tiled=tiled, tile_size=tile_size)
        for key, value, low, high in (("gamma", gamma, 0, 1), ("beta_u", beta_u, 0, 1), ("eta", eta, 0, math.inf),
                                      ("tau_min", tau_min, 0, math.inf), ("grad_clip", grad_clip, 0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low < value <= high):
                raise ValueError(f"isogclr: {key} must be a number in ({low}, {high}], got {value!r}")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"isogclr: rho must be a finite number >= 0, got {rho!r}")
        for key, value in (("tau_init", tau_init), ("tau_max", tau_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not tau_min <= value <= tau_max:
                raise ValueError(f"isogclr: {key} must be a number in [tau_min, tau_max] = [{tau_min}, {tau_max}], "
                                 f"got {value!r}")
        self.gamma, self.rho, self.eta, self.beta_u = float(gamma), float(rho), float(eta), float(beta_u)
        self.tau_init, self.tau_min, self.tau_max, self.grad_clip = float(tau_init), float(tau_min), \
            float(tau_max), float(grad_clip)
        self.table = SampleTable([self.tau_init, -math.inf, 0.0, -1.0])
        self._pending: Optional[tuple[Tensor, Tensor]] = None

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, rho={self.rho}, tau_init={self.tau_init}, eta={self.eta}, beta_u={self.beta_u}, "
                f"tau=[{self.tau_min}, {self.tau_max}], {super().extra_repr()}")

    # ------------------------------------------------------------------------------ the loss
    def compute(self, p: Pairs) -> Tensor:
        """Both sides' F_i over this rank's rows, their state looked up by id; the new state kept for `after_step`."""
        ids = p.all_sample_ids                                               # (N, 2): image id, caption id
        state = self.table.lookup(torch.cat([ids[:, 0], ids[:, 1]])).to(device=p.u.device, dtype=p.u.dtype)
        n_all = ids.shape[0]
        image_state, text_state = state[p.rows], state[n_all + p.rows]
        duplicates = 0 if p.ids is None else caption_counts(p.ids, p.all_ids) - 1
        image = self.side(p, p.u, p.candidates, p.v, image_state, p.candidates.shape[0] - 1 - duplicates)
        text = self.side(p, p.v, p.U, p.u, text_state, n_all - 1 - duplicates)
        (image_value, image_new), (text_value, text_new) = image, text
        local = p.sample_ids.to(p.u.device).long()
        sides = [torch.full_like(image_new[:, :1], side) for side in (0, 1)]
        self._pending = (torch.cat([local[:, 0], local[:, 1]]),
                         torch.cat([torch.cat([image_new, sides[0]], 1), torch.cat([text_new, sides[1]], 1)]))
        return image_value.mean() + text_value.mean()

    def side(self, p: Pairs, q: Tensor, columns: Tensor, partner: Tensor, state: Tensor,
             negatives: Tensor | int) -> tuple[Tensor, Tensor]:
        """(F_i as valued and differentiated, the new (τ, log u, m) rows) of anchors q against `columns`."""
        tau, log_u, m = state[:, :SIDE].unbind(1)
        count = torch.as_tensor(negatives, device=q.device).expand(len(q)).to(q.dtype)
        has = count > 0                                  # an anchor whose every column is its duplicate: no term
        positive = (q * partner).sum(1) / tau

        def h(dots: Tensor, cols: slice, positive: Tensor) -> Tensor:           # h_ij / τ_i, left-out pairs −inf
            return mask(leave_out(dots - positive.unsqueeze(1), cols, p.rows), p.duplicates(cols))
        lse, _ = self.pairwise(q / tau.unsqueeze(1), columns, h, positive, row="lse")
        log_g = torch.where(has, lse - count.clamp_min(1).log(), 0.0)           # with gradient
        with torch.no_grad():
            log_g0 = log_g.detach()
            mean_h = self.softmax_mean(q.detach() / tau.unsqueeze(1), columns.detach(), h, positive.detach(), lse)
            keep = math.log1p(-self.gamma) if self.gamma < 1 else -math.inf
            average = torch.logaddexp(keep + log_u, math.log(self.gamma) + log_g0)
            new_log_u = torch.where(torch.isfinite(log_u), average, log_g0)    # an unseen id: u_i = g_i
            grad_tau = new_log_u + self.rho - torch.exp(log_g0 - new_log_u) * mean_h
            new_m = (1 - self.beta_u) * m + self.beta_u * grad_tau.clamp(-self.grad_clip, self.grad_clip)
            new_tau = (tau - self.eta * new_m).clamp(self.tau_min, self.tau_max)
            new = torch.stack([torch.where(has, new_tau, tau), torch.where(has, new_log_u, log_u),
                               torch.where(has, new_m, m)], 1)
        carrier = torch.exp(log_g - new_log_u) - torch.exp(log_g0 - new_log_u)  # value 0, gradient ∇g/u
        value = tau * (new_log_u + self.rho + carrier)
        return torch.where(has, value, 0.0), new

    def softmax_mean(self, a: Tensor, columns: Tensor, h: Term, positive: Tensor, lse: Tensor) -> Tensor:
        """Σ_j softmax_j(h_ij/τ_i)·h_ij/τ_i per row, i.e. (1/(|S_i| g_i)) Σ_j exp(h_ij/τ_i)·h_ij/τ_i (no gradient)."""
        def weighted(dots: Tensor, cols: slice, positive: Tensor, lse: Tensor) -> Tensor:
            t = h(dots, cols, positive)
            return torch.where(torch.isfinite(t), torch.exp(t - lse.unsqueeze(1)) * t, 0.0)
        total, _ = self.pairwise(a, columns, weighted, positive, lse.detach(), row="sum")
        return total

    # ------------------------------------------------------------------------------ the state
    def after_step(self) -> None:
        """Write the state the last forward computed (a collective; the train loop calls it after each step)."""
        if self._pending is not None:
            self.table.write(*self._pending)
            self._pending = None

    def temperatures(self) -> dict[str, Tensor]:
        """This rank's per-sample temperatures of images and of captions (the TensorBoard histograms)."""
        values = self.table.values
        return {side: values[values[:, SIDE] == i, TAU] for i, side in enumerate(("image", "text"))}

    def sample_state(self) -> dict[str, Tensor]:
        """This rank's shard of the table, for the checkpoint."""
        return self.table.state_dict()

    def load_sample_state(self, shards: Iterable[dict[str, Tensor]]) -> None:
        """Every saved rank's shard; keeps what this rank owns now (any saved world size)."""
        self.table.load_shards(shards)
