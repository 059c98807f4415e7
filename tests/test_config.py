"""Config loading, dotted overrides with type coercion, and every kind of config error."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.losses
import pipeline.models  # noqa: F401
from pipeline.config import Config, ConfigError, config_from_dict, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_with_values_from_the_file():
    cfg = load_config(DEMO)
    assert cfg.model.name == "tiny"
    assert cfg.cluster.num_workers == 2
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2
    assert cfg.gradcache.chunk_size > 0
    assert cfg.local_batch * cfg.cluster.num_workers == cfg.train.global_batch


def test_every_yaml_in_configs_is_valid():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "no configs found"
    for path in files:
        load_config(path)


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()


def test_overrides_are_read_as_yaml_and_coerced(tmp_path):
    path = write(tmp_path, "train:\n  steps: 10\n")
    cfg = load_config(path, ["train.global_batch=4096", "train.lr=1e-3", "train.steps=20",
                             "data.train_urls=[a.tar,b.tar]", "loss.tiled=true", "cluster.cpus_per_worker=2",
                             "run_dir=s3://bucket/run"])
    assert cfg.train.global_batch == 4096 and isinstance(cfg.train.global_batch, int)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 20                              # the command line wins over the file
    assert cfg.data.train_urls == ["a.tar", "b.tar"]
    assert cfg.loss.tiled is True
    assert cfg.cluster.cpus_per_worker == 2.0 and isinstance(cfg.cluster.cpus_per_worker, float)
    assert cfg.run_dir == "s3://bucket/run"


def test_single_url_and_brace_pattern_become_a_list():
    cfg = load_config(None, ["data.train_urls=shards/{00000..00009}.tar"])
    assert cfg.data.train_urls == ["shards/{00000..00009}.tar"]


def test_deepspeed_keys_pass_through_and_merge(tmp_path):
    path = write(tmp_path, "deepspeed:\n  zero_optimization:\n    stage: 2\n    overlap_comm: true\n")
    cfg = load_config(path, ["deepspeed.zero_optimization.stage=3", "deepspeed.bf16.enabled=true"])
    assert cfg.deepspeed == {"zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": True}}


def test_nested_sections_in_files_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  text:\n    lock: true\n")
    cfg = load_config(path, ["model.image.unlock_last=2"])
    assert cfg.model.text.lock is True
    assert cfg.model.image.unlock_last == 2


def test_round_trip_through_dict():
    cfg = load_config(DEMO, ["train.steps=7"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("override, names", [
    ("train.no_such_key=1", ["train.no_such_key", "global_batch", "warmup_steps"]),
    ("nosection.x=1", ["nosection", "train", "data"]),
    ("model.image.nope=1", ["model.image.nope", "hf_path", "unlock_last"]),
])
def test_unknown_key_names_the_key_and_lists_valid_ones(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    for name in names:
        assert name in str(e.value)
    assert "command line" in str(e.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  stepz: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "train.stepz" in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("train.global_batch=abc", "an integer"),
    ("train.global_batch=1.5", "an integer"),
    ("train.lr=fast", "a number"),
    ("loss.tiled=maybe", "true or false"),
    ("loss.tiled=1", "true or false"),
    ("train.resume=sometimes", "'auto', 'never'"),
    ("data.train_urls={a: 1}", "a list of str"),
    ("train.betas=[0.9, x]", "a number"),
    ("model=3", "a mapping"),
])
def test_wrong_type_names_key_value_and_expected_type(override, expected):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and expected in msg


def test_bad_yaml_file_is_a_config_error(tmp_path):
    path = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.steps")


def test_global_batch_not_divisible_by_world_size(tmp_path):
    path = write(tmp_path, "train:\n  global_batch: 100\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["cluster.num_workers=3"])
    msg = str(e.value)
    assert "train.global_batch = 100" in msg and "cluster.num_workers = 3" in msg
    assert str(path) in msg and "command line" in msg


def test_chunk_larger_than_local_batch():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.global_batch=64", "cluster.num_workers=2", "gradcache.chunk_size=64"])
    assert "gradcache.chunk_size = 64" in str(e.value) and "local batch 32" in str(e.value)


def test_unknown_loss_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.name=infonce2"])
    assert "loss.name = 'infonce2'" in str(e.value) and "siglip" in str(e.value)


def test_hyper_parameter_the_loss_does_not_take():
    with pytest.raises(ConfigError, match="k1"):
        load_config(None, ["loss.name=clip", "loss.k1=10"])


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16"):
        load_config(None, ["deepspeed.fp16.enabled=true"])


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.steps=0", "train.lr=-1", "eval.every_k=0"])
    msg = str(e.value)
    assert "train.steps" in msg and "train.lr" in msg and "eval.every_k" in msg


def test_cli_config_prints_resolved_yaml():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", str(DEMO), "train.steps=9"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "steps: 9" in out.stdout and "global_batch:" in out.stdout


def test_cli_config_unknown_key_exits_nonzero_naming_it():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", str(DEMO), "train.no_such_key=1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0
    assert "train.no_such_key" in out.stderr and "global_batch" in out.stderr


def test_cli_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for name in ("data", "train", "eval", "watch", "run", "export", "config", "report"):
        assert name in out.stdout


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.name=ViT-Z-99"])
    assert "model.name = 'ViT-Z-99'" in str(e.value) and "ViT-B-32" in str(e.value)


def test_cli_config_prints_public_parameter_count_of_vit_b_32():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", str(DEMO), "model.name=ViT-B-32",
                          "data.image_size=224", "data.context_length=77", "data.train_urls=[]"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "total 151,277,313" in out.stdout          # OpenAI CLIP ViT-B/32, vocabulary 49408


def test_list_override_with_brace_patterns_keeps_each_url():
    cfg = load_config(None, ["data.train_urls=[a.tar, s3://x/{0..9}.tar, b/{c,d}.tar]"])
    assert cfg.data.train_urls == ["a.tar", "s3://x/{0..9}.tar", "b/{c,d}.tar"]


@pytest.mark.parametrize("args, expected", [
    (["data", "synth", "--out", "x", "--samples", "-3"], "--samples: expected a positive integer"),
    (["eval", "/nonexistent/step_00000001"], "COMPLETE"),
])
def test_cli_user_errors_are_one_message_not_a_traceback(args, expected):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0
    assert expected in out.stderr and "Traceback" not in out.stderr
