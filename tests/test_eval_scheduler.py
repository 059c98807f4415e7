"""The scheduler: policies, exactly-once with two watchers and a restart, COMPLETE, corrupt weights, retries."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.eval.claims import FAILED, RUNNING, ClaimBook
from pipeline.eval.scheduler import Checkpoint, Watcher, published_checkpoints, select
from tests.helpers.eval import EVAL_DATA, eval_config, publish


@pytest.fixture(scope="module")
def data(synth):
    return synth(**EVAL_DATA)


def steps(checkpoints) -> list[int]:
    return [c.step for c in checkpoints]


def results(run_dir: Path) -> dict[int, dict]:
    return {int(p.stem[5:]): json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("step_*.json"))}


def test_policies_select_by_publication_order():
    ckpts = [Checkpoint(s, f"u{s}") for s in (100, 200, 300, 400, 500)]
    assert steps(select(ckpts, "every", 1, final=False)) == [100, 200, 300, 400, 500]
    assert steps(select(ckpts, "every", 2, final=False)) == [200, 400]
    assert steps(select(ckpts, "every", 2, final=True)) == [200, 400, 500]     # drain adds the last one
    assert steps(select(ckpts, "every", 5, final=True)) == [500]               # not twice
    assert steps(select(ckpts, "latest", 1, final=False)) == [500]
    assert select(ckpts, "off", 1, final=False) == []
    assert select([], "every", 1, final=True) == []


def test_schedule_off_survives_yaml_booleans(tmp_path):
    from pipeline.config import load_config
    (tmp_path / "c.yaml").write_text("eval:\n  schedule: off\n")          # YAML 1.1 reads `off` as false
    assert load_config(tmp_path / "c.yaml").eval.schedule == "off"
    assert load_config(None, ["eval.schedule=off"]).eval.schedule == "off"


def test_only_complete_checkpoints_are_seen_or_read(data, tmp_path):
    cfg = eval_config(data, tmp_path)
    publish(cfg, 10)
    half = Path(publish(cfg, 20))
    (half / "COMPLETE").unlink()                          # as if the writer were still uploading
    (half / "model.safetensors").write_bytes(b"half-written")
    assert steps(published_checkpoints(str(tmp_path))) == [10]
    watcher = Watcher(str(tmp_path), cfg)
    assert watcher.poll(final=True) == [10]
    assert list(results(tmp_path)) == [10]
    assert not list((tmp_path / "eval" / "claims").glob("step_00000020*"))   # never even claimed
    assert watcher.outcome.failed == {}


def test_corrupt_weights_fail_clearly_and_are_retried_later(data, tmp_path):
    cfg = eval_config(data, tmp_path, max_attempts=3, retry_s=3.0)
    ckpt = Path(publish(cfg, 30))
    good = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(good[: len(good) // 2])       # truncated after publication
    watcher = Watcher(str(tmp_path), cfg)
    assert watcher.poll() == []                           # reported, not raised
    assert "sha256" in watcher.outcome.failed[30] and "model.safetensors" in watcher.outcome.failed[30]
    (claim,) = ClaimBook(str(tmp_path / "eval" / "claims"), 60, 0, 3).attempts("step_00000030")
    assert claim.status == FAILED and "CheckpointError" in claim.error
    assert watcher.poll() == []                           # still inside the retry delay: not tried again
    assert len(ClaimBook(str(tmp_path / "eval" / "claims"), 60, 0, 3).attempts("step_00000030")) == 1

    (ckpt / "model.safetensors").write_bytes(good)        # repaired (e.g. re-uploaded)
    time.sleep(cfg.eval.retry_s + 0.05)
    assert watcher.poll() == [30]
    assert results(tmp_path)[30]["attempt"] == 2
    assert watcher.outcome.failed == {}


def test_latest_policy_skips_stale_checkpoints(data, tmp_path):
    cfg = eval_config(data, tmp_path, schedule="latest")
    for step in (1, 2, 3):
        publish(cfg, step)
    watcher = Watcher(str(tmp_path), cfg)
    assert watcher.poll() == [3]
    assert watcher.poll() == []
    publish(cfg, 4)
    assert watcher.poll() == [4]
    assert sorted(results(tmp_path)) == [3, 4]


def _watch(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "watch", str(run_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _evaluated(stdout: str) -> list[int]:
    line = next(s for s in stdout.splitlines() if s.startswith("evaluated steps:"))
    tail = line.split(":", 1)[1].strip()
    return [] if tail == "none" else [int(s) for s in tail.split(",")]


@pytest.mark.slow
def test_exactly_once_with_two_watchers_and_a_restart(data, tmp_path):
    cfg = eval_config(data, tmp_path, claim_ttl_s=3600)   # only the owner's death can free a claim
    all_steps = [10, 20, 30, 40, 50]
    for step in all_steps:
        publish(cfg, step)
    claims = tmp_path / "eval" / "claims"

    # 1. a watcher is killed in the middle of its first evaluation
    first = _watch(tmp_path)
    deadline = time.time() + 120
    while not list(claims.glob("*.json")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    (killed,) = [json.loads(p.read_text()) for p in claims.glob("*.json")]
    done_before = results(tmp_path)
    assert killed["job"] not in {f"step_{s:08d}" for s in done_before}, "the kill came too late to test a restart"

    # 2. two watchers start together (one is the restart) and share the remaining work
    a, b = _watch(tmp_path, "--once"), _watch(tmp_path, "--once")
    out_a, out_b = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, (out_a[1], out_b[1])
    by_a, by_b = _evaluated(out_a[0]), _evaluated(out_b[0])
    assert not set(by_a) & set(by_b), (by_a, by_b)                    # nothing evaluated twice
    assert sorted(by_a + by_b + list(done_before)) == all_steps       # nothing missed

    final = results(tmp_path)
    assert sorted(final) == all_steps
    book = ClaimBook(str(claims), 3600, 0, 3)
    for step in all_steps:
        attempts = book.attempts(f"step_{step:08d}")
        if f"step_{step:08d}" == killed["job"]:
            assert [c.attempt for c in attempts] == [1, 2] and attempts[0].status == RUNNING
            assert final[step]["attempt"] == 2                          # taken over from the dead owner
        else:
            assert [c.attempt for c in attempts] == [1]
    event_files = list((tmp_path / "tensorboard" / "eval").glob("events.out.tfevents.*"))
    assert len(event_files) == len(all_steps)                           # one evaluation written per step

    # 3. a later restart finds nothing to do
    again = _watch(tmp_path, "--once")
    out = again.communicate(timeout=300)
    assert again.returncode == 0 and _evaluated(out[0]) == []


@pytest.mark.slow
def test_eval_actor_runs_beside_work_and_drains_the_last_checkpoint(data, tmp_path):
    import ray

    from pipeline.eval.scheduler import start_eval_actor

    cfg = eval_config(data, tmp_path, schedule="every", every_k=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    try:
        handle = start_eval_actor(cfg)
        for step in (1, 2, 3):                    # published while the actor is already polling
            publish(cfg, step)
            time.sleep(0.3)
        deadline = time.time() + 120
        while 2 not in results(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        assert sorted(results(tmp_path)) == [2]   # every 2nd, evaluated during "training"
        outcome = handle.finish(timeout_s=180)
    finally:
        ray.shutdown()
    assert sorted(outcome["evaluated"]) == [2, 3] and outcome["failed"] == {}
    assert sorted(results(tmp_path)) == [2, 3]    # the final checkpoint is drained whatever the policy


def test_watcher_and_report_on_an_s3_run_dir(data, tmp_path, s3_server):
    from pipeline import storage
    from pipeline.eval.report import read_results, write_report

    run_dir = f"s3://test-bucket/run-{time.time_ns()}"
    cfg = eval_config(data, tmp_path)
    storage.publish_dir(publish(cfg, 8), f"{run_dir}/published/step_00000008")     # COMPLETE written last
    cfg.run_dir = run_dir
    watcher = Watcher(run_dir, cfg)
    assert watcher.poll() == [8] and watcher.poll() == []
    assert [r["step"] for r in read_results(run_dir)] == [8]
    assert len([n for n in storage.listdir(f"{run_dir}/tensorboard/eval") if "tfevents" in n]) == 1
    report = write_report(run_dir)
    assert report == f"{run_dir}/report.html"
    assert "Final metrics (step 8)" in storage.read_bytes(report).decode()
    assert "eval.png" in storage.listdir(f"{run_dir}/report")


def test_an_explicit_watch_evaluates_a_run_trained_without_evaluation(data, tmp_path):
    """`contrast watch RUN_DIR` on a run with eval.schedule=off used to evaluate nothing and wait forever;
    overrides given on the command line apply to the checkpoint's run config."""
    from pipeline.eval.scheduler import watch
    cfg = eval_config(data, tmp_path, schedule="off")
    publish(cfg, 5)
    publish(cfg, 10)
    outcome = watch(str(tmp_path), once=True, overrides=["eval.sets=[retrieval]"])
    assert outcome.evaluated == [5, 10]
    assert all(set(k.split("/")[0] for k in r["metrics"]) == {"retrieval"} for r in results(tmp_path).values())
