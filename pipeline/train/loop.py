"""The training loop of one Ray Train worker: stream → gradient-cache step → engine step → log → checkpoint."""
from __future__ import annotations

import logging
import random
import signal
import time
from typing import Any, Optional

import numpy as np
import torch

from pipeline.config import Config, config_from_dict
from pipeline.data import Tokenizer, gather_state, open_train_stream
from pipeline.distributed import get_rank, get_world_size, named_timeouts
from pipeline.gradcache import StepOutput
from pipeline.log import Timeline, get_logger, process_start_time, setup_logging
from pipeline.losses import get_loss, hyper_parameters
from pipeline.models import DualEncoder, TextDualEncoder, build_run_model, run_tokenizer
from pipeline.train.checkpoint import (
    TrainState,
    agreed_resume,
    publish,
    report_progress,
    save_checkpoint,
)
from pipeline.train.engine import Engine, quiet_deepspeed
from pipeline.train.interrupts import Boundary, Verdict, report_stopped, training, wait_for_restart
from pipeline.train.metrics import Meter, TrainLogger, step_scalars, temperature_histograms
from pipeline.train.progress import DATA_ENDED, FINISHED, STARTED, STOPPED, record_event

log = get_logger(__name__)


def launched_worker(payload: dict[str, Any]) -> None:
    """The Ray Train entry point of `pipeline.orchestrate.train`: `payload` holds the run config
    (`config`) and the driver's start-up timeline (`startup`), which this worker continues."""
    startup = Timeline.from_dict(payload["startup"])
    startup.mark("ray train", at=process_start_time())        # the worker group, this process
    train_worker(payload["config"], startup)


def train_worker(config: Config | dict[str, Any], startup: Optional[Timeline] = None) -> None:
    """Train `config` from its newest checkpoint (or from scratch) up to `train.steps`, on this rank of a
    Ray Train worker group; a stop request or a preemption notice checkpoints the step just finished.

    `startup` (default: one from this process's start) gets a mark per start-up phase; rank 0 logs
    it once the first step is done.
    """
    startup = startup or Timeline()
    startup.mark("worker start")                               # imports, the process group
    cfg = config if isinstance(config, Config) else config_from_dict(config, origin="train_worker")
    rank, world = setup_worker(cfg)
    resume = agreed_resume(cfg)
    stream = open_train_stream(cfg, rank=rank, world_size=world, state=resume.data_state if resume else None,
                               tokenizer=run_tokenizer(cfg))
    model = new_model(cfg, stream.tokenizer)
    startup.mark("data, model")
    engine = Engine(cfg, model, world, universal=bool(resume and resume.resharded(world)))
    state = resume.restore(engine, stream.tokenizer) if resume else TrainState()
    loss_fn, weights_from = make_loss(cfg)
    if resume and hasattr(loss_fn, "load_sample_state"):    # isogclr: every saved rank's shard, this rank's ids kept
        loss_fn.load_sample_state(resume.sample_state())
    logger, meter, boundary = TrainLogger(cfg, rank), Meter(cfg.train.global_batch), Boundary(cfg.run_dir)
    if resume:
        publish(engine, stream.tokenizer, cfg, state)     # if a crash came between its checkpoint and publication
        logger.resumed(state.step, skipped_damaged=len(resume.damaged))
    attempt_started(cfg, state.step, world, resumed=bool(resume))
    startup.mark("deepspeed")                             # its engine, and the checkpoint when resuming
    batches = meter.timed(stream)
    if cfg.checkpoint.publish_initial and state.step == 0:
        publish(engine, stream.tokenizer, cfg, state)      # step 0: what fine-tuning starts from
    saved = state.step
    try:
        with training():                           # a SIGTERM/SIGINT now asks for a checkpoint, then a stop
            while state.step < cfg.train.steps:
                batch = next(batches, None)
                if batch is None:                  # a source with `on_end: stop` ran out, on every rank alike
                    data_ended(cfg, state.step, str(stream.exhausted))
                    break
                with named_timeouts(f"step {state.step + 1}"):    # a stuck collective fails, naming the step
                    out, grad_norm, verdict = train_step(engine, to_device(batch, engine.device), loss_fn,
                                                         weights_from, state, cfg, boundary)
                    if startup is not None:        # the first step of this attempt
                        first_step_done(startup)
                        startup = None
                    if logger.due(state.step):
                        logger.log(state.step, step_scalars(out, batch, lr=engine.lr, grad_norm=grad_norm,
                                                            data=stream.stats(), meter=meter),
                                   temperature_histograms(loss_fn))
                    if verdict or state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.steps:
                        logger.sync()              # the curves reach the checkpoint before a resume can start there
                        checkpoint(engine, stream, cfg, state, loss_fn)
                        saved = state.step
                if verdict.stop:
                    return stop(cfg, logger, verdict.stop, state.step)
                if verdict.notice:
                    wait_for_restart(verdict.notice, state.step)
            if saved < state.step:                 # the data ended between checkpoints: keep where it ended
                logger.sync()
                checkpoint(engine, stream, cfg, state, loss_fn)
    finally:
        stream.close()                             # its loader processes end with the loop
    logger.close()
    if get_rank() == 0:
        record_event(cfg.run_dir, FINISHED, step=state.step)


def train_step(engine: Engine, batch: dict[str, Any], loss_fn: torch.nn.Module, weights_from: Optional[str],
               state: TrainState, cfg: Config, boundary: Boundary) -> tuple[StepOutput, float, Verdict]:
    """One optimizer step: the gradient cache's two passes, then AdamW (schedule, clipping, scale clamp),
    then the boundary every rank agrees on: a non-finite step stops every rank before anything of it is
    logged or saved (`NonFiniteError`); a stop request or a preemption notice asks for a checkpoint."""
    at_step = getattr(loss_fn, "at_step", None)       # mochi: this step's mixing draws
    if at_step is not None:
        at_step(state.step)
    out = engine.forward_backward(batch, loss_fn, weights_from)
    grad_norm = engine.step()
    after_step = getattr(loss_fn, "after_step", None)  # isogclr: the step's per-sample state, written once
    if after_step is not None:
        after_step()
    state.advance(cfg.train.global_batch)
    verdict = boundary.check(state.step, float(out.loss), grad_norm)
    report_progress(cfg.run_dir, state.step)
    return out, grad_norm, verdict


def checkpoint(engine: Engine, stream: Any, cfg: Config, state: TrainState,
               loss_fn: torch.nn.Module) -> None:
    """Resume checkpoint (with the loss's per-sample state, when it keeps one), then published weights (every
    rank calls it)."""
    started = time.perf_counter()
    sample_state = loss_fn.sample_state() if hasattr(loss_fn, "sample_state") else None
    save_checkpoint(engine, cfg, state, gather_state(stream), stream.tokenizer, sample_state)
    publish(engine, stream.tokenizer, cfg, state)
    if get_rank() == 0:
        log.info("step %d checkpointed and published (%.1f s)", state.step, time.perf_counter() - started)


def stop(cfg: Config, logger: TrainLogger, signum: int, step: int) -> None:
    """After the checkpoint of `step`: end this worker cleanly, telling the driver why (rank 0)."""
    logger.close()
    if get_rank() == 0:
        report_stopped(cfg.run_dir, signum, step)
        record_event(cfg.run_dir, STOPPED, step=step, signal=signal.Signals(signum).name)
        log.warning("stopped by %s after checkpointing step %d", signal.Signals(signum).name, step)


# ------------------------------------------------------------------------------------ pieces
def first_step_done(startup: Timeline) -> None:
    """Close the start-up timeline at the first step of this attempt; rank 0 logs where the time went."""
    startup.mark("first step")
    if get_rank() == 0:
        log.info("start-up: first step done %s after launch", startup.summary())


def setup_worker(cfg: Config) -> tuple[int, int]:
    """Logging with the rank, DeepSpeed quiet, generators seeded alike for the model's initialisation."""
    rank, world = get_rank(), get_world_size()
    setup_logging(cfg.logging.level, rank)
    quiet_deepspeed(cfg.logging.level, cfg.cluster.use_gpu)
    seed_everything(cfg.seed)
    log.log(logging.INFO if rank == 0 else logging.DEBUG, "%d workers, torch threads per worker: %d, device %s", world,
            torch.get_num_threads(), "cuda" if torch.cuda.is_available() else "cpu")
    return rank, world


def data_ended(cfg: Config, step: int, reason: str) -> None:
    log.info("training ends at step %d of %d: %s", step, cfg.train.steps, reason)
    if get_rank() == 0:
        record_event(cfg.run_dir, DATA_ENDED, step=step, reason=reason)


def attempt_started(cfg: Config, step: int, world: int, resumed: bool) -> None:
    """Rank 0 records that this attempt (a first start, a restart, a resume) begins at `step`."""
    if get_rank() == 0:
        record_event(cfg.run_dir, STARTED, step=step, world_size=world, resumed=resumed, total=cfg.train.steps)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def new_model(cfg: Config, tokenizer: Tokenizer) -> DualEncoder | TextDualEncoder:
    """The dual encoder (same initial weights on every rank; `model.init_from`'s where it is set), then
    per-rank generators for dropout."""
    model = build_run_model(cfg, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    seed_everything(cfg.seed * 65536 + get_rank() + 1)
    return model.train()


def make_loss(cfg: Config) -> tuple[torch.nn.Module, Optional[str]]:
    """The loss module and, for cwcl, the tower whose embeddings weight it (the frozen one: validated)."""
    hyper = cfg.loss.hyper()
    if "seed" in hyper_parameters(cfg.loss.name):      # mochi: its mixing draws follow the run's seed and step
        hyper["seed"] = cfg.seed
    fn = get_loss(cfg.loss.name, tiled=cfg.loss.tiled, tile_size=cfg.loss.tile_size,
                  matryoshka_dims=cfg.loss.matryoshka_dims, **hyper)
    return fn, (cfg.model.frozen_towers()[0] if fn.uses_weights else None)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
