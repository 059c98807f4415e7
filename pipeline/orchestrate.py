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
from pipeline.log import Timeline, get_logger
from pipeline.train.checkpoint import find_resume, refuse_existing
from pipeline.train.loop import launched_worker

log = get_logger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20     # the data never goes through it; pages never touched cost no memory
# A local Ray runs on one machine for one job, started and stopped by this driver: no node is ever
# drained (Ray Train's preemption watcher is an actor polling for nothing), no dashboard reads Ray
# Train's metrics, and the workers Ray would prestart for the driver's environment never serve Ray
# Train's actors (they get their own). Each is a process, or CPU seconds taken from the start-up of
# a 2-core machine. Set any of these in the environment to override.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_prestart_worker_first_driver": "0",
}


class TrainingError(RuntimeError):
    """Training failed on the workers; the message carries each failing worker's error."""


def train(cfg: Config) -> Any:
    """Train `cfg` on `cluster.num_workers` Ray workers and return Ray Train's result.

    Refusals that need no worker are raised here, before anything starts (`preflight`). The start-up
    timeline begun here is continued by the workers; rank 0 logs it at its first step.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    startup = Timeline()
    startup.mark("python, imports, config")

    cfg = absolute_paths(cfg)
    preflight(cfg)
    startup.mark("preflight")
    started_here = connect(cfg)
    startup.mark("ray start")
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.use_gpu else {})}
    trainer = (local_trainer_class() if started_here else TorchTrainer)(
        launched_worker, train_loop_config={"config": cfg.to_dict(), "startup": startup.to_dict()},
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


def connect(cfg: Config) -> bool:
    """Join the Ray cluster at `cluster.address`, or start a new local one (never another session's);
    True when it started one.

    A Ray already initialised in this process (a test module's, a notebook's) is used as it is.
    """
    import ray
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=True)
        return False
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    eval_cpus = cfg.eval.cpus if cfg.eval.schedule != "off" else 0
    needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + eval_cpus
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1")
    return True


def local_trainer_class() -> type:
    """`TorchTrainer` without three helper actors that a Ray started by this driver does not need, each a
    Python process (about 200 MB and 2 CPU-seconds to start): the dataset manager, made for Ray Data
    datasets even when there are none (the workers stream their shards themselves); the placement-group
    cleaner, which frees the workers' resources should the controller die while the cluster lives on
    (a local Ray ends with its driver); and the autoscaling coordinator that a fixed worker group asks
    for its resources (one node, no autoscaler: the controller waits seconds for it to start). These
    are Ray Train 2.60's own hooks (the version setup.cfg pins); every other callback stays."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class LocalFixedScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context: Any) -> None:
            """No resource request: nothing autoscales a local Ray."""

        def _maybe_send_resource_request(self) -> None:
            """As above."""

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            unneeded = (DatasetsCallback, PlacementGroupCleanerCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unneeded)]

        def _initialize_and_run_controller(self, *, scaling_policy: Any, **kwargs: Any) -> Any:
            if type(scaling_policy) is FixedScalingPolicy:
                scaling_policy = LocalFixedScalingPolicy(scaling_policy.scaling_config)
            return super()._initialize_and_run_controller(scaling_policy=scaling_policy, **kwargs)
    return LocalTorchTrainer


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
