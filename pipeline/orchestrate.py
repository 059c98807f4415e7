"""The Ray driver: training as a Ray Train `TorchTrainer` of `train_worker`s, the eval actor beside it.

One code path for every scale: a local Ray on a laptop (dashboard off, bound to 127.0.0.1) or a
cluster at `cluster.address`; the tests, the demo and a multi-node run all come through `train`.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any

from pipeline import storage
from pipeline.config import Config
from pipeline.data import open_train_stream
from pipeline.eval.scheduler import start_eval_actor
from pipeline.layout import RAY
from pipeline.log import get_logger
from pipeline.train.checkpoint import find_resume, refuse_existing
from pipeline.train.loop import train_worker

log = get_logger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20     # the data never goes through Ray's object store


class TrainingError(RuntimeError):
    """Training failed on the workers; the message carries each failing worker's error."""


def train(cfg: Config) -> Any:
    """Train `cfg` on `cluster.num_workers` Ray workers and return Ray Train's result.

    Refusals that need no worker are raised here, before anything starts (`preflight`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    preflight(cfg)
    connect(cfg)
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker, train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources,
                                     placement_strategy=c.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=RunConfig(name=time.strftime("train-%Y%m%d-%H%M%S"), **ray_storage(cfg.run_dir),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)))
    evaluator = start_eval_actor(cfg) if cfg.eval.schedule != "off" else None
    try:
        return trainer.fit()
    except Exception as e:
        raise TrainingError(failure_summary(e)) from e
    finally:
        if evaluator is not None:
            evaluator.finish(timeout_s=cfg.eval.claim_ttl_s)


def absolute_paths(cfg: Config) -> Config:
    """A copy of `cfg` with its local relative paths made absolute: Ray workers run in other folders."""
    def fix(url: str) -> str:
        return url if "://" in url else os.path.abspath(url)

    cfg = copy.deepcopy(cfg)
    cfg.run_dir = fix(cfg.run_dir)
    cfg.data.train_urls = [fix(u) for u in cfg.data.train_urls]
    cfg.data.eval_dir = cfg.data.eval_dir and fix(cfg.data.eval_dir)
    cfg.data.tokenizer = cfg.data.tokenizer and fix(cfg.data.tokenizer)
    for tower in (cfg.model.image, cfg.model.text):
        tower.hf_path = tower.hf_path and fix(tower.hf_path)
    return cfg


def preflight(cfg: Config) -> None:
    """What the workers would refuse, refused once in the driver: a run_dir of another model,
    `train.resume=never` over existing checkpoints, an impossible world-size change, missing shards or
    tokenizer, shards too few for the data stream. (A worker error would cost a Ray start, and
    `cluster.max_failures` restarts of something that cannot succeed.)"""
    if cfg.train.resume == "never":
        refuse_existing(cfg)
    resume = find_resume(cfg, cfg.cluster.num_workers)
    open_train_stream(cfg, rank=0, world_size=cfg.cluster.num_workers, state=resume.data_state if resume else None)


def connect(cfg: Config) -> None:
    """Join the Ray cluster at `cluster.address`, or start a new local one (never another session's).

    A Ray already initialised in this process (a test module's, a notebook's) is used as it is.
    """
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=True)
        return
    eval_cpus = cfg.eval.cpus if cfg.eval.schedule != "off" else 0
    needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + eval_cpus
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
             runtime_env={"worker_process_setup_hook": "pipeline.orchestrate.quiet_local_ray"})


def quiet_local_ray() -> None:
    """Without a dashboard Ray Train's placement-group cleaner cannot query actor state and warns about
    it every few seconds; that says nothing about the run, so a local Ray keeps it to errors."""
    import logging
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def ray_storage(run_dir: str) -> dict[str, Any]:
    """Where Ray Train keeps its own records (`run_dir/ray`), through fsspec when run_dir is remote."""
    if storage.is_local(run_dir):
        return {"storage_path": os.path.abspath(storage.join(storage.local_path(run_dir), RAY))}
    import pyarrow.fs
    fs, path = storage.filesystem(run_dir)
    return {"storage_path": f"{path.rstrip('/')}/{RAY}",
            "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def failure_summary(error: BaseException) -> str:
    """One line per failing worker with its own error, not Ray's wrapping of it."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return f"training failed: {type(error).__name__}: {error}"
    lines = []
    for rank, exc in sorted(failures.items()):
        cause = getattr(exc, "cause", None) or exc
        lines.append(f"worker {rank}: {type(cause).__name__}: {cause}")
    return "training failed:\n  " + "\n  ".join(lines)
