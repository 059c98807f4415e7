"""The logit-scale clamp under DeepSpeed ZeRO (`train.engine.clamp_logit_scale`): the fp32 master is clamped too.

Without that, the next optimizer step copies the unclamped master back into the model and the
scale escapes [1, 100]. Two gloo ranks, so θ (one element) is partitioned under ZeRO-3.
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.models import DualEncoder, ModelSpec, TextSpec, ViTSpec
from pipeline.train.engine import clamp_logit_scale, prepare_deepspeed
from tests.helpers.dist import run_world

SPEC = ModelSpec(16, ViTSpec(width=16, layers=1, heads=2, patch_size=8), TextSpec(width=16, layers=1, heads=2))


CASES = [(1, False), (2, False), (2, True), (3, False), (3, True)]


def clamp_under_zero(rank: int, world_size: int) -> dict[tuple[int, bool], list[float]]:
    return {case: clamp_once(*case) for case in CASES}


def clamp_once(stage: int, bf16: bool) -> list[float]:
    """SGD(lr=1) with loss −1000·θ pushes θ to ≈1003; then two steps with no push. Returns s seen by
    the forward at each step, and the master θ after the last clamp."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    torch.manual_seed(0)
    model = DualEncoder(SPEC, image_size=16, context_length=8, vocab_size=20)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
              "zero_allow_untested_optimizer": True}
    prepare_deepspeed(config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)
    tokens = torch.tensor([[1, 2, 19, 0, 0, 0, 0, 0]] * 2)
    images = torch.randn(2, 3, 16, 16)
    seen = []
    for push in (1000.0, 0.0, 0.0):
        out = engine(image=images, text=tokens)        # the whole forward contract, both towers
        seen.append(float(out["logit_scale"]))
        engine.backward(-push * out["logit_scale"].log() + 0.0 * (out["image"] * out["text"]).sum())
        engine.step()
        clamp_logit_scale(engine)
    return seen + [float(safe_get_full_fp32_param(engine.module.logit_scale))]


@pytest.mark.slow
def test_clamp_reaches_the_deepspeed_master_weights():
    results = [(case, values) for rank in run_world(clamp_under_zero, 2) for case, values in rank.items()]
    assert len(results) == 2 * len(CASES)
    for _case, (seen_start, seen_after_push, seen_later, master) in results:
        assert seen_start == pytest.approx(1 / 0.07, rel=0.01)
        assert seen_after_push == pytest.approx(100.0, rel=0.02) and seen_later == pytest.approx(100.0, rel=0.02)
        assert master == pytest.approx(math.log(100), rel=1e-6)
