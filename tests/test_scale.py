"""benchmarks/scale.py: its growth fit, and its --quick mode run end to end with the growths it can see."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale  # noqa: E402


def test_exponent_recovers_known_growth():
    xs = [10, 100, 1000, 10000]
    assert scale.exponent(xs, [3 * x ** 2 for x in xs]) == pytest.approx(2.0)
    assert scale.exponent(xs, [5.0] * 4) == pytest.approx(0.0)
    assert scale.exponent([7, 7], [1, 2]) is None
    dim = scale.Dimension("d", "x", [scale.Cost("c", "s", 1.0)], rows=[{"scale": x, "c": x ** 1.6} for x in xs])
    assert scale.verdicts(dim)[0]["ok"] is False                  # 1.6 > 1.0 + tolerance
    dim.rows = [{"scale": x, "c": x ** 1.1} for x in xs]
    assert scale.verdicts(dim)[0]["ok"] is True


def test_slope_per_1k_steps():
    points = [(s, 100 + 0.02 * s) for s in range(0, 1001, 10)]    # 20 MB per 1,000 steps
    assert scale.slope_per_1k(points) == pytest.approx(20.0)


def test_evaluation_peaks_per_window():
    idle = [(s, 330.0) for s in range(1, 500, 50)]
    loaded = [(s, 486.0 + (s % 500 < 60) * 40) for s in range(500, 1600, 20)]      # +40 MB while evaluating
    peaks = scale.evaluation_peaks(idle + loaded, 500)               # the idle actor before step 500 is left out
    assert peaks == [(500, 526.0), (1000, 526.0), (1500, 526.0)]
    assert scale.slope_per_1k(peaks) == pytest.approx(0.0)           # transients at each evaluation: no growth


@pytest.mark.slow
def test_quick_mode(tmp_path):
    out = tmp_path / "scale"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/scale.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {"shards-local", "batch", "workers", "model-zero3", "run", "consolidation"} <= results.keys()
    for name in results.keys() - {"consolidation", "wall_s"}:
        assert (out / f"{name}.png").stat().st_size > 1000

    k = {v["cost"]: v["k"] for v in results["shards-local"]["verdicts"]}
    assert k["open_s"] <= 1.25 and k["plan_mb"] <= 1.25 and k["resume_s"] <= 1.25    # at most linear
    assert k["state_kb"] <= 0.1                                   # the resume record does not list the shards

    batch = results["batch"]["rows"]
    assert batch[-1]["net_rss_mb"] / batch[0]["net_rss_mb"] <= 1.3

    (model,) = results["model-zero3"]["rows"]                     # checkpointed on 2 workers, resumed on 1
    assert model["model"] == "tiny" and model["resume_s"] > 0 and model["universal_s"] > 0
    assert model["checkpoint_mb"] > model["weights_mb"]            # the weights and the optimizer's state
    assert results["consolidation"][0]["rank1_copies"] is not None

    driver = {v["cost"]: v["k"] for v in results["workers"]["verdicts"]}["driver_mb"]
    assert driver <= 0.1

    checks = results["run"]["checks"]
    assert checks["tensorboard_steps_unique"] and checks["tensorboard_steps_complete"]
    assert checks["checkpoints_mb_max"] <= checks["checkpoints_bound_mb"]
    for who, slope in checks["slope_mb_per_1k"].items():          # no process grows over the run's second half
        if who != "ray_mb":                                       # Ray's idle workers come and go
            assert slope * checks["steps"] / 2 / 1000 < 25, (who, slope)
