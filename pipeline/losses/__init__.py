"""Contrastive losses with negatives gathered across ranks (LOSSES.md), and embedding metrics.

    from pipeline.losses import get_loss, LOSS_NAMES
    loss = get_loss("clip", tiled=False)
    value = loss(image, text, logit_scale=s, logit_bias=None, labels=None, weights_from=None)
"""
from pipeline.losses.metrics import embedding_metrics
from pipeline.losses.registry import (
    LOSS_NAMES,
    default_temperature,
    get_loss,
    hyper_parameters,
    uses_bias,
    uses_sample_ids,
)

__all__ = ["embedding_metrics", "LOSS_NAMES", "get_loss", "default_temperature", "uses_bias", "hyper_parameters",
           "uses_sample_ids"]
