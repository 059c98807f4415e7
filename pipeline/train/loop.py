"""The training loop of one Ray Train worker: stream → gradient-cache step → engine step → log → checkpoint."""
from __future__ import annotations

import random
import signal
from typing import Any, Optional

import numpy as np
import torch

from pipeline.config import Config, config_from_dict
from pipeline.data import Tokenizer, gather_state, open_train_stream
from pipeline.distributed import get_rank, get_world_size, named_timeouts
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
from pipeline.train.interrupts import Boundary, report_stopped, training, wait_for_restart
from pipeline.train.metrics import Meter, TrainLogger, step_scalars

log = get_logger(__name__)


def train_worker(config: Config | dict[str, Any]) -> None:
    """Train `config` from its newest checkpoint (or from scratch) up to `train.steps`, on this rank of a
    Ray Train worker group; a stop request or a preemption notice checkpoints the step just finished."""
    cfg = config if isinstance(config, Config) else config_from_dict(config, origin="train_worker")
    rank, world = setup_worker(cfg)
    resume = agreed_resume(cfg)
    stream = open_train_stream(cfg, rank=rank, world_size=world, state=resume.data_state if resume else None,
                               tokenizer=run_tokenizer(cfg))
    engine = Engine(cfg, new_model(cfg, stream.tokenizer), world, universal=bool(resume and resume.resharded(world)))
    state = resume.restore(engine, stream.tokenizer) if resume else TrainState()
    loss_fn, weights_from = make_loss(cfg)
    logger, meter, boundary = TrainLogger(cfg, rank), Meter(cfg.train.global_batch), Boundary(cfg.run_dir)
    if resume:
        publish(engine, stream.tokenizer, cfg, state)     # if a crash came between its checkpoint and publication
        logger.resumed(state.step, skipped_damaged=len(resume.damaged))
    batches = meter.timed(stream)
    with training():                               # a SIGTERM/SIGINT now asks for a checkpoint, then a stop
        while state.step < cfg.train.steps:
            with named_timeouts(f"step {state.step + 1}"):        # a stuck collective fails, naming the step
                batch = to_device(next(batches), engine.device)
                out = engine.forward_backward(batch, loss_fn, weights_from)    # the gradient cache's two passes
                grad_norm = engine.step()              # AdamW, lr schedule, clipping, logit-scale clamp
                state.advance(cfg.train.global_batch)
                verdict = boundary.check(state.step, float(out.loss), grad_norm)   # non-finite: stops unsaved
                report_progress(cfg.run_dir, state.step)
                if logger.due(state.step):
                    logger.log(state.step, step_scalars(out, batch.get("label"), lr=engine.lr, grad_norm=grad_norm,
                                                        bad=stream.stats()["bad"], meter=meter))
                if verdict or state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.steps:
                    logger.sync()                      # the curves reach the checkpoint before a resume starts there
                    checkpoint(engine, stream, cfg, state, loss=float(out.loss))
            if verdict.stop:
                return stop(cfg, logger, verdict.stop, state.step)
            if verdict.notice:
                wait_for_restart(verdict.notice, state.step)
    logger.close()


def checkpoint(engine: Engine, stream: Any, cfg: Config, state: TrainState, loss: float) -> None:
    """Resume checkpoint, published weights, and the report to Ray Train (every rank calls it)."""
    url = save_checkpoint(engine, cfg, state, gather_state(stream), stream.tokenizer)
    publish(engine, stream.tokenizer, cfg, state)
    report_to_ray(url, state, {"loss": loss})


def stop(cfg: Config, logger: TrainLogger, signum: int, step: int) -> None:
    """After the checkpoint of `step`: end this worker cleanly, telling the driver why (rank 0)."""
    logger.close()
    if get_rank() == 0:
        report_stopped(cfg.run_dir, signum, step)
        log.warning("stopped by %s after checkpointing step %d", signal.Signals(signum).name, step)


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
