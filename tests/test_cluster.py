"""Ray at cluster scale on one machine: two Ray nodes (`ray.cluster_utils.Cluster`) and `contrast train`
as a separate driver process joining them, watched from outside.

* placement: SPREAD puts the two training workers on different nodes (the Ray Train worker processes
  found under each node's raylet), the run trains and publishes;
* fault tolerance: one worker process is SIGKILLed between two checkpoints; Ray Train restarts the
  group, which resumes from the last complete checkpoint: the final weights equal the uninterrupted
  run's, every published checkpoint is readable the moment it appears, TensorBoard holds each step
  of each scalar once, with the uninterrupted run's values;
* remote storage: `run_dir` on a real S3-compatible server (moto on 127.0.0.1); the driver is killed
  mid-run and a new one resumes from the checkpoint in the bucket, to the same final weights;
  the credentials appear in no output and in no file of the run.

The uninterrupted run is the reference for both interrupted ones (same config, run_dir apart).
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest
import torch
from safetensors.torch import load as load_safetensors

from pipeline import storage
from pipeline.models import load_published
from tests.helpers.cluster import cluster_job, two_node_cluster, write_config

pytestmark = pytest.mark.slow

STEPS, EVERY = 16, 8                 # checkpoints (and published weights) at steps 8 and 16; a kill is
                                     # aimed just after the first, 8 steps of margin before the second
NODE_CPUS = 2                        # either node could hold both workers: only SPREAD separates them
CONTRAST = str(Path(sys.executable).with_name("contrast"))
OWN_TAGS = ("train/", "perf/", "data/")
SAME_VALUE_TAGS = ("train/loss", "train/logit_scale", "train/alignment", "train/grad_norm")

Curves = dict[str, list[tuple[int, float]]]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def credentials(s3_server):
    """Credentials unique to this module, in the environment of the cluster's nodes and every driver."""
    creds = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
             "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    yield creds
    os.environ.update({k: v for k, v in old.items() if v is not None})


@pytest.fixture(scope="module")
def cluster(credentials):
    """Two nodes of NODE_CPUS each, started with the credentials in their environment."""
    c = two_node_cluster(NODE_CPUS)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def data_dir(synth) -> Path:
    return synth(256, seed=3)


@pytest.fixture(scope="module")
def config(tmp_path_factory, data_dir, cluster) -> Callable[[str], Path]:
    """A function of run_dir writing the run config (tiny model, 32×32 images, fp32, ZeRO 1, two
    workers, SPREAD, up to 2 restarts) and returning its path."""
    folder = tmp_path_factory.mktemp("configs")

    def make(run_dir: str) -> Path:
        return write_config(folder, cluster_job(run_dir, data_dir / "train", cluster.address, steps=STEPS,
                                                every=EVERY, lr=1e-3, keep=2, num_workers=2,
                                                placement_strategy="SPREAD", max_failures=2))
    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config, cluster):
    """The uninterrupted run: its run_dir, what the watcher saw, the driver's result."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    watch = Watcher(cluster, run_dir)
    result = run_contrast_train(config(run_dir), watch)
    assert result.returncode == 0, result.stdout[-4000:]
    return run_dir, watch


# ------------------------------------------------------------------------------------- helpers
class Watcher(threading.Thread):
    """Polls while a run trains: the Ray Train worker processes under each node's raylet, and the
    published checkpoints, each loaded (hash checked) as soon as it is complete; `on_poll` may act."""

    def __init__(self, cluster, run_dir: str, on_poll: Optional[Callable[[Watcher], None]] = None):
        super().__init__(daemon=True)
        self.raylets = {n.node_id: n.all_processes["raylet"][0].process.pid for n in cluster.list_all_nodes()}
        self.published_url = storage.join(run_dir, "published")
        self.on_poll = on_poll
        self.driver: Optional[subprocess.Popen] = None
        self.worker_nodes: dict[int, str] = {}         # pid → node id of every Ray Train worker seen
        self.together: set[tuple[str, ...]] = set()    # the nodes of the workers alive at one moment
        self.published: dict[int, Optional[str]] = {}  # step → None when it loaded, else the error
        self.done = threading.Event()

    def alive_workers(self) -> dict[int, str]:
        found = {}
        for node_id, raylet in self.raylets.items():
            for p in _children(raylet):
                try:
                    if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::RayTrainWorker"):
                        found[p.pid] = node_id
                except psutil.NoSuchProcess:
                    pass
        return found

    def run(self) -> None:
        while not self.done.is_set():
            alive = self.alive_workers()
            self.worker_nodes.update(alive)
            if alive:
                self.together.add(tuple(sorted(alive.values())))
            for step in published_steps(self.published_url):
                if step not in self.published:
                    try:
                        load_published(storage.join(self.published_url, f"step_{step:08d}"))
                        self.published[step] = None
                    except Exception as e:
                        self.published[step] = f"{type(e).__name__}: {e}"
            if self.on_poll:
                self.on_poll(self)
            time.sleep(0.2)


def _children(pid: int) -> list[psutil.Process]:
    """Direct children: the raylet's worker processes (their own forks, e.g. a compiler launched by
    DeepSpeed, briefly carry the same title and are not workers)."""
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def published_steps(published_url: str) -> list[int]:
    return [int(name.split("_")[1]) for name in storage.complete_subdirs(published_url)]


def run_contrast_train(config_path: Path, watch: Watcher, timeout: float = 400) -> subprocess.CompletedProcess:
    """`contrast train CONFIG` as a driver process, watched while it runs; its output captured."""
    proc = subprocess.Popen([CONTRAST, "train", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watch.driver = proc
    watch.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        watch.done.set()
        watch.join()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    url = storage.join(run_dir, "published", f"step_{STEPS:08d}", "model.safetensors")
    return load_safetensors(storage.read_bytes(url))


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def tensorboard_curves(run_dir: str) -> Curves:
    """Every (step, value) of every scalar in the run's event files, as written (nothing merged)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util
    curves: Curves = {}
    with tempfile.TemporaryDirectory() as local:
        storage.download_dir(storage.join(run_dir, "tensorboard"), local)
        for path in sorted(Path(local).rglob("*tfevents*")):
            for event in EventFileLoader(str(path)).Load():
                for v in event.summary.value:
                    value = float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                    curves.setdefault(v.tag, []).append((event.step, value))
    return curves


def assert_same_curves(curves: Curves, reference: Curves) -> None:
    """Each training scalar once per step, at the uninterrupted run's steps (every step for the loss;
    train/tolerance only where a batch has labels), with its values (perf/ timings naturally differ)."""
    own = sorted(tag for tag in reference if tag.startswith(OWN_TAGS))
    assert [s for s, _ in sorted(reference["train/loss"])] == list(range(1, STEPS + 1))
    assert sorted(tag for tag in curves if tag.startswith(OWN_TAGS)) == own
    for tag in own:
        steps = sorted(s for s, _ in curves[tag])
        assert len(steps) == len(set(steps)), f"{tag}: steps logged twice: {steps}"
        assert steps == sorted(s for s, _ in reference[tag]), f"{tag}: steps {steps}"
    for tag in SAME_VALUE_TAGS:
        assert sorted(curves[tag]) == sorted(reference[tag]), f"{tag}: values differ from the uninterrupted run"


# -------------------------------------------------------------------------------------- tests
def test_spread_places_each_worker_on_its_own_node_and_publishes(reference, cluster):
    run_dir, watch = reference
    worker_nodes = {n.node_id for n in cluster.list_all_nodes() if not n.head}
    assert len(watch.worker_nodes) == 2, f"expected one group of 2 workers, saw {watch.worker_nodes}"
    assert set(watch.worker_nodes.values()) == worker_nodes, "each worker on its own node"
    assert all(len(set(nodes)) == len(nodes) for nodes in watch.together), watch.together
    assert watch.published == {EVERY: None, STEPS: None}, watch.published
    assert published_steps(storage.join(run_dir, "published")) == [EVERY, STEPS]


def test_sigkilled_worker_restarts_from_the_last_checkpoint_with_nothing_lost(reference, config, cluster, tmp_path):
    ref_dir, _ = reference
    run_dir = str(tmp_path / "run")
    killed: dict[str, int] = {}

    def kill_a_worker_after_the_first_checkpoint(watch: Watcher) -> None:
        if killed or EVERY not in watch.published:
            return
        pid = min(watch.alive_workers())
        os.kill(pid, signal.SIGKILL)
        killed.update(pid=pid, published_before=len(published_steps(watch.published_url)))

    watch = Watcher(cluster, run_dir, on_poll=kill_a_worker_after_the_first_checkpoint)
    result = run_contrast_train(config(run_dir), watch)

    assert result.returncode == 0, result.stdout[-4000:]
    assert killed.get("published_before") == 1, f"the kill must fall between the two checkpoints: {killed}"
    assert len(watch.worker_nodes) == 4, f"a second group of 2 new processes: {watch.worker_nodes}"
    assert re.search(rf"resumed from \S+/step_{EVERY:08d} \(step {EVERY}\)", result.stdout), result.stdout[-4000:]

    assert_same_weights(final_weights(run_dir), final_weights(ref_dir))
    assert watch.published == {EVERY: None, STEPS: None}, watch.published
    assert_same_curves(tensorboard_curves(run_dir), tensorboard_curves(ref_dir))


def test_run_dir_on_s3_trains_publishes_and_a_new_driver_resumes(reference, config, cluster, credentials):
    ref_dir, _ = reference
    run_dir = f"s3://test-bucket/cluster-{secrets.token_hex(4)}/run"
    path = config(run_dir)
    killed: list[bool] = []

    def kill_the_driver_after_the_first_checkpoint(watch: Watcher) -> None:
        if not killed and EVERY in watch.published:
            watch.driver.send_signal(signal.SIGKILL)
            killed.append(True)

    first = run_contrast_train(path, Watcher(cluster, run_dir, on_poll=kill_the_driver_after_the_first_checkpoint))
    assert killed and first.returncode == -signal.SIGKILL, first.stdout[-4000:]
    assert published_steps(storage.join(run_dir, "published")) == [EVERY]

    watch = Watcher(cluster, run_dir)
    second = run_contrast_train(path, watch)
    assert second.returncode == 0, second.stdout[-4000:]
    assert re.search(rf"resumed from \S+/step_{EVERY:08d} \(step {EVERY}\)", second.stdout), second.stdout[-4000:]
    assert watch.published == {EVERY: None, STEPS: None}, watch.published
    assert_same_weights(final_weights(run_dir), final_weights(ref_dir))
    assert_same_curves(tensorboard_curves(run_dir), tensorboard_curves(ref_dir))

    # No credential in the drivers' output (the workers' logs are forwarded there) or any file of the run.
    values = list(credentials.values())
    for out in (first.stdout, second.stdout):
        assert not any(v in out for v in values), "a credential appears in a driver's output"
    fs, root = storage.filesystem(run_dir)
    files = fs.find(root)
    assert any(f.endswith("/manifest.json") for f in files) and any("tfevents" in f for f in files)
    for f in files:
        data = fs.cat_file(f)
        assert not any(v.encode() in data for v in values), f"a credential appears in {f}"
