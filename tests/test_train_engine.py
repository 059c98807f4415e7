"""The training stage's pieces: DeepSpeed config, AdamW groups, schedule, checkpoint readers and
refusals, TensorBoard step bookkeeping, RNG state; and (slow) the engine itself under real DeepSpeed."""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.train.checkpoint import (
    checkpoint_url,
    complete_steps,
    find_resume,
    latest_checkpoint,
    prune,
    refuse_existing,
    rng_state,
    set_rng_state,
)
from pipeline.train.engine import deepspeed_config, lr_factor, param_groups, warmup_cosine
from pipeline.train.metrics import logged_steps

LN100 = math.log(100.0)


def cfg_of(*overrides: str):
    return load_config(None, ["eval.schedule='off'", *overrides])


# ------------------------------------------------------------------------------ DeepSpeed config
def test_deepspeed_config_from_run_config():
    cfg = cfg_of("train.global_batch=64", "cluster.num_workers=2", "train.grad_clip=0.5", "train.lr=3e-4",
                 "deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.overlap_comm=true")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}      # pass-through, merged
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["bf16"]["enabled"] is False                  # auto on a CPU machine: fp32
    assert deepspeed_config(cfg_of("train.precision=bf16"), 1)["bf16"]["enabled"] is True
    assert deepspeed_config(cfg_of("deepspeed.bf16.enabled=true"), 1)["bf16"]["enabled"] is True


def test_zero3_gradient_bucket_is_a_tenth_of_the_model_unless_set():
    """DeepSpeed's own 5·10⁸ elements held a full copy of the gradients on every rank (docs/scaling.md)."""
    zero3 = ("train.global_batch=8", "cluster.num_workers=2", "deepspeed.zero_optimization.stage=3")
    bucket = [deepspeed_config(cfg_of(*zero3), 2, parameters=n)["zero_optimization"]["reduce_bucket_size"]
              for n in (151_000_000, 10**10, 7)]
    assert bucket == [15_100_000, 500_000_000, 1]
    mine = cfg_of(*zero3, "deepspeed.zero_optimization.reduce_bucket_size=123")
    assert deepspeed_config(mine, 2, parameters=151_000_000)["zero_optimization"]["reduce_bucket_size"] == 123
    other = cfg_of("train.global_batch=8", "cluster.num_workers=2", "deepspeed.zero_optimization.stage=2")
    assert "reduce_bucket_size" not in deepspeed_config(other, 2, parameters=151_000_000)["zero_optimization"]
    assert "reduce_bucket_size" not in deepspeed_config(cfg_of(*zero3), 2)["zero_optimization"]


@pytest.mark.parametrize("override, named", [
    ("deepspeed.gradient_accumulation_steps=4", "deepspeed.gradient_accumulation_steps"),
    ("deepspeed.train_batch_size=999", "deepspeed.train_batch_size"),
])
def test_deepspeed_keys_that_break_the_step_are_refused(override, named):
    with pytest.raises(ConfigError, match=named):
        deepspeed_config(cfg_of(override), 1)


def test_bf16_key_contradicting_precision_is_refused():
    with pytest.raises(ConfigError, match="train.precision"):
        deepspeed_config(cfg_of("train.precision=fp32", "deepspeed.bf16.enabled=true"), 1)


# ------------------------------------------------------------------------------ optimizer groups
def _tiny(loss: str = "siglip", lock_text: bool = False):
    from pipeline.models import build_model
    cfg = cfg_of("model.name=tiny", f"model.text.lock={str(lock_text).lower()}")
    return build_model(cfg.model, image_size=32, context_length=16, vocab_size=100, loss_name=loss)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_only_on_matrices_not_norms_biases_embeddings_scalars():
    model = _tiny()
    decay, plain = param_groups(model, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    d, p = _names(model, decay), _names(model, plain)
    for name in ("image_tower.patch_embed.weight", "image_tower.proj", "text_tower.proj",
                 "image_tower.transformer.blocks.0.attn.qkv.weight", "text_tower.transformer.blocks.1.mlp.fc2.weight"):
        assert name in d, name
    for name in ("logit_scale", "logit_bias", "image_tower.cls_token", "image_tower.pos_embed", "text_tower.pos_embed",
                 "text_tower.token_embed.weight", "image_tower.norm_pre.weight", "text_tower.norm_final.bias",
                 "image_tower.transformer.blocks.0.norm1.weight", "image_tower.transformer.blocks.0.attn.qkv.bias"):
        assert name in p, name
    assert d | p == {n for n, _ in model.named_parameters()} and not d & p


def test_frozen_parameters_are_left_out():
    model = _tiny(lock_text=True)
    names = set().union(*(_names(model, g) for g in param_groups(model, 0.1)))
    assert names and not any(n.startswith("text_tower.") for n in names)
    assert "image_tower.proj" in names


# -------------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine():
    f = lambda s: lr_factor(s, warmup=4, total=14, min_ratio=0.1)     # noqa: E731
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)                   # cosine starts at the peak
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)       # half way down: cos(π/2) = 0
    assert f(14) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_schedule_drives_the_optimizer_lr():
    cfg = cfg_of("train.lr=0.01", "train.min_lr=0.001", "train.warmup_steps=2", "train.steps=6")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.lr)
    sched = warmup_cosine(cfg)(opt)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.005, 0.01, 0.01, 0.001 + 0.009 * (1 + math.cos(math.pi / 4)) / 2, 0.0055,
                0.001 + 0.009 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.001]
    assert lrs == pytest.approx(expected)


# --------------------------------------------------------------------------- checkpoint readers
def _fake_checkpoint(run_dir: str, step: int, complete: bool = True, world_size: int = 2, stage: int = 2,
                     config: dict | None = None) -> str:
    url = checkpoint_url(run_dir, step)
    meta = {"step": step, "samples_seen": 32 * step, "world_size": world_size, "zero_stage": stage, "params": {},
            "config": config or cfg_of().to_dict()}
    storage.write_json(storage.join(url, "meta.json"), meta)
    storage.write_json(storage.join(url, "data_state.json"), {"step": step})
    if complete:
        storage.write_json(storage.join(url, storage.COMPLETE), {"step": step})
    return url


def test_a_checkpoint_without_complete_does_not_exist(tmp_path):
    run = str(tmp_path)
    assert latest_checkpoint(run) is None
    _fake_checkpoint(run, 2)
    _fake_checkpoint(run, 4, complete=False)             # being written, or its writer died
    assert complete_steps(run) == [2]
    assert latest_checkpoint(run) == checkpoint_url(run, 2)
    resume = find_resume(cfg_of(f"run_dir={run}", "cluster.num_workers=2", "train.global_batch=32",
                                "deepspeed.zero_optimization.stage=2"))
    assert resume.url == checkpoint_url(run, 2) and resume.data_state == {"step": 2}


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    run = str(tmp_path)
    for step in (1, 2, 3, 4):
        _fake_checkpoint(run, step)
    storage.remove(storage.join(checkpoint_url(run, 2), storage.COMPLETE))     # an abandoned attempt
    _fake_checkpoint(run, 5, complete=False)                                     # one being written now
    prune(run, keep=2)
    left = storage.listdir(storage.join(run, "checkpoints"))
    assert left == ["step_00000003", "step_00000004", "step_00000005"]


def test_resume_refuses_another_model(tmp_path):
    run = str(tmp_path)
    other = cfg_of("model.name=small", "data.image_size=32").to_dict()
    _fake_checkpoint(run, 2, config=other)
    with pytest.raises(ConfigError) as e:
        find_resume(cfg_of(f"run_dir={run}", "deepspeed.zero_optimization.stage=2", "cluster.num_workers=2",
                           "train.global_batch=32"))
    assert "model.name: 'small' in the checkpoint, 'tiny' now" in str(e.value)
    assert "data.image_size: 32 in the checkpoint, 64 now" in str(e.value)


def test_any_world_size_resumes_but_not_another_zero_stage(tmp_path):
    staged = str(tmp_path / "stage2")
    _fake_checkpoint(staged, 2, world_size=2, stage=2)
    resume = find_resume(cfg_of(f"run_dir={staged}", "deepspeed.zero_optimization.stage=2", "cluster.num_workers=4",
                                "train.global_batch=32"))
    assert resume.resharded(4) and resume.resharded(1) and not resume.resharded(2)
    plain = str(tmp_path / "stage0")
    _fake_checkpoint(plain, 2, world_size=2, stage=0)
    resume = find_resume(cfg_of(f"run_dir={plain}", "cluster.num_workers=4", "train.global_batch=32"))
    assert not resume.resharded(4)                        # nothing partitioned: DeepSpeed's own files load
    with pytest.raises(ConfigError, match="ZeRO stage 0"):
        find_resume(cfg_of(f"run_dir={plain}", "deepspeed.zero_optimization.stage=1", "cluster.num_workers=2",
                           "train.global_batch=32"))


def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path):
    run = str(tmp_path)
    refuse_existing(cfg_of(f"run_dir={run}", "train.resume=never"))        # empty: fine
    _fake_checkpoint(run, 3)
    with pytest.raises(ConfigError, match="train.resume = 'never'"):
        refuse_existing(cfg_of(f"run_dir={run}", "train.resume=never"))


# ------------------------------------------------------------------------------ TensorBoard, RNG
def _events(folder: Path, tags_steps: list[tuple[str, int]]) -> None:
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(folder)) as w:
        for tag, step in tags_steps:
            w.add_scalar(tag, 1.0, step)


def test_logged_steps_reads_only_this_stages_scalars_each_on_its_own(tmp_path):
    assert logged_steps(str(tmp_path / "none")) == {}
    steps = [(tag, s) for s in range(1, 8) for tag in ("train/loss", "perf/x")]
    _events(tmp_path, [("eval/zeroshot/acc1", 40)] + steps + [("train/loss", 8)])   # step 8 cut between its scalars
    assert logged_steps(str(tmp_path)) == {"train/loss": 8, "perf/x": 7}
    event_file = next(tmp_path.iterdir())
    data = event_file.read_bytes()
    event_file.write_bytes(data[:-5])                   # a writer killed mid-record
    assert logged_steps(str(tmp_path)) == {"train/loss": 7, "perf/x": 7}


def test_logged_steps_on_s3(s3_server, tmp_path):
    _events(tmp_path, [("perf/samples_per_s", s) for s in (2, 4, 9)])
    storage.upload_dir(tmp_path, "s3://test-bucket/lls/tensorboard")
    assert logged_steps("s3://test-bucket/lls/tensorboard") == {"perf/samples_per_s": 9}


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(rng_state()))
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# ----------------------------------------------------------------- the engine, under DeepSpeed
def _engine_checks(rank: int, world_size: int, tmp: str) -> dict:
    """In a gloo world: for each ZeRO stage / precision, θ starts above ln 100; after one step the
    fp32 master must be clamped too, and the consolidated weights must be the model's."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.train.engine import Engine
    results = {}
    for stage, precision in ((0, "fp32"), (0, "bf16"), (2, "fp32"), (3, "fp32")):
        if world_size > 1 and stage != 3:
            continue
        cfg = cfg_of("train.global_batch=8", f"cluster.num_workers={world_size}", f"train.precision={precision}",
                     f"deepspeed.zero_optimization.stage={stage}", "train.lr=1e-9", "train.weight_decay=0")
        torch.manual_seed(0)
        model = _tiny(loss="clip")
        with torch.no_grad():
            model.logit_scale.fill_(10.0)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        engine = Engine(cfg, model, world_size)
        out = engine.ds(image=None, text=None)
        engine.ds.backward(out["logit_scale"].sum() * 0.0)
        engine.step()
        p = engine.module.logit_scale
        master = safe_get_full_fp32_param(p)
        if master is None and isinstance(engine.ds.optimizer, FP16_UnfusedOptimizer):
            master = next(hp for lps, hps in zip(engine.ds.optimizer.fp16_groups, engine.ds.optimizer.fp32_groups)
                          for lp, hp in zip(lps, hps) if lp is p)
        if master is None:
            master = p                                   # stage 0 fp32: the parameter is the master
        state = engine.consolidated_state()
        if stage == 3:                                   # gathered a few parameters at a time, onto rank 0 alone
            import pipeline.train.engine as engine_module
            whole, engine_module.GATHER_BYTES = engine_module.GATHER_BYTES, 4096
            try:
                grouped = engine.consolidated_state(rank0_only=True)
            finally:
                engine_module.GATHER_BYTES = whole
            results["grouped"] = (list(grouped) == list(state) and all(torch.equal(grouped[k], state[k]) for k in state)
                                  if rank == 0 else grouped == {})
        tol = 1e-2 if precision == "bf16" else 1e-6
        results[f"{stage}-{precision}"] = {
            "master": float(master.detach().float().reshape(())),
            "shapes_kept": all(state[k].shape == before[k].shape for k in before),
            "published_scale": float(state["logit_scale"]),
            "weights_kept": all(torch.allclose(state[k], before[k].float(), atol=tol)
                                for k in before if k != "logit_scale"),
        }
        if stage == 2:                                   # DeepSpeed's checkpoints load weights-only
            engine.save(tmp)
            victim = Path(tmp, "deepspeed", "mp_rank_00_model_states.pt")
            torch.save({"module": _Exploit()}, victim)
            try:
                engine.load(tmp)
                results["exploit_loaded"] = True
            except pickle.UnpicklingError as e:
                results["exploit_loaded"] = False
                results["refusal"] = str(e)
    results["muon_compiled"] = [name for name, module in sys.modules.items()      # real Muon modules imported
                                if name.startswith("deepspeed.runtime.zero.muon.") and hasattr(module, "__file__")]
    return results


class _Exploit:
    """What an attacker would plant in a checkpoint: unpickling it runs code."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/contrast-train-exploit",))


@pytest.mark.slow
def test_engine_clamps_the_fp32_master_and_consolidates_the_weights(tmp_path):
    from tests.helpers.dist import run_world
    (res,) = run_world(_engine_checks, 1, str(tmp_path))
    for key in ("0-fp32", "0-bf16", "2-fp32", "3-fp32"):
        r = res[key]
        assert r["master"] == pytest.approx(LN100, abs=1e-2 if "bf16" in key else 1e-6), key
        assert r["shapes_kept"] and r["published_scale"] == pytest.approx(LN100, abs=2e-2), key
        assert r["weights_kept"], key
    assert res["exploit_loaded"] is False
    assert "mp_rank_00_model_states.pt: refused" in res["refusal"] and "weights_only=False" not in res["refusal"]
    assert not os.path.exists("/tmp/contrast-train-exploit")
    assert res["muon_compiled"] == []               # ZeRO 2 and 3 stepped without DeepSpeed's Muon modules
    assert res["grouped"]                           # the weights gathered a few at a time are the same


@pytest.mark.slow
def test_zero3_consolidates_across_two_ranks(tmp_path):
    from tests.helpers.dist import run_world
    results = run_world(_engine_checks, 2, str(tmp_path))
    for r in results:
        assert r["3-fp32"]["master"] == pytest.approx(LN100, abs=1e-6)
        assert r["3-fp32"]["weights_kept"] and r["3-fp32"]["shapes_kept"]
        assert r["grouped"]                              # rank 0: the same weights gathered in groups; rank 1: none


def test_workers_get_absolute_local_paths(tmp_path, monkeypatch):
    from pipeline.orchestrate import absolute_paths
    monkeypatch.chdir(tmp_path)
    cfg = cfg_of("run_dir=runs/a", "data.train_urls=[data/train, 's3://b/shards/{0..9}.tar']",
                 "data.eval_dir=data/eval")
    fixed = absolute_paths(cfg)
    assert fixed.run_dir == str(tmp_path / "runs/a")
    assert fixed.data.train_urls == [str(tmp_path / "data/train"), "s3://b/shards/{0..9}.tar"]
    assert fixed.data.eval_dir == str(tmp_path / "data/eval") and fixed.data.tokenizer is None
    assert cfg.run_dir == "runs/a"                      # the caller's config is left as it was


def _chunked_grad_norms(rank: int, world_size: int) -> dict[int, list[float]]:
    """Gradient norm of 3 gradient-cache steps (4 chunks) on one fixed batch at a negligible lr, per ZeRO stage."""
    from pipeline.losses import get_loss
    from pipeline.train.engine import Engine
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(8, 3, 32, 32, generator=g), torch.randint(1, 100, (8, 16), generator=g)
    norms = {}
    for stage in (0, 3):
        cfg = cfg_of("train.global_batch=8", "cluster.num_workers=1", f"deepspeed.zero_optimization.stage={stage}",
                     "train.lr=1e-9", "train.warmup_steps=0", "gradcache.chunk_size=2", "loss.duplicates=off")
        torch.manual_seed(0)
        engine = Engine(cfg, _tiny(loss="clip"), world_size)
        norms[stage] = []
        for _ in range(3):
            engine.forward_backward({"image": images, "text": texts}, get_loss("clip"))
            norms[stage].append(engine.step())
    return norms


@pytest.mark.slow
def test_every_step_starts_from_zero_gradients_under_zero3():
    """ZeRO-3 adds a later backward's gradient onto its partition; the text tower's first gradient of a
    step comes in a later backward of the gradient cache, so without clearing, steps would pile up."""
    from tests.helpers.dist import run_world
    (norms,) = run_world(_chunked_grad_norms, 1)
    reference = norms[0][0]
    for stage, values in norms.items():
        assert values == pytest.approx([reference] * 3, rel=1e-4), (stage, values)


def _two_steps(rank: int, world_size: int, stage: int) -> dict:
    """Two gradient-cache steps of the tiny model on one global batch of 8 (each rank its rows) under ZeRO
    `stage`: the weights after them and, under ZeRO 3, the bytes DeepSpeed's optimizer holds per holder, in
    copies of the fp32 weights (`benchmarks/zero3_memory.py` counts them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from zero3_memory import deepspeed_bytes

    from pipeline.losses import get_loss
    from pipeline.train.engine import Engine
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(8, 3, 32, 32, generator=g), torch.randint(1, 100, (8, 16), generator=g)
    rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    cfg = cfg_of("train.global_batch=8", f"cluster.num_workers={world_size}", "train.precision=fp32",
                 f"deepspeed.zero_optimization.stage={stage}", "train.lr=1e-3", "train.warmup_steps=0",
                 "gradcache.chunk_size=2", "loss.duplicates=off")
    torch.manual_seed(0)
    model = _tiny(loss="clip")
    weights = sum(p.numel() for p in model.parameters()) * 4
    engine = Engine(cfg, model, world_size)
    for _ in range(2):
        engine.forward_backward({"image": images[rows], "text": texts[rows]}, get_loss("clip"))
        engine.step()
    return {"held": {k: v / weights for k, v in deepspeed_bytes(engine.ds).items()},
            "state": engine.consolidated_state()}


@pytest.mark.slow
def test_zero3_holds_two_copies_of_the_weights_at_two_ranks_and_steps_as_without_zero():
    """fp32 at 2 ranks: half of 16 B per parameter (the partition, which is its own fp32 master, AdamW's two
    moments, the gradient partition) and a gradient bucket of a tenth of the weights; DeepSpeed alone held
    another half copy (a cloned master) and a 2 GB bucket. The steps' weights are those of ZeRO 0 on 1 rank."""
    from tests.helpers.dist import run_world
    (plain,) = run_world(_two_steps, 1, 0)
    for r in run_world(_two_steps, 2, 3):
        held = r["held"]
        assert held["master"] == 0, held                                  # the partition itself
        assert held["bucket"] <= 0.1 + 1e-6, held
        assert held["partition"] + held["adam"] + held["grads"] + held["bucket"] <= 2.2, held
        assert max((r["state"][k] - v).abs().max().item() for k, v in plain["state"].items()) <= 1e-5


def test_pipe_urls_reach_the_workers_unchanged(tmp_path, monkeypatch):
    """`data.allow_pipe: true` never worked in train: the driver turned `pipe:cat …` into a local path."""
    from pipeline.orchestrate import absolute_paths
    monkeypatch.chdir(tmp_path)
    cfg = cfg_of("data.allow_pipe=true", "data.train_urls=['pipe:cat shards/{00000..00003}.tar']")
    assert absolute_paths(cfg).data.train_urls == ["pipe:cat shards/{00000..00003}.tar"]


def _compiled_resume(rank: int, world_size: int, tmp: str) -> dict:
    """`train.compile` under ZeRO 2 with dropout and patch dropout: two steps straight, and the second
    step again from a checkpoint of the first, loaded into a new compiled engine."""
    from pipeline.losses import get_loss
    from pipeline.models import build_model
    from pipeline.train.engine import Engine
    cfg = cfg_of("train.global_batch=8", "cluster.num_workers=1", "deepspeed.zero_optimization.stage=2",
                 "train.compile=true", "model.dropout=0.1", "model.image.patch_dropout=0.5", "gradcache.chunk_size=4",
                 "train.lr=1e-3", "train.warmup_steps=0", "loss.duplicates=off")    # a hand-made batch: no caption ids
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=g), "text": torch.randint(1, 100, (8, 16), generator=g)}

    def engine(seed: int) -> Engine:
        torch.manual_seed(seed)
        return Engine(cfg, build_model(cfg.model, image_size=32, context_length=16, vocab_size=100), world_size)

    def step(e: Engine, seed: int) -> None:
        torch.manual_seed(seed)
        e.forward_backward(batch, get_loss("clip"))
        e.step()

    straight = engine(0)
    initial = straight.consolidated_state()
    step(straight, 100)
    straight.save(tmp)
    step(straight, 101)
    resumed = engine(1)                                  # other initial weights: all must come from the checkpoint
    resumed.load(tmp)
    step(resumed, 101)
    compiled = all(t._compiled_call_impl is not None for t in (resumed.module.image_tower, resumed.module.text_tower))
    return {"initial": initial, "straight": straight.consolidated_state(), "resumed": resumed.consolidated_state(),
            "compiled": compiled}


@pytest.mark.slow
def test_compiled_towers_train_and_resume(tmp_path):
    from tests.helpers.compare import max_abs_diff
    from tests.helpers.dist import run_world
    (r,) = run_world(_compiled_resume, 1, str(tmp_path))
    assert r["compiled"]
    assert max_abs_diff(r["straight"], r["initial"]) > 1e-4                 # it trained
    assert set(r["straight"]) == set(r["initial"])                         # parameter names as the plain model's
    assert max_abs_diff(r["resumed"], r["straight"]) <= 1e-6
