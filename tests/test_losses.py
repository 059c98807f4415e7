"""Loss library: LOSSES.md test vectors, gradcheck (dense and tiled), dtype behaviour, registry errors."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import LOSS_NAMES, default_temperature, get_loss, uses_bias

F64 = torch.float64


def unit(angles) -> torch.Tensor:
    a = torch.tensor(angles, dtype=F64)
    return torch.stack([a.cos(), a.sin()], 1)


U = unit([0.0, 0.6, 1.5])
V = unit([0.2, 0.4, 1.9])


def s(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("scale, expected", [(1 / 0.07, 0.238967681578), (0.0, math.log(3))])
def test_clip_vectors(tiled, scale, expected):
    loss = get_loss("clip", tiled=tiled, tile_size=2)
    assert loss(U, V, logit_scale=s(scale)).item() == pytest.approx(expected, abs=1e-11)


def test_registry_defaults():
    assert "clip" in LOSS_NAMES
    assert default_temperature("clip") == 0.07
    assert not uses_bias("clip")
    with pytest.raises(TypeError, match="does not take k1"):
        get_loss("clip", k1=3.0)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        get_loss("nope")
