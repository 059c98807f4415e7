"""`contrast train` on a local Ray: the start-up breakdown it logs, and the processes it starts (and does not)."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.log import Timeline

PHASES = ["python, imports, config", "preflight", "ray start", "ray train", "worker start", "data, model",
          "deepspeed", "first step"]
NEEDED = {"ray::SynchronizationActor", "ray::RayTrainWorker"}
NOT_NEEDED = {"ray::TrainController", "ray::DatasetManager", "ray::PlacementGroupCleaner",    # the first runs in
              "ray::_AutoscalingCoordinatorActor", "ray::PreemptionWatcher"}                  # the driver


def test_timeline_phases_add_up():
    t = Timeline(origin=100.0)
    t.mark("a", at=101.5)
    t.mark("b", at=104.0)
    assert t.elapsed() == 4.0
    assert t.summary() == "4.0 s (a 1.5, b 2.5)"
    again = Timeline.from_dict(t.to_dict())
    again.mark("c", at=104.5)
    assert again.summary() == "4.5 s (a 1.5, b 2.5, c 0.5)" and t.elapsed() == 4.0
    again.mark("d", at=103.0)                                   # began before "c" ended: took no time of its own
    assert again.summary() == "4.5 s (a 1.5, b 2.5, c 0.5, d 0.0)"


def process_titles(pid: int, titles: set[str], done: threading.Event) -> None:
    """Collect the command lines (Ray's process titles) of every descendant of `pid` until `done`."""
    root = psutil.Process(pid)
    while not done.is_set():
        try:
            for p in root.children(recursive=True):
                titles.add(" ".join(p.cmdline()).strip())
        except psutil.Error:
            pass
        done.wait(0.3)


@pytest.mark.slow
def test_contrast_train_logs_its_startup_and_starts_only_what_it_needs(synth, tmp_path):
    data = synth(256)                                          # 8 shards of 32
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "data": {"train_urls": [str(data / "train")], "image_size": 32, "context_length": 16, "shuffle_buffer": 64},
        "model": {"name": "tiny"}, "train": {"steps": 2, "global_batch": 16, "warmup_steps": 1, "log_every": 1},
        "gradcache": {"chunk_size": 4}, "deepspeed": {"zero_optimization": {"stage": 2}},
        "cluster": {"num_workers": 2}, "checkpoint": {"every_steps": 2}, "eval": {"schedule": "off"},
        "logging": {"progress": False}}))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "-v", "train", str(config)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    titles: set[str] = set()
    done = threading.Event()
    sampler = threading.Thread(target=process_titles, args=(proc.pid, titles, done))
    sampler.start()
    output, _ = proc.communicate(timeout=600)
    done.set()
    sampler.join()
    assert proc.returncode == 0, output[-4000:]

    line = re.search(r"start-up: first step done ([\d.]+) s \((.*)\) after launch", output)
    assert line, output[-4000:]
    phases = re.findall(r"([a-z][a-z ,0-9]*?) ([\d.]+)(?:, |$)", line.group(2))
    assert [name for name, _ in phases] == PHASES
    assert sum(float(v) for _, v in phases) == pytest.approx(float(line.group(1)), abs=0.1 * len(PHASES))

    started = {t.split()[0].split(".")[0] for t in titles if t.startswith("ray::")}    # ray::Actor.method
    assert NEEDED <= started, started
    assert not started & NOT_NEEDED, started
    assert Path(tmp_path / "run" / "published" / "step_00000002" / "COMPLETE").exists()
