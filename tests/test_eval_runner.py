"""Evaluating one published checkpoint: the result file, TensorBoard scalars, clear errors, Fashion-MNIST."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.evaluate import evaluate_checkpoint, run_dir_of, write_result
from pipeline.models import CheckpointError
from tests.helpers.eval import EVAL_DATA, eval_config, publish


@pytest.fixture(scope="module")
def data(synth):
    return synth(**EVAL_DATA)


def contrast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300)


def test_result_has_every_metric_hash_and_timings_and_matching_scalars(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = eval_config(data, tmp_path / "run")
    ckpt = publish(cfg, step=7)
    result = evaluate_checkpoint(ckpt)                     # config from the checkpoint's manifest
    url = write_result(run_dir_of(ckpt), result)
    assert url == str(tmp_path / "run" / "eval" / "step_00000007.json")
    saved = json.loads(Path(url).read_text())
    m = saved["metrics"]
    expected = {"zeroshot_heldout/" + k for k in ("acc1", "acc5", "mean_per_class_recall", "linear_probe_acc1")}
    expected |= {f"retrieval/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    expected |= {"relation/accuracy"}
    assert set(m) == expected
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert m["zeroshot_heldout/acc1"] <= m["zeroshot_heldout/acc5"]
    for d in ("image_to_text", "text_to_image"):
        assert m[f"retrieval/{d}_R@1"] <= m[f"retrieval/{d}_R@5"] <= m[f"retrieval/{d}_R@10"]
    weights = Path(ckpt, "model.safetensors").read_bytes()
    assert saved["sha256"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert saved["step"] == 7 and saved["samples_seen"] == 56
    assert set(saved["timings"]) >= {"load_s", "total_s", "retrieval_s"}

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "eval"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {f"eval/{k}" for k in expected}
    (event,) = acc.Scalars("eval/relation/accuracy")
    assert event.step == 7 and event.value == pytest.approx(m["relation/accuracy"])


def test_eval_cli_prints_table_and_writes_result(data, tmp_path):
    cfg = eval_config(data, tmp_path / "run")
    ckpt = publish(cfg, step=3)
    out = contrast("eval", ckpt)
    assert out.returncode == 0, out.stderr
    assert "relation/accuracy" in out.stdout
    assert (tmp_path / "run" / "eval" / "step_00000003.json").exists()


def test_eval_cli_refuses_incomplete_and_corrupt_checkpoints(data, tmp_path):
    cfg = eval_config(data, tmp_path / "run")
    ckpt = Path(publish(cfg, step=5))
    (ckpt / "COMPLETE").unlink()
    out = contrast("eval", str(ckpt))
    assert out.returncode == 1 and "COMPLETE" in out.stderr and "Traceback" not in out.stderr

    ckpt = Path(publish(cfg, step=6))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    out = contrast("eval", str(ckpt))
    assert out.returncode == 1 and "model.safetensors" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "eval" / "step_00000006.json").exists()


def test_missing_eval_set_is_named(data, tmp_path):
    from pipeline.eval.sets import EvalSetError
    cfg = eval_config(data, tmp_path / "run")
    cfg.eval.sets = ["no_such_set"]
    ckpt = publish(cfg, step=1)
    with pytest.raises(EvalSetError, match="no_such_set"):
        evaluate_checkpoint(ckpt, cfg)


def test_unfinished_checkpoint_is_a_checkpoint_error(data, tmp_path):
    cfg = eval_config(data, tmp_path / "run")
    ckpt = Path(publish(cfg, step=2))
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="COMPLETE"):
        evaluate_checkpoint(str(ckpt), cfg)


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_converted_once_into_a_zeroshot_set(tmp_path):
    from pipeline.eval.fashion_mnist import ensure_fashion_mnist, read_idx
    from pipeline.eval.sets import open_eval_set

    url = ensure_fashion_mnist(str(tmp_path))
    marker = Path(url, "COMPLETE").stat().st_mtime_ns
    assert ensure_fashion_mnist(str(tmp_path)) == url
    assert Path(url, "COMPLETE").stat().st_mtime_ns == marker          # not converted again

    s = open_eval_set(str(tmp_path), "fashion_mnist")
    assert s.kind == "zeroshot" and len(s.classnames) == 10 and s.classnames[9] == "ankle boot"
    samples = list(s.samples())
    labels = np.array([x.meta["label"] for x in samples])
    assert len(samples) == 10_000 and np.bincount(labels).tolist() == [1000] * 10
    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    import io
    first = np.asarray(Image.open(io.BytesIO(samples[0].image)))
    assert first.shape == (28, 28) and (first == images[0]).all()
