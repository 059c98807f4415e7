"""The CLIP_benchmark agreement benchmark's own arithmetic (CI has no side venv with CLIP_benchmark, so the
comparison itself runs by hand: docs/interop.md has its numbers)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import clip_benchmark_agreement as agreement

REPO = Path(__file__).resolve().parents[1]


def test_sample_agreement_counts_the_predictions_that_differ_and_their_margins():
    ours = np.array([[3.0, 1.0, 0.0], [2.0, 1.99, 0.0], [0.0, 5.0, 4.0], [1.0, 0.0, 0.5]])
    labels = np.array([0, 1, 1, 2])
    theirs = ours.copy()
    theirs[1] = [1.98, 1.99, 0.0]                 # a near tie flips: margin 0.01 in our logits
    theirs[3] = [1.0, 0.0, 1.2]                   # a real change: margin 0.5
    r = agreement.sample_agreement((ours, labels), (theirs, labels))
    assert r["differ"] == 2 and np.allclose(r["margins_of_differing"], [0.01, 0.5])
    assert np.isclose(r["max_logit_diff"], 0.7) and np.isclose(r["smallest_margin"], 0.01)
    assert r["acc1_ours"] == 0.5 and r["acc1_theirs"] == 1.0
    assert agreement.sample_agreement((ours, labels), (ours, labels))["differ"] == 0


def test_without_clip_benchmark_the_benchmark_skips_and_says_why(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/clip_benchmark_agreement.py", "--side-python",
                           str(tmp_path / "no-python")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "skipped: CLIP_benchmark is not importable" in done.stdout
