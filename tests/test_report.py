"""The report renders from a small run: training scalars (the trainer's own logger), eval results, a checkpoint."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import Config
from pipeline.eval.evaluate import evaluate_checkpoint, write_result
from pipeline.eval.report import read_results, read_scalar_events, read_scalars
from pipeline.losses import get_loss
from pipeline.train.metrics import TrainLogger, temperature_histograms
from tests.helpers.eval import EVAL_DATA, eval_config, publish


def log_training(cfg, steps: list[int], histograms: Optional[dict] = None) -> None:
    """Scalars (and `histograms`, when given) as the training loop logs them, through its TensorBoard logger."""
    logger = TrainLogger(cfg, rank=0)
    for step in steps:
        logger.log(step, {"train/loss": 5.0 / step, "train/lr": 1e-3, "train/temperature": 0.07 - step * 1e-4,
                          "train/logit_scale": 1 / (0.07 - step * 1e-4), "train/grad_norm": 1.0,
                          "train/uniformity_image": -1.0 - step / 100, "train/uniformity_text": -0.5 - step / 100,
                          "train/alignment": 1.0, "train/tolerance": 0.3 + step / 1000,
                          "perf/samples_per_s": 100.0, "perf/step_time_s": 1.0, "perf/data_wait_fraction": 0.1,
                          "perf/peak_memory_gb": 1.0, "data/bad_samples": 0.0}, histograms)
    logger.close()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, synth):
    data = synth(**EVAL_DATA)
    cfg = eval_config(data, tmp_path_factory.mktemp("run"))
    log_training(cfg, [10, 20, 30])
    for step in (15, 30):
        write_result(cfg.run_dir, evaluate_checkpoint(publish(cfg, step), cfg))
    return Path(cfg.run_dir)


def test_scalars_and_results_are_read_back(small_run):
    series = read_scalars(str(small_run))
    assert series["train/loss"] == [(10, pytest.approx(0.5)), (20, pytest.approx(0.25)), (30, pytest.approx(5 / 30))]
    assert not any(tag.startswith("eval/") for tag in series)          # eval curves come from the results
    assert [r["step"] for r in read_results(str(small_run))] == [15, 30]


def test_report_renders_every_section_with_readable_pngs(small_run):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(small_run)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    page = (small_run / "report.html").read_text()
    assert out.stdout.strip() == str(small_run / "report.html")
    images = re.findall(r"<img src='([^']+)'", page)
    assert sorted(images) == sorted(f"report/{n}.png" for n in ("training", "eval", "similarity",
                                                                  "retrieval_examples"))
    for rel in images:
        with Image.open(small_run / rel) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300
    assert "<em>" not in page                     # no section fell back to a note
    last = read_results(str(small_run))[-1]
    assert "Final metrics (step 30)" in page
    assert f"{last['metrics']['relation/accuracy']:.4f}" in page


def test_report_of_an_empty_run_says_what_is_missing(tmp_path):
    from pipeline.eval.report import write_report
    url = write_report(str(tmp_path))
    page = Path(url).read_text()
    assert "No evaluation results" in page and "No published checkpoint" in page
    assert "No training scalars" in page


def test_the_scalar_readers_leave_histograms_out(tmp_path):
    """A run that logs isogclr's temperature histograms next to its scalars: the one scalar reader, and the
    benchmarks that read step times and marks through it, see the scalars only (reading every tag as a number
    broke on the histograms)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import loss_ablation
    import startup
    import train_overhead
    loss = get_loss("isogclr")
    u = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    loss(u, u.flip(0), logit_scale=1.0, sample_ids=torch.stack([torch.arange(6), 100 + torch.arange(6)], 1))
    loss.after_step()
    cfg = Config()
    cfg.run_dir = str(tmp_path / "run")
    log_training(cfg, [10, 20, 30], temperature_histograms(loss))
    assert "train/sample_temperature/image" not in read_scalars(cfg.run_dir)
    assert [e.step for e in read_scalar_events(cfg.run_dir)["train/loss"]] == [10, 20, 30]
    assert train_overhead.full_step_times(cfg) == (1.0, pytest.approx(0.1))
    first, last = startup.tensorboard_marks(cfg.run_dir)("")
    assert 0 < first <= last
    assert loss_ablation.scalars(Path(cfg.run_dir))["perf/step_time_s"] == {10: 1.0, 20: 1.0, 30: 1.0}
