"""The training loop of one Ray Train worker: stream → gradient-cache step → engine step → log → checkpoint."""
from __future__ import annotations

import math
import random
from typing import Any, Optional

import numpy as np
import torch

from pipeline.config import Config, config_from_dict
from pipeline.data import Tokenizer, gather_state, open_train_stream
from pipeline.distributed import all_reduce_max, get_rank, get_world_size, named_timeouts
from pipeline.log import get_logger, setup_logging
from pipeline.losses import get_loss
from pipeline.models import DualEncoder, build_run_model, run_tokenizer
from pipeline.train.checkpoint import (
    TrainState,
    agreed_resume,
    publish,
    report_progress,
    report_to_ray,
    save_checkpoint,
)
from pipeline.train.engine import Engine, quiet_deepspeed
from pipeline.train.metrics import Meter, TrainLogger, step_scalars

log = get_logger(__name__)


def train_worker(config: Config | dict[str, Any]) -> None:
    """Train `config` from its newest checkpoint (or from scratch) up to `train.steps`, on this rank."""
    cfg = config if isinstance(config, Config) else config_from_dict(config, origin="train_worker")
    rank, world = setup_worker(cfg)
    resume = agreed_resume(cfg)
    stream = open_train_stream(cfg, rank=rank, world_size=world, state=resume.data_state if resume else None,
                               tokenizer=run_tokenizer(cfg))
    engine = Engine(cfg, new_model(cfg, stream.tokenizer), world, universal=bool(resume and resume.resharded(world)))
    state = resume.restore(engine, stream.tokenizer) if resume else TrainState()
    if resume:
        publish(engine, stream.tokenizer, cfg, state)     # if a crash came between its checkpoint and publication
    loss_fn, weights_from = make_loss(cfg)
    logger, meter = TrainLogger(cfg, rank), Meter(cfg.train.global_batch)
    batches = meter.timed(stream)
    while state.step < cfg.train.steps:
        with named_timeouts(f"step {state.step + 1}"):        # a stuck collective fails, naming the step
            batch = to_device(next(batches), engine.device)
            out = engine.forward_backward(batch, loss_fn, weights_from)    # the gradient cache's two passes
            grad_norm = engine.step()              # AdamW, lr schedule, clipping, logit-scale clamp
            state.advance(cfg.train.global_batch)
            stop_if_not_finite(state.step, float(out.loss), grad_norm)   # before anything is logged or saved
            report_progress(cfg.run_dir, state.step)
            if logger.due(state.step):
                logger.log(state.step, step_scalars(out, batch.get("label"), lr=engine.lr, grad_norm=grad_norm,
                                                    bad=stream.stats()["bad"], meter=meter))
            if state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.steps:
                logger.sync()                      # the curves reach the checkpoint before a resume can start there
                checkpoint(engine, stream, cfg, state, loss=float(out.loss))
    logger.close()


def checkpoint(engine: Engine, stream: Any, cfg: Config, state: TrainState, loss: float) -> None:
    """Resume checkpoint, published weights, and the report to Ray Train (every rank calls it)."""
    url = save_checkpoint(engine, cfg, state, gather_state(stream), stream.tokenizer)
    publish(engine, stream.tokenizer, cfg, state)
    report_to_ray(url, state, {"loss": loss})


# ------------------------------------------------------------------------------------ pieces
def setup_worker(cfg: Config) -> tuple[int, int]:
    """Logging with the rank, DeepSpeed quiet, generators seeded alike for the model's initialisation."""
    rank, world = get_rank(), get_world_size()
    setup_logging(cfg.logging.level, rank)
    quiet_deepspeed(cfg.logging.level)
    seed_everything(cfg.seed)
    log.info("worker %d of %d: %d torch threads, device %s", rank, world, torch.get_num_threads(),
             "cuda" if torch.cuda.is_available() else "cpu")
    return rank, world


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def new_model(cfg: Config, tokenizer: Tokenizer) -> DualEncoder:
    """The dual encoder (same initial weights on every rank; `model.init_from`'s where it is set), then
    per-rank generators for dropout."""
    model = build_run_model(cfg, vocab_size=tokenizer.vocab_size)
    seed_everything(cfg.seed * 65536 + get_rank() + 1)
    return model.train()


def make_loss(cfg: Config) -> tuple[torch.nn.Module, Optional[str]]:
    """The loss module and, for cwcl, the tower whose embeddings weight it (the frozen one: validated)."""
    fn = get_loss(cfg.loss.name, tiled=cfg.loss.tiled, tile_size=cfg.loss.tile_size, **cfg.loss.hyper())
    return fn, (cfg.model.frozen_towers()[0] if fn.uses_weights else None)


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite: the run stops at that step."""


def stop_if_not_finite(step: int, loss: float, grad_norm: float) -> None:
    """Stop every rank at the first step whose loss (on any rank) or gradient norm is not finite. That
    step is never checkpointed, so the last good checkpoints stay (none is pruned because of it)."""
    bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if all_reduce_max(torch.tensor(float(bad))) > 0:                  # every rank stops at the same step
        raise NonFiniteError(f"step {step}: the loss or the gradient norm is not finite (on rank {get_rank()}: "
                             f"loss {loss}, gradient norm {grad_norm}); stopped without checkpointing this step. "
                             "The newest checkpoint is the last good one: lower train.lr (or raise "
                             "train.warmup_steps), check the data, then rerun to resume from it")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
