"""`contrast status` on a run being trained: the artifacts come from the real writers (the lease, the
progress file, the events, the eval claims and results), on local disk and on the S3 server."""
from __future__ import annotations

import json
import time

import pytest

from pipeline import storage
from pipeline.cli import main
from pipeline.eval.claims import ClaimBook
from pipeline.layout import claims_dir, eval_result_url, step_name
from pipeline.status import run_status
from pipeline.train.lease import hold
from pipeline.train.progress import FAILED, STARTED, record_event, write_progress


def a_running_run(run_dir: str) -> None:
    """What a run 40 steps into 100 leaves: events, a progress record logged 2 s ago with an ETA of 60 s,
    an evaluated step 20 and a step 40 whose evaluation failed."""
    record_event(run_dir, STARTED, step=0, world_size=4, resumed=False, total=100)
    record_event(run_dir, FAILED, errors={"3": "RuntimeError: worker 3 lost its node"})
    record_event(run_dir, STARTED, step=20, world_size=2, resumed=True, total=100)
    write_progress(run_dir, {"step": 40, "total": 100, "loss": 1.25, "samples_per_s": 512.0, "eta_s": 60.0,
                             "sources": {"laion": {"samples": 8192, "bad_samples": 3}}})
    storage.write_json(storage.join(run_dir, "progress.json"),
                       {**storage.read_json(storage.join(run_dir, "progress.json")), "time": time.time() - 2})
    storage.write_json(eval_result_url(run_dir, 20), {"step": 20, "metrics": {"imagenet/acc1": 0.125,
                                                                              "imagenet/acc5": 0.5}})
    book = ClaimBook(claims_dir(run_dir), ttl_s=60, retry_s=30, max_attempts=2)
    book.fail(book.try_claim(step_name(40)), "EvalSetError: imagenet/test has no shards")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_status_of_a_run_in_training(where, tmp_path, s3_server, capsys):
    run_dir = str(tmp_path / "run") if where == "local" else "s3://test-bucket/status-run"
    a_running_run(run_dir)
    with hold(run_dir, ttl_s=30, command="contrast train big.yaml"):
        status = run_status(run_dir)
        assert status.trainer["alive"] and status.trainer["command"] == "contrast train big.yaml"
        assert 55 <= status.progress["eta_left_s"] <= 58.5          # the ETA counts from now, not from the log
        assert status.evaluated == {20: {"imagenet/acc1": 0.125}}
        assert status.eval_failures[40]["error"] == "EvalSetError: imagenet/test has no shards"
        assert main(["status", run_dir]) == 0
    text = capsys.readouterr().out
    for line in ("trainer      training: contrast train big.yaml",
                 "step 40/100 (40%), loss 1.2500, 512 samples/s, ETA 0:5",
                 "data         laion: 8192 samples read, 3 bad", "checkpoints  none yet",
                 "evaluated    20\n", "step 20: imagenet/acc1 0.125",
                 "eval failed  step 40, attempt 1", "started at step 0 of 100 with 4 workers",
                 "failed: worker 3: RuntimeError: worker 3 lost its node", "resumed at step 20 of 100 with 2 workers"):
        assert line in text, (line, text)
    assert text.index("started at step 0") < text.index("failed: worker 3") < text.index("resumed at step 20")

    assert main(["status", run_dir, "--json"]) == 0          # the lease released: nobody trains it now
    data = json.loads(capsys.readouterr().out)
    assert data["trainer"] is None and data["progress"]["eta_left_s"] is None and data["progress"]["step"] == 40


def test_status_of_a_missing_run_dir_says_so(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nothing")]) == 1
    assert f"run_dir {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
