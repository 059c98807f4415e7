"""A two-node Ray cluster on one machine (`ray.cluster_utils.Cluster`) and the small job its tests train on it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def two_node_cluster(cpus_per_node: int) -> Any:
    """A head without CPUs (drivers and Ray's own actors only) and two nodes of `cpus_per_node` each."""
    from ray.cluster_utils import Cluster
    small = dict(object_store_memory=128 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **small))
    for _ in range(2):
        cluster.add_node(num_cpus=cpus_per_node, **small)
    cluster.wait_for_nodes()
    return cluster


def cluster_job(run_dir: str, data: Path, address: str, *, steps: int, every: int, lr: float, keep: int,
                **cluster: Any) -> dict[str, Any]:
    """The tiny model on 32×32 images, fp32, ZeRO 1, global batch 16 in chunks of 4, every step logged; the
    test cluster runs without tokens (conftest), so `cluster.auth` is disabled. `cluster` adds cluster.* keys."""
    return {
        "run_dir": run_dir, "seed": 7,
        "data": {"train_urls": [str(data)], "image_size": 32, "context_length": 16, "shuffle_buffer": 64},
        "model": {"name": "tiny"},
        "train": {"steps": steps, "global_batch": 16, "lr": lr, "warmup_steps": 2, "log_every": 1,
                  "precision": "fp32"},
        "gradcache": {"chunk_size": 4},
        "deepspeed": {"zero_optimization": {"stage": 1}},
        "cluster": {"address": address, "cpus_per_worker": 1, "auth": "disabled", **cluster},
        "checkpoint": {"every_steps": every, "keep": keep},
        "eval": {"schedule": "off"},
        "logging": {"progress": False},
    }


def write_config(folder: Path, cfg: dict[str, Any]) -> Path:
    """`cfg` as the next `run-N.yaml` in `folder`."""
    path = folder / f"run-{len(list(folder.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
