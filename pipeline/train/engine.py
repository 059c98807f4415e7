"""The DeepSpeed engine of a run: its config, the AdamW parameter groups, the learning-rate schedule.

This is the only module that knows DeepSpeed. The train loop sees `Engine`: `forward_backward(batch)`
(the gradient-cache step), `step()` (optimizer step, schedule, logit-scale clamp, gradient norm),
`device`, `consolidated_state()` (full weights, gathered under ZeRO-3), `param_shapes()` and
`save`/`load` of DeepSpeed's native checkpoint, or of its universal form (`convert_to_universal`), which
loads on any world size under every ZeRO stage.

These traps of DeepSpeed 0.19 are handled here, once:
* It keeps an fp32 master copy of the parameters under bf16 and ZeRO: a clamp of the module's θ
  alone would be undone by the next step. `clamp_logit_scale` clamps θ and every master copy.
* ZeRO-3 keeps stale gradient partitions for parameters whose first gradient of a step comes in a
  later backward (the gradient cache's text tower): they are cleared after each step.
* It loads its checkpoints with `torch.load(weights_only=False)`; `load` forces weights-only
  unpickling, allowing only the few DeepSpeed value classes its checkpoints hold.
* Loading a universal checkpoint under ZeRO-3 gives every parameter group the hyper-parameters of the
  first one (weight decay on the undecayed group) and one `step` tensor shared by all of them (Adam's
  bias correction then advances once per group per step): both are put right after the load.

Under ZeRO 3, three things held memory beyond the partitioned state and one gathered copy of the weights
(benchmarks/zero3_memory.py measures each phase; docs/scaling.md "Model size"):
* its gradient bucket, 5·10⁸ elements by default, took every gradient of a backward before reducing them: a
  full copy of the weights' size on every rank. It is sized to a tenth of the model (`zero3_buffers`) unless
  `deepspeed.zero_optimization.reduce_bucket_size` is set;
* in fp32 it cloned each rank's parameter partition as its fp32 master (a device test torch 2.13 answers
  False): the master is the partition again (`share_fp32_master`);
* the model built whole and then partitioned left its full copy in glibc's heap, freed but resident: the
  heap is trimmed once the engine is built (`trim_heap`).

Three of its start-up costs are avoided (`contrast train` logs the start-up phases):
* its ZeRO optimizers import its Muon optimizer's modules (at start-up and in every gradient reduction)
  only to ask `isinstance(optimizer, MuonWithAuxAdam)` or to find a Muon update they call for Muon
  only; the modules run `torch.compile` at import: about 2 s of inductor imports per worker, in its first
  step, for an optimizer we never use (`_without_muon`);
* on CPU it builds and loads a C++ shared-memory all-reduce (35–73 s to build, then a ninja and
  compiler check at every start) that only its inference tensor parallelism calls: not built
  (`_without_inference_allreduce`);
* the ops it does build at run time (CPU Adam for optimizer offload, ...) go to torch's extensions
  folder, shared by default by every environment of the user, where each venv's build replaces the
  other's: a venv keeps its own (`_extensions_in_venv`).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import pickle
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from pipeline.config import Config, ConfigError, register_check
from pipeline.distributed import get_rank as dist_rank
from pipeline.distributed import get_world_size as dist_world_size
from pipeline.gradcache import Backward, StepOutput, forward_backward
from pipeline.layout import DEEPSPEED, UNIVERSAL
from pipeline.log import get_logger
from pipeline.losses.caption import CaptionLoss
from pipeline.models import LOGIT_SCALE_BOUNDS, DualEncoder
from pipeline.models.coca import caption_model

GATHER_BYTES = 32 * 2**20             # ZeRO-3 consolidation gathers the weights this many bytes at a time
log = get_logger(__name__)



# ------------------------------------------------------------------------------------ config
def resolve_precision(cfg: Config) -> str:
    """"bf16" or "fp32": `train.precision`, where auto means bf16 on a GPU that has it."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    explicit = (cfg.deepspeed.get("bf16") or {}).get("enabled")
    if explicit is not None:
        return "bf16" if explicit else "fp32"
    gpu_bf16 = cfg.cluster.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if gpu_bf16 else "fp32"


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False,
                     parameters: Optional[int] = None) -> dict[str, Any]:
    """DeepSpeed's config: ours from the run config, then the `deepspeed.*` keys passed through.

    One optimizer step per global batch: the gradient cache accumulates its chunks inside a step,
    so DeepSpeed's own accumulation stays at 1 and the micro batch is the local batch. `load_universal`:
    the engine will load a universal checkpoint (DeepSpeed must know it when the engine is built).
    `parameters` (the model's count): under ZeRO 3, the buffers DeepSpeed sizes in elements are sized to
    the model (`zero3_buffers`) unless `deepspeed.zero_optimization` sets them.
    """
    t = cfg.train
    precision = resolve_precision(cfg)
    ours = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,           # DeepSpeed 0.19 would clip at 1.0 if unset
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
            "torch_adam": True}},                   # not FusedAdam: no C++ build, runs on CPU too
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 2**31 - 1,               # our logger reports; DeepSpeed stays quiet
    }
    if load_universal:
        ours["checkpoint"] = {"load_universal": True}
    merged = _merge(ours, cfg.deepspeed)
    if parameters is not None and merged["zero_optimization"].get("stage") == 3:
        merged["zero_optimization"] = {**zero3_buffers(parameters), **merged["zero_optimization"]}
    fixed = {"train_batch_size": t.global_batch, "gradient_accumulation_steps": 1,
             "train_micro_batch_size_per_gpu": t.global_batch // world_size}
    wrong = [f"deepspeed.{k} = {merged[k]!r} (expected {v}: set by train.global_batch and the gradient cache)"
             for k, v in fixed.items() if merged[k] != v]
    if cfg.train.precision != "auto" and merged["bf16"].get("enabled") != (precision == "bf16"):
        wrong.append(f"deepspeed.bf16.enabled = {merged['bf16'].get('enabled')!r} contradicts "
                     f"train.precision = {cfg.train.precision!r}; set only train.precision")
    if wrong:
        raise ConfigError("deepspeed settings that conflict with the run config:\n  - " + "\n  - ".join(wrong))
    return merged


ZERO3_BUCKET_SHARE = 10          # ZeRO 3's gradient bucket: at most this fraction (1/10) of the parameters


def zero3_buffers(parameters: int) -> dict[str, int]:
    """ZeRO 3's gradient bucket sized to the model: a tenth of its parameters, at most DeepSpeed's 5·10⁸.

    DeepSpeed allocates the bucket (`reduce_bucket_size` elements) once and fills it with full gradients
    until it holds that many, then reduce-scatters them into each rank's partition. Its default of 5·10⁸
    elements (2 GB in fp32) is above every model here, so a backward wrote every gradient into it: a full
    unpartitioned copy of the weights' size, on every rank, for as long as the process lives."""
    return {"reduce_bucket_size": int(min(5e8, max(1, parameters // ZERO3_BUCKET_SHARE)))}


@register_check
def check_deepspeed_settings(cfg: Config) -> list[str]:
    """The `deepspeed.*` keys that contradict the run config, found before any worker starts."""
    c = cfg.cluster
    counts = [w for w in range(max(c.min_workers, 1), c.max_workers + 1) if cfg.train.global_batch % w == 0]
    if not counts:
        return []                          # reported by the config's own checks
    try:
        deepspeed_config(cfg, counts[0])
    except ConfigError as e:
        return [str(e)]
    return []


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# --------------------------------------------------------------------------------- optimizer
def no_weight_decay(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    """Norm gains, biases, embeddings (token tables, positions, class tokens), scalars (logit scale/bias)."""
    return (p.ndim < 2 or name == "bias" or isinstance(module, nn.Embedding)
            or "norm" in type(module).__name__.lower() or "embed" in name or "token" in name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: decayed matrices, then everything else undecayed."""
    decay, plain = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (plain if no_weight_decay(module, name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(cfg: Config) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """The schedule as DeepSpeed wants it: a function of the optimizer it builds.

    The lambda is not saved with the scheduler's state, so a resumed run follows its own
    `train.steps` (extending a run stretches the cosine) while the step count is restored
    (`Engine.load` re-applies it to the restored step).
    """
    t = cfg.train
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(
        step, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr / t.lr))


# ------------------------------------------------------------------------------------ engine
class Engine:
    """The dual encoder inside a DeepSpeed engine, with the run's optimizer, schedule and gradient cache.

    `ds` is DeepSpeed's engine itself, for checks of DeepSpeed's own state (tests); the train loop
    uses only the methods below.
    """

    def __init__(self, cfg: Config, model: DualEncoder, world_size: int, universal: bool = False):
        import deepspeed
        config = deepspeed_config(cfg, world_size, load_universal=universal, parameters=parameter_count(model))
        prepare_deepspeed(config)
        self.ds, _, _, self._scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
            config=config, lr_scheduler=warmup_cosine(cfg))
        self._group_settings = [{k: g[k] for k in ("weight_decay", "betas", "eps")}
                                for g in self.ds.optimizer.param_groups]
        share_fp32_master(self.ds.optimizer)
        trim_heap()                                     # the full weights ZeRO 3 partitioned away
        if cfg.train.compile:
            self.module.compile_towers()          # after DeepSpeed's hooks (ZeRO-3) are in place
        self.zero_stage = self.ds.zero_optimization_stage()
        self._peak_lr = cfg.train.lr
        self.chunks = (cfg.gradcache.chunk_size, cfg.gradcache.text_chunk_size)
        self.mask_duplicates = cfg.loss.duplicates == "mask"    # the same on every rank: the mask's gather
        self.caption = (CaptionLoss(cfg.loss.caption_weight, cfg.loss.caption_label_smoothing,
                                    model.spec.text.pad_id) if caption_model(model) else None)
        self.lr = 0.0                                    # the learning rate of the last step taken
        # DeepSpeed leaves the global gradient norm unset at stage 0 in fp32: measured here then.
        self._measure_grad_norm = self.zero_stage == 0 and not self.ds.bfloat16_enabled()

    @property
    def module(self) -> DualEncoder:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def forward_backward(self, batch: dict[str, Any], loss_fn: Callable[..., torch.Tensor],
                         weights_from: Optional[str] = None) -> StepOutput:
        """Forward and backward of this rank's batch through the gradient cache (`gradcache.chunk_size`).
        A text-pair batch (queries, positives, hard negatives) fills the model's two slots in that order.
        With `loss.duplicates: mask`, the batch's caption ids take duplicate captions out of the negatives
        (a text pair's are (n, 2): its query's and its positive's; a row with k captions: (n, k), its captions 2..k
        in "more_text")."""
        chunk, text_chunk = self.chunks
        if self.mask_duplicates and "caption_id" not in batch:
            raise ValueError("loss.duplicates = 'mask' needs the batch's 'caption_id' (one id per row, as the data "
                             "stream gives); pass it, or set loss.duplicates=off")
        per_sample = getattr(loss_fn, "uses_sample_ids", False)        # isogclr: state keyed by the sample ids
        if per_sample and "sample_id" not in batch:
            raise ValueError(f"loss {getattr(loss_fn, 'name', '')!r} keeps state per sample and needs the batch's "
                             "'sample_id' (image-caption data gives it; text pairs do not)")
        first, second = (batch["query"], batch["pos"]) if "query" in batch else (batch["image"], batch["text"])
        return forward_backward(self.ds, first, second, loss_fn, labels=batch.get("label"),
                                chunk_size=chunk, text_chunk_size=text_chunk, weights_from=weights_from,
                                backward=DeepSpeedBackward(self.ds), negatives=batch.get("neg"),
                                caption_ids=batch["caption_id"] if self.mask_duplicates else None,
                                caption=self.caption, positives=batch.get("more_text"),
                                sample_ids=batch["sample_id"] if per_sample else None)

    def step(self) -> float:
        """Optimizer step (clipping, schedule), then the logit-scale clamp; returns the pre-clip grad norm."""
        norm = _grad_norm(self.module) if self._measure_grad_norm else None
        self.lr = self._scheduler.optimizer.param_groups[0]["lr"]
        self.ds.step()
        self._clear_zero3_gradients()
        clamp_logit_scale(self.ds)
        return float(norm if norm is not None else self.ds.get_global_grad_norm())

    def _clear_zero3_gradients(self) -> None:
        """ZeRO-3 overwrites a parameter's gradient partition only in the first backward of a step and
        adds to it in later ones; the gradient cache's first backward covers the image tower alone, so
        the text tower, scale and bias would add onto the previous step's gradients. Start from zero."""
        flat = getattr(self.ds.optimizer, "grad_partitions_flat_buffer", None)
        if self.zero_stage == 3 and flat is not None:
            flat.zero_()

    def consolidated_state(self, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """Full fp32 weights on CPU (on rank 0 alone with `rank0_only`; the other ranks get {}).

        Under ZeRO-3 a collective: the parameters are gathered a group of ≤ GATHER_BYTES at a time and
        copied out, so no rank ever holds more than the copy it returns plus one group (gathering them all
        at once held two full copies on every rank: the gathered weights and their copy)."""
        sd = self.module.state_dict(keep_vars=True)
        keep = not rank0_only or dist_rank() == 0
        if self.zero_stage != 3:
            return {k: v.detach().float().cpu().clone() for k, v in sd.items()} if keep else {}
        names: dict[int, list[str]] = {}
        for k, v in sd.items():
            names.setdefault(id(v), []).append(k)
        state: dict[str, torch.Tensor] = {}
        for group in _groups(list(self.module.parameters()), GATHER_BYTES):
            with _gathered(group):
                for p in group:
                    for k in names.get(id(p), []) if keep else []:
                        state[k] = p.detach().float().cpu().clone()
        if not keep:
            return {}
        return {k: state[k] if k in state else v.detach().float().cpu().clone() for k, v in sd.items()}

    def param_shapes(self) -> dict[str, list[int]]:
        """Name → shape of every parameter, as the model defines it (ZeRO-3's partitioning undone)."""
        return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.module.named_parameters()}

    def checkpoint_bytes(self) -> int:
        """About what `save` writes on this rank: the weights, and this rank's share of the fp32 master
        copy and AdamW's two moments (partitioned over the ranks from ZeRO 1 on)."""
        numel = parameter_count(self.module)
        shards = dist_world_size() if self.zero_stage >= 1 else 1
        return numel * 4 + numel * 12 // shards

    def save(self, local_dir: str) -> None:
        """DeepSpeed's checkpoint (module, optimizer, scheduler) of this rank into `local_dir/deepspeed/`."""
        self.ds.save_checkpoint(local_dir, tag=DEEPSPEED, save_latest=False)

    def load(self, local_dir: str, universal: bool = False) -> None:
        """Load what `save` wrote (every rank's files under `local_dir/deepspeed/`), weights-only; with
        `universal`, the universal form under `local_dir/universal/` (the engine built with `universal`)."""
        tag = UNIVERSAL if universal else DEEPSPEED
        try:
            with _weights_only_loading():
                path, _ = self.ds.load_checkpoint(local_dir, tag=tag, load_module_strict=True)
        except pickle.UnpicklingError:
            raise UnsafeCheckpoint(f"{_unsafe_file(local_dir)}: refused: it holds Python objects that loading would "
                                   "run, not only tensors and DeepSpeed's plain values. contrast never writes such "
                                   "files: the checkpoint was replaced or tampered with") from None
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {local_dir}/{tag}")
        if universal:
            self._repair_universal_load()
        self._follow_schedule()

    def _repair_universal_load(self) -> None:
        """Undo what DeepSpeed's universal loading gets wrong (module docstring): each group's own
        hyper-parameters again, and one Adam step counter per optimizer state, not one for all."""
        for group, settings in zip(self.ds.optimizer.param_groups, self._group_settings):
            group.update(settings)
        base = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _follow_schedule(self) -> None:
        """After a load, the next step's lr comes from this run's schedule (`train.lr`, `min_lr`,
        `warmup_steps`, `steps` as configured now) at the restored step, not from the saved one: a run
        extended past its old `train.steps` continues the cosine over the new length instead of taking
        a step at the old schedule's end value (0 for min_lr = 0)."""
        sched = self._scheduler
        sched.base_lrs = [self._peak_lr] * len(sched.optimizer.param_groups)
        for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)


def convert_to_universal(checkpoint_dir: str, out_dir: str) -> None:
    """DeepSpeed's universal form of the native checkpoint in `checkpoint_dir/deepspeed/` (every rank's
    files), written to `out_dir/universal/`: each parameter's fp32 weights and Adam moments whole, so
    any number of ranks re-shards them on load under any ZeRO stage. Runs in this process (no pool);
    DeepSpeed's progress output goes to the debug log; its files are unpickled weights-only."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal
    args = argparse.Namespace(input_folder=os.path.join(checkpoint_dir, DEEPSPEED),
                              output_folder=os.path.join(out_dir, UNIVERSAL), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()
    with _weights_only_loading(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", chatter.getvalue()[-2000:])


class DeepSpeedBackward(Backward):
    """The gradient cache's micro-steps on a DeepSpeed engine built with `gradient_accumulation_steps=1`.

    The accumulation boundary is set explicitly before each micro-step (what DeepSpeed documents for
    caller-driven accumulation; `no_sync` is refused under ZeRO 2/3), so ZeRO 1/2 reduce and
    partition the accumulated gradients once, at the last micro-step, and nothing is divided by K.
    """

    def __init__(self, engine: Any):
        self.engine = engine

    @contextlib.contextmanager
    def micro_step(self, is_last: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(is_last)
        yield

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        self.engine.backward(loss)


@torch.no_grad()
def clamp_logit_scale(ds_engine: Any) -> None:
    """θ ← clamp(θ, LOGIT_SCALE_BOUNDS) in the model and in every fp32 master copy DeepSpeed keeps of it
    (else the next step copies the unclamped master back). Call on every rank after each step: under
    ZeRO-1/2 it is a collective. Under ZeRO-3 θ and its master are partitioned; the clamp, being
    elementwise, is exact on each rank's partition."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )
    lo, hi = LOGIT_SCALE_BOUNDS
    p, opt = ds_engine.module.logit_scale, ds_engine.optimizer
    if p.requires_grad and hasattr(p, "ds_id"):              # ZeRO-3: this rank's fp32 partition
        safe_set_local_fp32_param(p, safe_get_local_fp32_param(p).clamp(lo, hi))
    elif p.requires_grad and hasattr(p, "_hp_mapping"):      # ZeRO-1/2, bf16: the fp32 master (collective)
        safe_set_full_fp32_param(p, safe_get_full_fp32_param(p).clamp(lo, hi))
    if isinstance(opt, FP16_UnfusedOptimizer):               # stage 0 in bf16: a copy no accessor exposes
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                if lp is p:
                    hp.data.clamp_(lo, hi)
    ds_engine.module.clamp_logit_scale()
    if getattr(p, "ds_tensor", None) is not None and p.ds_tensor.numel():
        p.ds_tensor.clamp_(lo, hi)


def quiet_deepspeed(level: str, use_gpu: bool) -> None:
    """DeepSpeed's own logger at warnings (debug when the run logs debug): our logger reports.

    Without GPUs its accelerator is named (else every process warns, at import, that it found none), and
    the deprecation warning torch gives for the collective DeepSpeed's ZeRO calls (its call, not ours:
    `pipeline.distributed` uses the new name) is left out; any other warning still shows."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel("DEBUG" if level == "debug" else "WARNING")


# DeepSpeed's Muon optimizer, and the module of its updates (imported by every ZeRO gradient reduction)
MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def prepare_deepspeed(config: dict[str, Any]) -> None:
    """What this process needs before `deepspeed.initialize(config=config)` (the module docstring's start-up
    costs): run-time builds in this venv, no shared-memory all-reduce op, no Muon import."""
    _extensions_in_venv()
    _without_inference_allreduce()
    _without_muon(config)


def _without_muon(config: dict[str, Any]) -> None:
    """Unless the optimizer is DeepSpeed's Muon, stand modules in for its Muon modules: their
    `MuonWithAuxAdam` is a class of its own, so DeepSpeed's `isinstance` checks answer False without
    the import, and their updates (which DeepSpeed calls only for a Muon optimizer) refuse to run.
    Modules already imported are left as they are."""
    if "muon" in str(config.get("optimizer", {}).get("type", "")).lower() or \
            any(name in sys.modules for name in MUON_MODULES):
        return
    for name in MUON_MODULES:
        stand_in = types.ModuleType(name, "Stand-in: this process's optimizer is not Muon.")
        stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {"__module__": name})
        stand_in.muon_update = stand_in.adam_update = _not_muon
        sys.modules[name] = stand_in


def _not_muon(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("DeepSpeed called a Muon update, but this process's optimizer is not Muon: its Muon modules "
                       "are stand-ins (pipeline.train.engine.prepare_deepspeed)")


def _without_inference_allreduce() -> None:
    """Mark DeepSpeed's shared-memory all-reduce op unavailable (its table of compatible ops is meant to
    be edited: it is probed once and kept). Its only caller is `inference_all_reduce`, inference tensor
    parallelism; training's collectives go through torch.distributed whether it is built or not."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _extensions_in_venv() -> None:
    """Point torch's extensions folder (DeepSpeed's op builds) into the running venv, as `make` does:
    an op built against another venv's torch has another build hash and would be rebuilt. Left alone
    when `TORCH_EXTENSIONS_DIR` is set, outside a venv, or when the venv is not writable."""
    if "TORCH_EXTENSIONS_DIR" in os.environ or sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file whose unpickling would run code: refused, naming the file."""


def _unsafe_file(local_dir: str) -> str:
    """The first file of a DeepSpeed checkpoint that weights-only loading refuses."""
    with _weights_only_loading():
        for path in sorted(Path(local_dir, DEEPSPEED).glob("*.pt")):
            try:
                torch.load(path, map_location="cpu")
            except pickle.UnpicklingError:
                return str(path)
    return f"{local_dir}/{DEEPSPEED}"


def share_fp32_master(optimizer: Any) -> int:
    """ZeRO-3 with fp32 parameters: make each fp32 master partition the parameter partition itself, as
    DeepSpeed means to (stage3's `_create_fp32_partitions` shares them when dtype and device agree), and
    return the bytes no longer held. Its device test compares a tensor's `torch.device` with the string
    "cpu" or "cuda:0", which torch 2.13 answers False, so it cloned the partition: 1/W of the weights more
    on every rank. Not for offloaded or swapped optimizer state (the master lives elsewhere there), nor
    once the optimizer holds state for the clone."""
    lows = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if not lows or optimizer.offload_optimizer or optimizer.swap_optimizer or optimizer.params_in_nvme_and_cpu:
        return 0
    freed = 0
    masters = optimizer.fp32_partitioned_groups_flat
    for i, (low, master) in enumerate(zip(lows, masters)):
        if (low is None or master is low or low.dtype != master.dtype or low.device != master.device
                or master in optimizer.optimizer.state):
            continue
        low.ds_id, low.requires_grad = master.ds_id, True
        masters[i] = low
        freed += master.numel() * master.element_size()
    return freed


def trim_heap() -> int:
    """Hand the pages glibc's malloc holds free back to the system (`malloc_trim(0)`); 1 if any went back.

    Tensors below glibc's mmap threshold (which grows, up to 32 MB, each time a larger block is freed) live
    in its heap, and freeing them leaves the pages resident for later allocations: ZeRO 3 partitioning a
    model built whole frees a full copy of the weights this way. 0 where the C library has no malloc_trim."""
    try:
        return int(ctypes.CDLL(None).malloc_trim(0))
    except (AttributeError, OSError):
        return 0


def parameter_count(module: nn.Module) -> int:
    """The parameters of `module` as the model defines them (ZeRO-3's partitioning undone)."""
    return sum(_numel(p) for p in module.parameters())


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _groups(params: list[nn.Parameter], max_bytes: int) -> Iterator[list[nn.Parameter]]:
    """`params` in order, in groups of at most `max_bytes` of fp32 (a larger parameter is a group alone)."""
    group: list[nn.Parameter] = []
    size = 0
    for p in params:
        n = _numel(p) * 4
        if group and size + n > max_bytes:
            yield group
            group, size = [], 0
        group.append(p)
        size += n
    if group:
        yield group


def _gathered(params: list[nn.Parameter]) -> Any:
    """ZeRO-3: every rank holds the full `params` inside the context."""
    import deepspeed
    return deepspeed.zero.GatheredParameters(params)


def _grad_norm(model: nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@contextlib.contextmanager
def _weights_only_loading() -> Iterator[None]:
    """Force `torch.load(weights_only=True)` inside DeepSpeed, with its checkpoints' value classes allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
