"""The training stage: DeepSpeed engine, the step loop of each Ray worker, checkpoints, TensorBoard.

`pipeline.orchestrate.train(cfg)` starts it; each worker runs `pipeline.train.loop.train_worker`.
"""
from pipeline.train.checkpoint import TrainState, latest_checkpoint
from pipeline.train.engine import Engine, deepspeed_config, lr_factor, param_groups

__all__ = ["Engine", "TrainState", "deepspeed_config", "latest_checkpoint", "lr_factor", "param_groups"]
