"""Shared fixtures: quiet single-threaded torch, synthetic datasets, a real S3-compatible server on 127.0.0.1."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pipeline.data import synthesize
from tests.helpers.net import free_port

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Callable[..., Path]:
    """`synth(samples, **settings)`: the root of a synthetic dataset (``train/``, ``eval/<set>/``) made by
    `contrast data synth` with these settings; made once per session for each distinct set of settings."""
    made: dict[tuple, Path] = {}

    def make(samples: int, *, eval_samples: int = 8, image_size: int = 32, shard_size: int = 32,
             seed: int = 0) -> Path:
        key = (samples, eval_samples, image_size, shard_size, seed)
        if key not in made:
            out = tmp_path_factory.mktemp("synth")
            synthesize(str(out), samples, eval_samples=eval_samples, image_size=image_size, shard_size=shard_size,
                       seed=seed, progress=False)
            made[key] = out
        return made[key]
    return make


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for a test module, on loopback, with room for 4 one-CPU workers."""
    import ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with a bucket `test-bucket`; yields the endpoint URL.

    The endpoint and dummy credentials are put in the environment (AWS_ENDPOINT_URL and friends),
    which boto3, s3fs and every subprocess (Ray workers included) pick up.
    """
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    boto3.client("s3").create_bucket(Bucket="test-bucket")
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
