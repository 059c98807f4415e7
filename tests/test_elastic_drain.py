"""A preemption notice on a two-node local cluster (`ray.cluster_utils.Cluster`): the node hosting one of
the two workers of an elastic run (`cluster.num_workers: [1, 2]`) is drained with a 20 s deadline, as a
spot reclaim or a Kubernetes eviction would, and taken away once its deadline has been used.

Every worker checkpoints the step at which the notice reached it, Ray Train restarts the group without
that node (one worker on the other), the run resumes from that checkpoint on the new world size and
finishes: no step is trained twice, TensorBoard holds each step once, and the final weights equal the
uninterrupted two-worker run's up to float reduction order (a small lr: PEERS item 10).
"""
from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch

from pipeline import storage
from pipeline.layout import checkpoint_url, published_url
from tests.helpers.cluster import cluster_job, two_node_cluster, write_config
from tests.helpers.compare import max_abs_diff
from tests.helpers.driver import Driver, logged_steps
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow

STEPS, EVERY = 40, 20
LR = 1e-4
DEADLINE_S = 20
# Runs differing only in world size agree to ~lr·1e-2 per step (PEERS item 10): 40 steps at 1e-4 → 4e-5.
TOLERANCE = STEPS * LR * 1e-2
FAST_NOTICE = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}    # Ray Train's drain poll (default 5 s): short runs


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each: one worker per node."""
    c = two_node_cluster(cpus_per_node=1)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def config(tmp_path_factory, synth, cluster) -> Callable[..., Path]:
    data = synth(256, seed=5) / "train"
    folder = tmp_path_factory.mktemp("configs")

    def make(run_dir: str, num_workers) -> Path:
        return write_config(folder, cluster_job(run_dir, data, cluster.address, steps=STEPS, every=EVERY, lr=LR,
                                                keep=3, num_workers=num_workers))
    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config) -> str:
    """The uninterrupted run on both nodes."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    driver = Driver("train", str(config(run_dir, 2)), env=FAST_NOTICE)
    assert driver.finish() == 0, driver.output[-4000:]
    return run_dir


def nodes_hosting_workers(cluster) -> list:
    """The worker nodes whose raylet has a Ray Train worker process as a child now."""
    found = []
    for node in cluster.list_all_nodes():
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        if not node.head and any(" ".join(c.cmdline()).startswith("ray::RayTrainWorker") for c in raylet.children()):
            found.append(node)
    return found


def drain(cluster, node, deadline_s: int) -> None:
    """Ray's drain-node API (what an autoscaler calls before a spot reclaim): preemption, with a deadline."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2
    accepted, why = GcsClient(address=cluster.gcs_address).drain_node(
        node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "test: spot reclaim",
        int(time.time() * 1000) + deadline_s * 1000)
    assert accepted, why


def published_weights(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    from pipeline.models import load_published
    return load_published(published_url(run_dir, step)).model.state_dict()


def test_a_drained_node_checkpoints_at_the_notice_and_the_run_continues_without_it(cluster, config, reference,
                                                                                   tmp_path):
    run_dir = str(tmp_path / "run")
    driver = Driver("train", str(config(run_dir, [1, 2])), env=FAST_NOTICE)
    try:
        driver.wait_for(rf"step 3/{STEPS}")
        node = nodes_hosting_workers(cluster)[0]
        drain(cluster, node, DEADLINE_S)
        drained_at = time.monotonic()
        notice = int(driver.wait_for(r"preemption notice .* checkpointed step (\d+)", timeout_s=60).group(1))
        noticed_after = time.monotonic() - drained_at
        assert storage.is_complete(checkpoint_url(run_dir, notice))
        driver.wait_for(r"resumed from", timeout_s=120)
        hosts = nodes_hosting_workers(cluster)
        assert driver.finish() == 0, driver.output[-4000:]
    finally:
        if driver.proc.poll() is None:
            driver.kill()
    output = driver.output

    assert notice % EVERY and 3 <= notice < STEPS and noticed_after < DEADLINE_S, (notice, noticed_after)
    assert [n.node_id for n in hosts] != [node.node_id] and len(hosts) == 1, "the new group runs on the other node"
    assert re.search(rf"resumed from \S+/step_{notice:08d} \(step {notice}\), written by 2 workers, continued on 1",
                     output), output[-4000:]
    assert logged_steps(output) == Counter(range(1, STEPS + 1)), "every step trained once: nothing redone"
    logged = Counter(step for step, _ in scalars(storage.join(run_dir, "tensorboard"))["train/loss"])
    assert logged == Counter(range(1, STEPS + 1))
    diff = max_abs_diff(published_weights(run_dir, STEPS), published_weights(reference, STEPS))
    assert diff < TOLERANCE, diff
