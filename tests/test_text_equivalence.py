"""The gradient cache at world sizes 1, 2 and 4 under DeepSpeed ZeRO 0–3, for text–text with hard negatives
and for CoCa (contrastive + caption loss): one SGD step (lr 1, so the update is the gradient; Adam would hide
a wrong scale) gives the parameters of one plain single-process step over the whole global batch. Each rank
takes its rows of the global batch; the hard negatives are gathered with their rows, so every row keeps its
own negatives at any world size; CoCa's caption loss is the mean over the global batch's target tokens,
whatever the split. Also the loss values and gradients of every loss with hard negatives across ranks (no
DeepSpeed)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.gradcache import forward_backward
from pipeline.losses import LOSS_NAMES, get_loss, uses_bias
from pipeline.losses.caption import CaptionLoss
from pipeline.models import build_model
from pipeline.train.engine import DeepSpeedBackward, prepare_deepspeed
from tests.helpers.compare import max_abs_diff
from tests.helpers.dist import run_world
from tests.helpers.text import text_config, tiny_bert
from tests.test_coca import batch as coca_batch
from tests.test_coca import coca
from tests.test_coca import params as tc_params
from tests.test_coca import reference_step as coca_reference_step
from tests.test_losses import SETUPS, per_sample

pytestmark = pytest.mark.slow

N, K, L = 8, 2, 10                                  # global rows, hard negatives per row, tokens
CHUNKS = dict(chunk_size=1, text_chunk_size=3)
CONFIGS = {
    **{f"zero{s}": dict(stage=s, loss="clip") for s in range(4)},
    "zero2-siglip-two-towers-matryoshka": dict(stage=2, loss="siglip", overrides=["model.shared_tower=false",
                                                                                "model.projection_dim=8"],
                                               matryoshka=[8, 4], worlds=(2,)),
    # CoCa (coca_tiny, 8 rows, one row per gradient-cache chunk) against a float64 reference: the model in float64
    # (its update rounded to ZeRO's float32 master copy) under ZeRO 1 and 2. ZeRO 0's all-reduce refuses float64
    # gradients; ZeRO 3 hands the optimizer's dtype to `zero.Init`, which refuses float64 where the accelerator
    # reports fp16 support (a CPU with AVX512-FP16): those two run in float32.
    **{f"coca-zero{s}": dict(kind="coca", stage=s, loss="clip", dtype="float64" if s in (1, 2) else "float32")
       for s in range(4)},
    "coca-zero2-siglip-smoothing": dict(kind="coca", stage=2, loss="siglip", dtype="float64", caption_weight=0.5,
                                        smoothing=0.1, worlds=(4,)),
}
COCA_CHUNKS = dict(chunk_size=1)


def make_model(bert: str, cfg: dict):
    if cfg.get("kind") == "coca":                         # seeded, float64
        return coca(loss_name=cfg["loss"]).to(getattr(torch, cfg["dtype"]))
    torch.manual_seed(0)                                  # the projection's initial weights, alike everywhere
    overrides = [f"loss.name={cfg['loss']}", *cfg.get("overrides", [])]
    return build_model(text_config(bert, *overrides).model, image_size=0, context_length=L, vocab_size=64,
                       loss_name=cfg["loss"])


def make_loss(cfg: dict):
    return get_loss(cfg["loss"], matryoshka_dims=cfg.get("matryoshka"))


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    q, p, neg = (torch.randint(1, 64, shape, generator=g) for shape in ((N, L), (N, L), (N, K, L)))
    for t in (q, p, neg.view(-1, L)):
        t[::3, 6:] = 0                                   # some padded rows
    return q, p, neg


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.named_parameters()}


def caption_loss(cfg: dict) -> CaptionLoss:
    return CaptionLoss(cfg.get("caption_weight", 2.0), cfg.get("smoothing", 0.0), pad_id=0)


# ------------------------------------------------------------------------------ in the workers
def _worker(rank: int, world: int, bert: str, configs: dict) -> dict:
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    rows = slice(rank * (N // world), (rank + 1) * (N // world))
    q, p, neg = (x[rows] for x in global_batch())
    images, captions = (x[rows] for x in coca_batch())
    results = {"losses": _loss_partials(rank, world)}
    for name, cfg in configs.items():
        if world not in cfg.get("worlds", (world,)):
            continue
        try:
            engine, read = _engine(make_model(bert, cfg), cfg["stage"], N // world)
            if cfg.get("kind") == "coca":
                out = forward_backward(engine, images.to(getattr(torch, cfg["dtype"])), captions, make_loss(cfg),
                                       caption=caption_loss(cfg), backward=DeepSpeedBackward(engine), **COCA_CHUNKS)
            else:
                out = forward_backward(engine, q, p, make_loss(cfg), negatives=neg, backward=DeepSpeedBackward(engine),
                                       **CHUNKS)
            engine.step()
            results[name] = {"params": read(engine), "loss": out.loss.item()}
        except Exception as e:                            # reported by this config's test, not the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def _engine(model, stage: int, local: int):
    import deepspeed
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    config = {"train_micro_batch_size_per_gpu": local, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    prepare_deepspeed(config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=config)

    def read(engine):                                     # a collective under ZeRO-3: every rank calls it
        from deepspeed.utils import safe_get_full_fp32_param
        out = {}
        for name, prm in engine.module.named_parameters():
            full = safe_get_full_fp32_param(prm)
            out[name] = (prm if full is None else full).detach().clone()     # float64 stays float64
        return out
    return engine, read


# ------------------------------------------------------------------------------ in the parent
@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module", params=[1, 2, 4])
def world(request, bert) -> tuple[int, dict]:
    per_rank = run_world(_worker, request.param, bert, CONFIGS)
    return request.param, {name: [r[name] for r in per_rank] for name in per_rank[0]}


def reference(bert: str, cfg: dict) -> tuple[dict, dict, float]:
    """(initial parameters, parameters after one plain step over the global batch, its loss)."""
    if cfg.get("kind") == "coca":                         # float64, the caption term by torch's mean cross-entropy
        model = coca(loss_name=cfg["loss"])
        initial = tc_params(model)
        images, captions = coca_batch()
        want, contrastive, ce = coca_reference_step(model, images, captions, cfg.get("caption_weight", 2.0),
                                                    cfg.get("smoothing", 0.0), loss=cfg["loss"])
        return initial, want, contrastive + cfg.get("caption_weight", 2.0) * ce
    model = make_model(bert, cfg)
    initial = params(model)
    q, p, neg = global_batch()
    out = model(image=q, text=torch.cat([p, neg.flatten(0, 1)]))
    loss = make_loss(cfg)(out["image"], out["text"][:N], logit_scale=out["logit_scale"],
                          logit_bias=out["logit_bias"], negatives=out["text"][N:].view(N, K, -1))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return initial, params(model), loss.item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_step_equals_the_single_process_full_batch_step(world, bert, name):
    size, results = world
    if size not in CONFIGS[name].get("worlds", (size,)):
        pytest.skip(f"{name} runs at world sizes {CONFIGS[name]['worlds']} only (each engine costs seconds)")
    ranks = results[name]
    assert all("error" not in r for r in ranks), f"{name} at world size {size}: {ranks[0].get('error')}"
    initial, want, loss = reference(bert, CONFIGS[name])
    largest = max_abs_diff(want, initial)                 # the largest gradient entry
    assert largest > 0.1
    tolerance = 1e-6 if CONFIGS[name].get("dtype") == "float64" else 1e-5   # float64: only the fp32 master rounds
    for r in ranks:
        assert max_abs_diff(r["params"], want) <= tolerance * largest, f"{name} at world size {size}"
    assert sum(r["loss"] for r in ranks) / size == pytest.approx(loss, rel=1e-5)


# ------------------------------------------------------------------------------ every loss across ranks
def _loss_partials(rank: int, world: int) -> dict:
    """Value and gradients of every loss with hard negatives on this rank's rows (dense and tiled)."""
    g = torch.Generator().manual_seed(0)
    x, t, h = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((12, 6), (12, 6), (12, 3, 6)))
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 3, 3, 1, 0, 2, 4])
    reference = F.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    n = 12 // world
    rows = slice(rank * n, (rank + 1) * n)
    out = {}
    for name in LOSS_NAMES:
        hyper, scale = SETUPS[name]
        for tiled in (False, True):
            weight = w.clone().requires_grad_()
            kwargs = dict(logit_scale=torch.tensor(scale, dtype=torch.float64), labels=labels[rows],
                          negatives=F.normalize(h[rows] @ weight, dim=-1), **per_sample(name, range(12)[rows]))
            if uses_bias(name):
                kwargs["logit_bias"] = torch.tensor(-3.0, dtype=torch.float64)
            if name == "cwcl":
                kwargs["weights_from"] = reference[rows]
            value = get_loss(name, tiled=tiled, tile_size=5, **hyper)(
                F.normalize(x[rows] @ weight, dim=1), F.normalize(t[rows] @ weight, dim=1), **kwargs)
            value.backward()
            out[name, tiled] = (value.detach(), weight.grad)
    return out


def test_every_loss_with_hard_negatives_across_ranks(world):
    """Mean over ranks of the values and gradients = the single-process loss of the whole batch."""
    size, results = world
    ranks = results["losses"]
    single = _loss_partials(0, 1)
    for key, (value, grad) in single.items():
        got_value = torch.stack([r[key][0] for r in ranks]).mean()
        got_grad = torch.stack([r[key][1] for r in ranks]).mean(0)
        assert torch.allclose(got_value, value, rtol=1e-9, atol=1e-12), (key, size, got_value, value)
        assert torch.allclose(got_grad, grad, rtol=1e-9, atol=1e-12), (key, size)


def test_reference_is_not_trivially_met(bert):
    """The comparison can fail: without its hard negatives the same step ends elsewhere."""
    cfg = CONFIGS["zero0"]
    _, want, _ = reference(bert, cfg)
    model = make_model(bert, cfg)
    q, p, _ = global_batch()
    forward_backward(model, q, p, make_loss(cfg), **CHUNKS)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert max_abs_diff(params(model), want) > 1e-3
    assert copy.deepcopy(want).keys() == params(model).keys()
