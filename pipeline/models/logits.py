"""What every dual encoder shares on its output side: the learnable logit scale (and bias) and their start.

The scale is a parameter θ with s = exp(θ); θ starts at ln(1/τ₀) and is kept in `LOGIT_SCALE_BOUNDS`
after each optimizer step (`clamp_logit_scale`; the training engine also clamps its optimizer's
master copy). A logit bias exists for losses that use one (SigLIP).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from pipeline.losses import default_temperature, uses_bias
from pipeline.models.transformer import at_least_fp32

LOGIT_SCALE_BOUNDS = (0.0, math.log(100.0))   # θ = ln s: the scale s stays in [1, 100]


def logit_init(loss_name: str, init_temperature: Optional[float] = None) -> tuple[float, Optional[float]]:
    """(τ₀, bias₀) for a loss: its default temperature unless overridden; bias −10 if it uses one."""
    tau = init_temperature if init_temperature is not None else default_temperature(loss_name)
    return tau, (-10.0 if uses_bias(loss_name) else None)


class LearnedLogits:
    """Mixin of the dual encoders (nn.Modules): `logit_scale` θ, optional `logit_bias`, their clamp and outputs."""

    def init_logits(self: nn.Module, init_temperature: float, init_bias: Optional[float],
                    learn_temperature: bool) -> None:
        # shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters (forward returns scalars)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)),
                                        requires_grad=learn_temperature)
        if init_bias is None:
            self.register_parameter("logit_bias", None)
        else:
            self.logit_bias = nn.Parameter(torch.full((1,), float(init_bias)))

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """θ ← clamp(θ, LOGIT_SCALE_BOUNDS), in place: call after every optimizer step."""
        self.logit_scale.data.clamp_(*LOGIT_SCALE_BOUNDS)

    def logit_outputs(self) -> dict[str, Optional[Tensor]]:
        """s = exp(θ) and the bias (None without one), fp32 scalars, for the forward's output dict."""
        return {"logit_scale": at_least_fp32(self.logit_scale).exp().squeeze(0),
                "logit_bias": at_least_fp32(self.logit_bias).squeeze(0) if self.logit_bias is not None else None}
