"""The loss registry: names → classes, hyper-parameter validation, and the model-side defaults."""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

from torch import nn

from pipeline.config import Config, register_check
from pipeline.losses.base import ContrastiveLoss
from pipeline.losses.cacr import CacrLoss
from pipeline.losses.clip import ClipLoss
from pipeline.losses.clip_gap import ClipGapLoss
from pipeline.losses.cwcl import CwclLoss
from pipeline.losses.dcl import DclLoss, DclwLoss
from pipeline.losses.hcl import HclLoss
from pipeline.losses.isogclr import IsogclrLoss
from pipeline.losses.matryoshka import Matryoshka
from pipeline.losses.mochi import MochiLoss
from pipeline.losses.polyview import PolyviewLoss
from pipeline.losses.siglip import SiglipLoss
from pipeline.losses.supcon import SupConLoss, TclLoss

_LOSSES: dict[str, type[ContrastiveLoss]] = {
    cls.name: cls for cls in (ClipLoss, SiglipLoss, SupConLoss, TclLoss, DclLoss, DclwLoss, HclLoss, CwclLoss,
                              ClipGapLoss, CacrLoss, MochiLoss, PolyviewLoss, IsogclrLoss)
}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def _loss_class(name: str) -> type[ContrastiveLoss]:
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(LOSS_NAMES)}")
    return _LOSSES[name]


def hyper_parameters(name: str) -> tuple[str, ...]:
    """The hyper-parameters loss `name` takes (LOSSES.md), besides `tiled` and `tile_size`."""
    params = inspect.signature(_loss_class(name).__init__).parameters
    return tuple(p for p in params if p not in ("self", "tiled", "tile_size"))


def get_loss(name: str, tiled: bool = False, tile_size: int = 1024, matryoshka_dims: Optional[Sequence[int]] = None,
             **hyper) -> nn.Module:
    """Build loss `name`; `tiled=True` selects the memory-linear tiled form (same values and gradients);
    `matryoshka_dims` sums it over the embeddings truncated to each size (`Matryoshka`).

    A hyper-parameter the loss does not take is a TypeError; a value out of range a ValueError.
    """
    cls = _loss_class(name)
    allowed = hyper_parameters(name)
    unknown = sorted(set(hyper) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no hyper-parameters"
        raise TypeError(f"loss {name!r} does not take {', '.join(unknown)}; it takes {takes}")
    loss = cls(tiled=tiled, tile_size=tile_size, **hyper)
    return Matryoshka(loss, matryoshka_dims) if matryoshka_dims else loss


def default_temperature(name: str) -> float:
    """The initial temperature τ = 1/s the model should start from for this loss."""
    return _loss_class(name).default_temperature


def uses_bias(name: str) -> bool:
    """Whether the model must learn a logit bias (and pass it as `logit_bias`) for this loss."""
    return _loss_class(name).uses_bias


def uses_sample_ids(name: str) -> bool:
    """Whether the loss keeps state per sample and must be passed the batch's `sample_ids` (isogclr)."""
    return _loss_class(name).uses_sample_ids


@register_check
def check_loss_config(cfg: Config) -> list[str]:
    """`loss.name` and its hyper-parameters resolve; a loss weighted by a frozen reference tower
    (cwcl) has exactly one tower locked whole; a loss whose scale is a fixed temperature (cacr) is not
    asked to learn it; several captions per image go to a loss that takes them (polyview)."""
    loss = cfg.loss
    if loss.name not in _LOSSES:
        return [cfg.problem("loss.name", "one of " + ", ".join(LOSS_NAMES))]
    try:
        get_loss(loss.name, matryoshka_dims=loss.matryoshka_dims, **loss.hyper())
    except (TypeError, ValueError) as e:
        return [f"loss (from {cfg.origin('loss')}): {e}"]
    cls = _LOSSES[loss.name]
    if cls.fixed_temperature and loss.learn_temperature:
        why = ("learns a temperature per sample and does not use the model's logit scale (learned, it would get no "
               "gradient)" if cls.uses_sample_ids else
               "uses the logit scale as a fixed temperature (learned, it would only fall to its clamp)")
        return [f"loss.name = {loss.name!r} (from {cfg.origin('loss.name')}) {why}: set loss.learn_temperature: false"]
    if cls.uses_sample_ids and cfg.data.format != "image_text":
        return [f"loss.name = {loss.name!r} (from {cfg.origin('loss.name')}) keeps a temperature per image and per "
                f"caption, keyed by their ids: it trains on data.format: image_text, not {cfg.data.format!r}"]
    if cls.uses_sample_ids and loss.matryoshka_dims:
        return [f"loss.matryoshka_dims (from {cfg.origin('loss.matryoshka_dims')}): loss.name = {loss.name!r} keeps "
                f"one state per sample, updated once per step; it is not summed over truncated embeddings: drop "
                f"loss.matryoshka_dims"]
    k = cfg.data.captions_per_image
    if isinstance(k, int) and not isinstance(k, bool) and k > 1 and not _LOSSES[loss.name].multi_positive:
        several = ", ".join(n for n, c in _LOSSES.items() if c.multi_positive)
        return [f"data.captions_per_image = {k} (from {cfg.origin('data.captions_per_image')}): loss.name = "
                f"{loss.name!r} takes one caption per image; use {several}, or data.captions_per_image: 1"]
    frozen = cfg.model.frozen_towers()
    if _LOSSES[loss.name].uses_weights and len(frozen) != 1:
        return [f"loss.name = {loss.name!r} (from {cfg.origin('loss.name')}) weights pairs by a frozen reference "
                f"tower: lock exactly one whole tower (model.image.lock or model.text.lock, without unlock_last); "
                f"locked now: {', '.join(frozen) or 'none'}"]
    return []
