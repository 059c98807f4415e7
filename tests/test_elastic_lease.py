"""One writer per run_dir: the lease, on local disk and on S3 (moto on 127.0.0.1, conditional PUT), and two
real `contrast train` drivers on one run_dir: the second is refused at once naming the first; once the
first is SIGKILLed its lease is taken over (at once on the same machine, after the ttl from elsewhere)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.layout import lease_dir
from pipeline.train.lease import Lease, LeaseHeld, current, hold
from tests.helpers.driver import Driver

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("s3_server")
    return f"s3://test-bucket/lease-{os.urandom(4).hex()}/run"


def test_a_second_holder_is_refused_naming_the_first(run_dir):
    first = Lease(run_dir, ttl_s=60, command="contrast train")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld) as e:
            Lease(run_dir, ttl_s=60, command="contrast run").acquire()
        message = str(e.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started {first.me.started}" in message
        assert "contrast train" in message and run_dir in message
    finally:
        first.release()
    assert current(run_dir) is None                        # released: the next one may start
    second = Lease(run_dir, ttl_s=60, command="contrast train")
    second.acquire()
    second.release()


def test_a_stale_lease_is_taken_over_and_its_holder_learns_it(run_dir):
    dead = Lease(run_dir, ttl_s=1.0, command="contrast train")
    dead.acquire()
    dead._stop.set()                                       # its driver died: no more renewals
    with pytest.raises(LeaseHeld):
        Lease(run_dir, ttl_s=1.0, command="contrast train").acquire()
    time.sleep(1.2)
    heir = Lease(run_dir, ttl_s=60, command="contrast train")
    heir.acquire()
    try:
        assert current(run_dir)[0] == dead.generation + 1
        assert [n for n in storage.listdir(lease_dir(run_dir))] == [f"{heir.generation:08d}.json"]
        dead.renew()                                       # were it alive after all, it now knows
        assert dead.lost and f"pid {os.getpid()}" in dead.lost
    finally:
        heir.release()


HOLD_AND_DIE = """
import os, signal, sys
from pipeline.train.lease import Lease
Lease(sys.argv[1], ttl_s=600, command="contrast train").acquire()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_lease_whose_process_ended_on_this_machine_is_taken_over_at_once(tmp_path):
    run = str(tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, run], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert dead.returncode == -9
    generation, holder = current(run)
    assert holder.alive() is False and holder.gone()          # ttl 600 s, yet known dead
    heir = Lease(run, ttl_s=600, command="contrast train")
    heir.acquire()
    try:
        assert heir.generation == generation + 1
    finally:
        heir.release()


def test_a_lease_from_another_machine_waits_for_its_ttl(tmp_path):
    run = str(tmp_path / "run")
    subprocess.run([sys.executable, "-c", HOLD_AND_DIE, run], env={**os.environ, "PYTHONPATH": str(REPO)})
    generation, _ = current(run)
    url = storage.join(lease_dir(run), f"{generation:08d}.json")
    record = json.loads(storage.read_bytes(url))
    storage.write_bytes(url, json.dumps({**record, "machine": "another-boot/4026531836"}).encode())
    with pytest.raises(LeaseHeld, match=f"pid {record['pid']}"):     # its pid means nothing here
        Lease(run, ttl_s=600, command="contrast train").acquire()


def test_renewal_keeps_the_lease_alive(tmp_path):
    run = str(tmp_path / "run")
    with hold(run, ttl_s=0.8, command="contrast train") as lease:
        time.sleep(1.5)                                    # about six renewals
        assert current(run)[1].alive()
        with pytest.raises(LeaseHeld):
            Lease(run, ttl_s=0.8, command="contrast train").acquire()
        with hold(run, ttl_s=0.8, command="contrast train") as again:    # the same process: re-entrant
            assert again is lease
    assert current(run) is None


def _take(lease: Lease, start: threading.Barrier, won: list[Lease]) -> None:
    start.wait()
    try:
        lease.acquire()
        won.append(lease)
    except LeaseHeld:
        pass


def test_of_racing_drivers_exactly_one_gets_the_lease(run_dir):
    for attempt in range(3):
        leases = [Lease(run_dir, 60, f"driver {i}") for i in range(4)]
        start, won = threading.Barrier(len(leases)), []
        threads = [threading.Thread(target=_take, args=(lease, start, won)) for lease in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"attempt {attempt}: {len(won)} drivers hold the lease"
        won[0].release()


# ----------------------------------------------------------------------------- real drivers
@pytest.mark.slow
def test_a_second_contrast_train_is_refused_at_once_and_a_killed_ones_lease_is_taken_over(synth, tmp_path):
    data = synth(512, shard_size=64) / "train"
    run = tmp_path / "run"
    args = ["train", str(REPO / "configs/demo.yaml"), f"run_dir={run}", f"data.train_urls=[{data}]",
            "data.image_size=32", "data.context_length=32", "train.steps=400", "train.global_batch=32",
            "cluster.num_workers=2", "eval.schedule=off", "train.log_every=1", "gradcache.chunk_size=8",
            "cluster.lease_ttl_s=8"]
    first = Driver(*args)
    try:
        first.wait_for(r"step 2/400")
        for command in ("train", "run"):
            started = time.monotonic()
            second = Driver(command, *args[1:])
            assert second.finish(timeout_s=60) == 1
            assert time.monotonic() - started < 10, "refused at once"
            assert f"is being trained by contrast train on host {socket.gethostname()}, pid {first.proc.pid}, " \
                   "started " in second.output, second.output[-2000:]
        first.kill()                                       # SIGKILL: no chance to release its lease
        heir = Driver(*args)                               # same machine: no need to wait for the ttl
        heir.wait_for(r"taking over the run_dir lease of contrast train.*its process has ended")
        heir.wait_for(r"step \d+/400")
        heir.kill()
    finally:
        first.kill()
