"""`contrast run` end to end on a reduced demo config: synth → 2 Ray workers + DeepSpeed → eval actor → report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.eval.claims import ClaimBook
from pipeline.eval.evaluate import format_metrics

REPO = Path(__file__).resolve().parents[1]


def reduced_demo(tmp_path: Path) -> Path:
    """configs/demo.yaml with less data and fewer, smaller steps; everything else (workers, ZeRO, gradient
    cache, eval sets) as in the demo."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["data"].update(train_urls=[str(tmp_path / "synth" / "train")], eval_dir=str(tmp_path / "synth" / "eval"))
    cfg["data"]["synth"].update(samples=1600, eval_samples=120, shard_size=100)
    cfg["train"].update(steps=24, global_batch=64, warmup_steps=4, log_every=4)
    cfg["gradcache"]["chunk_size"] = 16
    cfg["checkpoint"]["every_steps"] = 12
    cfg.setdefault("eval", {}).update(poll_s=1.0)
    path = tmp_path / "demo-small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_contrast_run_end_to_end(tmp_path):
    config = reduced_demo(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    run = tmp_path / "run"

    assert (tmp_path / "synth" / "train" / "manifest.json").exists()          # synthesised because missing
    results = {int(p.stem[5:]): json.loads(p.read_text()) for p in (run / "eval").glob("step_*.json")}
    assert sorted(results) == [12, 24]                                          # schedule `every`, k = 1
    claims = ClaimBook(str(run / "eval" / "claims"), 1, 0, 1)
    for step, result in results.items():
        assert [c.attempt for c in claims.attempts(f"step_{step:08d}")] == [1]  # each evaluated once
        owner_pid = int(result["evaluated_by"].split(":")[1])
        assert owner_pid != proc.pid                                            # by the Ray actor, not the driver
    final = results[24]["metrics"]
    assert {"zeroshot_heldout/acc1", "retrieval/image_to_text_R@1", "relation/accuracy"} <= set(final)

    report = run / "report.html"
    assert f"report: {report}" in stdout
    assert format_metrics(dict(sorted(final.items()))) in stdout               # the final table, as written
    assert all((run / "report" / f"{n}.png").exists() for n in ("training", "eval", "similarity",
                                                                 "retrieval_examples"))
    assert "No training scalars" not in report.read_text()
