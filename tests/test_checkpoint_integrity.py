"""Damaged resume checkpoints are found before they are used: each kind of damage is named, resume falls back
to the previous complete checkpoint with a warning, and with none left the error says so. `contrast
checkpoints RUN_DIR` lists every checkpoint's state. (Checkpoint folders written here the way
`save_checkpoint` lays them out; the real writer and reader run end to end in test_elastic_resize.)"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.layout import checkpoint_url
from pipeline.train.checkpoint import checkpoint_statuses, find_resume
from pipeline.train.integrity import DamagedCheckpoint, problems
from tests.helpers.checkpoints import SHARD
from tests.helpers.checkpoints import write_checkpoint as write_checkpoints_folder


def cfg_of(run: str):
    return load_config(None, [f"run_dir={run}", "eval.schedule='off'", "cluster.num_workers=2",
                              "train.global_batch=32", "deepspeed.zero_optimization.stage=2"])


def write_checkpoint(run: str, step: int, with_manifest: bool = True) -> Path:
    return write_checkpoints_folder(run, step, cfg_of(run), with_manifest=with_manifest)


@pytest.fixture
def warnings():
    """The warnings the checkpoint reader logs (its logger does not propagate to the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("pipeline.train.checkpoint")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _garble_json(path: Path) -> None:
    path.write_bytes(b"{" * path.stat().st_size)                   # same size, not JSON


DAMAGE = {
    "missing optimizer shard": (lambda f: (f / SHARD).unlink(), f"{SHARD}: missing"),
    "truncated shard": (lambda f: _truncate(f / SHARD), f"{SHARD}: 100 bytes, the manifest says 5000 (truncated)"),
    "empty meta.json": (lambda f: (f / "meta.json").write_bytes(b""), "meta.json: 0 bytes"),
    "bad JSON of the same size": (lambda f: _garble_json(f / "meta.json"), "meta.json: its sha256 differs"),
    "wrong sha256": (lambda f: _flip_a_byte(f / SHARD), f"{SHARD}: its sha256 differs"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, warnings, kind):
    run = str(tmp_path)
    write_checkpoint(run, 4)
    newest = write_checkpoint(run, 8)
    assert problems(str(newest)) == []
    damage, named = DAMAGE[kind]
    damage(newest)

    resume = find_resume(cfg_of(run))
    assert resume.url == checkpoint_url(run, 4) and resume.damaged == [checkpoint_url(run, 8)]
    assert resume.data_state == {"step": 4}
    said = [r.getMessage() for r in warnings]
    assert any(str(newest) in m and named in m for m in said), said
    assert any("resuming from" in m and checkpoint_url(run, 4) in m for m in said), said


def test_sizes_only_still_finds_truncation_and_unparsable_json(tmp_path):
    folder = write_checkpoint(str(tmp_path), 2)
    _garble_json(folder / "meta.json")
    assert any("meta.json: not valid JSON" in p for p in problems(str(folder), hashes=False))
    _truncate(folder / SHARD)
    assert any("truncated" in p for p in problems(str(folder), hashes=False))


def test_with_no_undamaged_checkpoint_left_the_error_names_each(tmp_path):
    run = str(tmp_path)
    for step in (4, 8):
        (write_checkpoint(run, step) / SHARD).unlink()
    with pytest.raises(DamagedCheckpoint) as e:
        find_resume(cfg_of(run))
    message = str(e.value)
    assert "every complete one is damaged" in message
    assert f"{checkpoint_url(run, 4)}: {SHARD}: missing" in message and checkpoint_url(run, 8) in message


def test_checkpoints_written_before_manifests_are_still_checked(tmp_path):
    run = str(tmp_path)
    write_checkpoint(run, 4, with_manifest=False)
    old = write_checkpoint(run, 8, with_manifest=False)
    assert find_resume(cfg_of(run)).url == checkpoint_url(run, 8)
    (old / "meta.json").write_bytes(b"")                          # the issue's `COMPLETE` + empty meta.json
    assert find_resume(cfg_of(run)).url == checkpoint_url(run, 4)
    assert any("meta.json" in p for p in problems(str(old)))


def test_contrast_checkpoints_lists_every_state(tmp_path, capsys):
    run = str(tmp_path)
    write_checkpoint(run, 4)
    _truncate(write_checkpoint(run, 8) / SHARD)
    unfinished = write_checkpoint(run, 12)
    (unfinished / "COMPLETE").unlink()

    states = {s.step: s.state for s in checkpoint_statuses(run)}
    assert states == {4: "complete", 8: "damaged", 12: "unfinished"}
    assert main(["checkpoints", run]) == 0
    out = capsys.readouterr().out
    lines = {int(line.split()[0]): line for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert "complete" in lines[4] and " 2 " in lines[4]                        # world size, ZeRO stage
    assert "damaged" in lines[8] and "truncated" in lines[8]
    assert "unfinished" in lines[12] and "a resume starts from step 4" in out
    assert "no trainer holds it" in out


def test_contrast_checkpoints_on_s3(s3_server, tmp_path, capsys):
    run = "s3://test-bucket/integrity/run"
    local = write_checkpoint(str(tmp_path), 4)
    storage.upload_dir(local, checkpoint_url(run, 4))
    assert problems(checkpoint_url(run, 4)) == []
    fs, path = storage.filesystem(checkpoint_url(run, 4) + "/" + SHARD)
    fs.pipe_file(path, b"short")
    assert problems(checkpoint_url(run, 4)) == [f"{SHARD}: 5 bytes, the manifest says 5000 (truncated)"]
    assert main(["checkpoints", run]) == 0
    assert "damaged" in capsys.readouterr().out
