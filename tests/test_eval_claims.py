"""Claims: one winner per attempt among racing processes, expiry, dead owners, failures and retries."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest

from pipeline import storage
from pipeline.eval.claims import FAILED, ClaimBook


def _race(url: str, job: str, barrier, results) -> None:
    book = ClaimBook(url, ttl_s=60, retry_s=0, max_attempts=3)
    barrier.wait()
    claim = book.try_claim(job)
    results.put(claim.owner if claim else None)


def race_for(url: str, job: str, contenders: int) -> list:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(contenders), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(url, job, barrier, results)) for _ in range(contenders)]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_racing_processes_wins(tmp_path, where, request):
    if where == "s3":
        request.getfixturevalue("s3_server")
        url = f"s3://test-bucket/claims-{os.getpid()}-{time.time_ns()}"
    else:
        url = str(tmp_path / "claims")
    for job in ("step_00000001", "step_00000002", "step_00000003"):
        owners = race_for(url, job, contenders=4)
        winners = [o for o in owners if o is not None]
        assert len(winners) == 1, owners
        (claim,) = ClaimBook(url, 60, 0, 3).attempts(job)
        assert claim.owner == winners[0] and claim.attempt == 1


def test_live_claim_blocks_until_it_expires(tmp_path):
    first = ClaimBook(str(tmp_path), ttl_s=1.0, retry_s=0, max_attempts=3)
    second = ClaimBook(str(tmp_path), ttl_s=1.0, retry_s=0, max_attempts=3)
    assert first.try_claim("job").attempt == 1
    assert second.try_claim("job") is None           # first's process is alive and the claim is fresh
    time.sleep(1.05)
    taken = second.try_claim("job")
    assert taken is not None and taken.attempt == 2
    assert not first.is_latest(first.attempts("job")[0])    # the slow owner learns it lost the job
    assert second.is_latest(taken)


def test_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    url = str(tmp_path)
    code = ("from pipeline.eval.claims import ClaimBook; "
            f"assert ClaimBook({url!r}, 3600, 0, 3).try_claim('job').attempt == 1")
    subprocess.run([sys.executable, "-c", code], check=True)        # claims, then exits (a crash)
    book = ClaimBook(url, ttl_s=3600, retry_s=0, max_attempts=3)
    (old,) = book.attempts("job")
    assert old.expires_at > time.time() + 3000                    # not expired: only death frees it
    taken = book.try_claim("job")
    assert taken is not None and taken.attempt == 2


def test_failed_attempt_is_retried_after_delay_then_given_up(tmp_path):
    book = ClaimBook(str(tmp_path), ttl_s=3600, retry_s=1.0, max_attempts=2)
    c1 = book.try_claim("job")
    book.fail(c1, "CheckpointError: corrupt")
    assert book.try_claim("job") is None                   # waiting out the retry delay
    time.sleep(1.05)
    c2 = book.try_claim("job")
    assert c2.attempt == 2
    book.fail(c2, "CheckpointError: still corrupt")
    time.sleep(1.05)
    assert book.try_claim("job") is None                   # max_attempts reached
    last = book.gave_up("job")
    assert last.status == FAILED and last.error == "CheckpointError: still corrupt"
    assert [c.attempt for c in book.attempts("job")] == [1, 2]


def test_create_exclusive_on_memory_filesystem():
    url = f"memory://claims-{time.time_ns()}/x.json"
    assert storage.create_exclusive(url, b"1") is True
    assert storage.create_exclusive(url, b"2") is False
    assert storage.read_bytes(url) == b"1"
