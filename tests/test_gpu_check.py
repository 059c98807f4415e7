"""`benchmarks/gpu_check.sh` in its reduced CPU mode: it runs, and each figure it writes is the measurement it names."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_reduced_mode_writes_every_figure(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--reduced"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["mode"] == "reduced" and r["device"] == "cpu"
    assert not [k for k, v in r.items() if isinstance(v, dict) and "error" in v]

    t = r["throughput"]
    assert len(t["step_s"]) == r["settings"]["steps"] and all(s > 0 for s in t["step_s"])
    assert t["samples_per_s"] == pytest.approx(t["batch"] / statistics.median(t["step_s"]))

    memory = r["memory"]
    assert [m["chunk"] for m in memory] == [*r["settings"]["memory_chunks"], "plain"]
    peaks = [m["peak_gib"] for m in memory]
    assert all(a < b for a, b in zip(peaks, peaks[1:])), peaks     # activations grow with the chunk, plain the most

    o = r["overhead"]
    assert o["ratio"] == pytest.approx(o["cached_s"] / o["plain_s"]) and o["plain_s"] > 0

    loss = r["tiled_loss"]
    assert loss["rows"] == r["settings"]["loss_rows"]
    assert 0 < loss["tiled"]["peak_extra_gib"] < loss["dense"]["peak_extra_gib"]    # tiles instead of N×N logits

    text = (out / "gpu_check.txt").read_text()
    for line in ("throughput:", "peak memory per chunk", "gradient-cache overhead", "CLIP loss tiled"):
        assert line in text, text
