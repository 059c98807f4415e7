"""The gradient cache across two ranks: DDP and DeepSpeed ZeRO 0-3 (fp32 and bf16) on gloo.

One spawned world runs every configuration (a DeepSpeed start costs seconds); each rank takes SGD
steps through `forward_backward` on its half of a global batch, and the parent compares the
parameters after the first step with one plain single-process step over the whole global batch
(each rank's rows encoded from that rank's seed, so dropout masks agree; see test_gradcache.py).
"""
from __future__ import annotations

import functools

import pytest
import torch

from pipeline.gradcache import forward_backward
from pipeline.losses import get_loss
from pipeline.train.engine import DeepSpeedBackward, prepare_deepspeed
from tests.helpers.compare import max_abs_diff
from tests.helpers.dist import run_world
from tests.test_gradcache import (
    LR,
    TOL,
    VOCAB,
    ToyDual,
    batch,
    clip_loss,
    params,
    polyview_reference,
    reference_step,
    siglip_loss,
)

pytestmark = pytest.mark.slow

WORLD, LOCAL, SEED = 2, 6, 11
CHUNKS = dict(chunk_size=4, text_chunk_size=3)
CALLS_6_4_3 = [(slice(0, 4), None), (None, slice(0, 3)), (slice(4, 6), slice(3, 6))]   # per rank, documented order

CONFIGS = {
    "ddp": dict(wrap="ddp"),
    "ddp-dropout": dict(wrap="ddp", dropout=0.5),
    **{f"zero{s}-dropout": dict(wrap="deepspeed", stage=s, dropout=0.5) for s in range(4)},
    **{f"zero{s}-bias": dict(wrap="deepspeed", stage=s, bias=True) for s in (1, 2, 3)},
    "zero3-plain": dict(wrap="deepspeed", stage=3, chunks=dict(chunk_size=0)),
    "zero3-tiny-model": dict(wrap="deepspeed", stage=3, model="tiny", dropout=0.1),
    **{f"zero{s}-bf16": dict(wrap="deepspeed", stage=s, bf16=True, steps=5) for s in range(4)},
    # loss family II: the same exactness for cacr (three-pass tiled form) and mochi (synthetic negatives). A loss
    # only sets the cached gradients; the stage acts on the surrogate's backward after it, which the nine losses'
    # configs above cover at every stage, so these run at the two ends: no ZeRO and ZeRO-3 (sharded parameters).
    **{f"zero{s}-{loss}": dict(wrap="deepspeed", stage=s, dropout=0.5, loss=loss) for s in (0, 3)
       for loss in ("cacr", "mochi")},
    # several captions per row (polyview, k = 3: the text tower encodes 3 rows per pair, chunked across them)
    **{f"zero{s}-polyview": dict(wrap="deepspeed", stage=s, loss="polyview") for s in range(4)},
    # per-sample state (isogclr): the loss's `sample_ids` through the cache, its one call on the gathered rows
    **{f"zero{s}-isogclr": dict(wrap="deepspeed", stage=s, dropout=0.5, loss="isogclr") for s in (0, 3)},
    # train.compile: the towers compiled (inductor), dropout and patch dropout replayed through the compiled graphs;
    # without ZeRO and under ZeRO-3, whose parameter hooks the compiled graphs must keep (each compile costs ~10 s)
    **{f"zero{s}-compiled": dict(wrap="deepspeed", stage=s, model="tiny", dropout=0.1, patch_dropout=0.5, compile=True)
       for s in (0, 3)},
}


def make_model(cfg: dict) -> torch.nn.Module:
    if cfg.get("model") == "tiny":
        from pipeline.config import ModelConfig, TowerConfig
        from pipeline.models import build_model
        torch.manual_seed(0)
        return build_model(ModelConfig(name="tiny", dropout=cfg.get("dropout", 0.0), grad_checkpointing=True,
                                       image=TowerConfig(patch_dropout=cfg.get("patch_dropout", 0.0))),
                           image_size=16, context_length=8, vocab_size=64)
    return ToyDual(dropout=cfg.get("dropout", 0.0), bias=cfg.get("bias", False))


def global_batch(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    n = WORLD * LOCAL
    if cfg.get("model") == "tiny":
        g = torch.Generator().manual_seed(1)
        return torch.randn(n, 3, 16, 16, generator=g), torch.randint(1, 64, (n, 8), generator=g)
    images, texts, _ = batch(n)
    return images, texts


def more_inputs(cfg: dict) -> dict:
    """forward_backward's per-row inputs of the global batch that a loss needs: polyview's captions 2..3
    (`positives`), isogclr's image and caption ids (`sample_ids`)."""
    if cfg.get("loss") == "isogclr":
        rows = torch.arange(WORLD * LOCAL)
        return {"sample_ids": torch.stack([rows, rows + 1000], 1)}
    if cfg.get("loss") != "polyview":
        return {}
    return {"positives": torch.randint(0, VOCAB, (WORLD * LOCAL, 2, 5), generator=torch.Generator().manual_seed(7))}


def loss_of(cfg: dict):
    if "loss" in cfg:
        mixing = {"n": 4, "s": 3, "s_prime": 2} if cfg["loss"] == "mochi" else {}
        return get_loss(cfg["loss"], tiled=True, tile_size=5, **mixing)
    return siglip_loss if cfg.get("bias") else clip_loss


# ------------------------------------------------------------------------------ in the workers
def _worker(rank: int, world: int, configs: dict) -> dict:
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")          # reuses the spawned gloo group
    results = {}
    for name, cfg in configs.items():
        try:
            results[name] = _run(rank, cfg)
        except Exception as e:                            # reported by this config's test, not the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def _run(rank: int, cfg: dict) -> dict:
    model = make_model(cfg)
    images, texts = (x[rank * LOCAL:(rank + 1) * LOCAL] for x in global_batch(cfg))
    wrapped, step, read_params, backward = _wrap(model, cfg)
    if cfg.get("compile"):
        model.compile_towers()                            # as the Engine does: after DeepSpeed's hooks
    first, losses, comms = None, [], []
    if cfg["wrap"] == "ddp":
        wrapped.register_comm_hook(comms, _counting_allreduce)
    for i in range(cfg.get("steps", 1)):
        torch.manual_seed(SEED + rank)
        more = {k: v[rank * LOCAL:(rank + 1) * LOCAL] for k, v in more_inputs(cfg).items()}
        out = forward_backward(wrapped, images, texts, loss_of(cfg), backward=backward, **cfg.get("chunks", CHUNKS),
                               **more)
        step()
        losses.append(out.loss.item())
        if i == 0:
            first = read_params()
    return {"params": first, "losses": losses, "allreduces": len(comms)}


def _wrap(model, cfg):
    """(model to call, optimizer step, full fp32 parameters, Backward strategy) for DDP or a DeepSpeed engine."""
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    if cfg["wrap"] == "ddp":
        def ddp_step():
            sgd.step()
            sgd.zero_grad()
        return torch.nn.parallel.DistributedDataParallel(model), ddp_step, lambda: params(model), None
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    config = {"train_micro_batch_size_per_gpu": LOCAL, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": cfg["stage"]}, "bf16": {"enabled": cfg.get("bf16", False)},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    prepare_deepspeed(config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=config)

    def full_params():                                     # collective under ZeRO-3: every rank calls it
        out = {}
        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            out[name] = (p if full is None else full).detach().float().clone()
        return out
    return engine, engine.step, full_params, DeepSpeedBackward(engine)


def _counting_allreduce(calls: list, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    calls.append(bucket.index())
    return allreduce_hook(None, bucket)


# ------------------------------------------------------------------------------ in the parent
@pytest.fixture(scope="module")
def world_results() -> dict:
    per_rank = run_world(_worker, WORLD, CONFIGS)
    return {name: [r[name] for r in per_rank] for name in CONFIGS}


def ran(world_results: dict, name: str) -> list[dict]:
    ranks = world_results[name]
    assert all("error" not in r for r in ranks), f"{name} failed in the workers: {ranks[0].get('error')}"
    return ranks


def reference(cfg: dict) -> tuple[dict, dict]:
    """(initial parameters, parameters after one plain single-process step on the global batch)."""
    model = make_model(cfg)
    images, texts = global_batch(cfg)
    initial = params(model)
    if cfg.get("loss") == "polyview":                    # no dropout: one call per tower is the plain step
        return initial, polyview_reference(model, images, texts, more_inputs(cfg)["positives"])[1]
    calls = CALLS_6_4_3 if cfg.get("dropout") and "chunks" not in cfg else None
    loss = functools.partial(loss_of(cfg), **more_inputs(cfg))          # isogclr: the whole batch's ids
    _, after = reference_step(model, images, texts, loss, calls=calls, world=WORLD, seed=SEED)
    return initial, after


FP32 = [name for name, cfg in CONFIGS.items() if not cfg.get("bf16")]
BF16 = [name for name, cfg in CONFIGS.items() if cfg.get("bf16")]


@pytest.mark.parametrize("name", FP32)
def test_one_step_matches_plain_backward(world_results, name):
    ranks = ran(world_results, name)
    _, want = reference(CONFIGS[name])
    assert max_abs_diff(ranks[0]["params"], want) <= TOL
    assert max_abs_diff(ranks[1]["params"], ranks[0]["params"]) <= TOL


@pytest.mark.parametrize("name", BF16)
def test_bf16_trains_and_its_update_is_close(world_results, name):
    ranks = ran(world_results, name)
    initial, want = reference(CONFIGS[name])
    start = {k: v.bfloat16().float() for k, v in initial.items()}    # the engine starts from bf16 weights
    got = ranks[0]["params"]
    update = torch.cat([(got[k] - start[k]).flatten() for k in got])
    expected = torch.cat([(want[k] - initial[k]).flatten() for k in got])
    assert (update - expected).norm() <= 0.03 * expected.norm()
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0] - 0.1, losses


def test_ddp_all_reduces_once_per_step(world_results):
    """Three micro-steps, one all-reduce of each gradient bucket (the toy model fits one bucket)."""
    assert [r["allreduces"] for r in ran(world_results, "ddp")] == [1, 1]
