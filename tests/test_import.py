"""`model.init_from`: open_clip folders and checkpoints (a hand-written fixture: open_clip cannot be imported
here), Hugging Face CLIPModel / SiglipModel folders (real transformers), our published checkpoints; the
tokenizer that comes with each; exact embeddings, bit-for-bit round trips, refusals by name."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline import cli
from pipeline.config import Config, ConfigError, load_config
from pipeline.data import clip_tokenizer, train_tokenizer
from pipeline.models import (
    CheckpointError,
    ConversionError,
    build_run_model,
    check_source,
    run_tokenizer,
    save_published,
)
from pipeline.models.export import export
from pipeline.models.init_from import inspect_source
from tests.helpers.open_clip import open_clip_folder, open_clip_reference

CAPTIONS = ["a red square left of a blue circle", "two green stars above a purple triangle", "a photo of a cat",
            "A yellow circle, below a RED square!"]
SIZE, CONTEXT = 32, 16
OC_CFG = {"embed_dim": 24, "quick_gelu": True,
          "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def run_config(init_from: str, *overrides: str) -> Config:
    return load_config(None, [f"model.init_from={init_from}", f"data.image_size={SIZE}",
                              f"data.context_length={CONTEXT}", *overrides])


def images(n: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def features(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features (pooler_output), 4 returned tensors."""
    return F.normalize((out if torch.is_tensor(out) else out.pooler_output).float(), dim=-1)


def close(ours: torch.Tensor, theirs) -> bool:
    return float((ours - features(theirs)).abs().max()) < 1e-5


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random (norms, biases, the probe included): no mapping hides behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------ the CLIP BPE
def test_clip_bpe_gives_open_clips_ids():
    """Expected ids recorded from open_clip 3.3's SimpleTokenizer (benchmarks/interop_open_clip.py compares
    many more strings against the real one): cleaning, lower case, specials, truncation keeping the end."""
    tok = clip_tokenizer(77)
    rows = tok(["a photo of a cat", "A PHOTO of a Dog!", "html &amp; entities &lt;b&gt; &amp;amp; &#39;quote&#39;",
                "mojibake: Ã©tÃ© â€” done", "<start_of_text> inside <END_OF_TEXT> text"])
    expected = [[49406, 320, 1125, 539, 320, 2368, 49407], [49406, 320, 1125, 539, 320, 1929, 256, 49407],
                [49406, 18231, 261, 38134, 283, 321, 285, 261, 262, 4020, 262, 49407],
                [49406, 617, 3252, 11878, 281, 3459, 39694, 2005, 1700, 49407],
                [49406, 49406, 2912, 49407, 4160, 49407]]
    for row, want in zip(rows, expected):
        assert row[:len(want)].tolist() == want and not row[len(want):].any()
    assert clip_tokenizer(16)(["x" * 300])[0].tolist() == [49406] + [32035] * 14 + [49407]
    assert tok.vocab_size == 49408 and tok.eot_id == 49407 and tok.pad_id == 0 and tok.is_clip_bpe


# ------------------------------------------------------------------------------------ open_clip
@pytest.fixture
def oc_folder(tmp_path):
    folder = tmp_path / "oc"
    return folder, open_clip_folder(folder, OC_CFG)


def test_open_clip_folder_gives_open_clips_embeddings_and_tokenizer(oc_folder):
    folder, weights = oc_folder
    cfg = run_config(str(folder))
    model, tok = build_run_model(cfg, 0).eval(), run_tokenizer(cfg)
    assert tok.is_clip_bpe and model.spec.image.act == model.spec.text.act == "quick_gelu"
    tokens, pixels = tok(CAPTIONS), images()
    with torch.no_grad():
        want_image, want_text = open_clip_reference(weights, OC_CFG, pixels, tokens)
        assert (model.encode_image(pixels) - want_image).abs().max() < 1e-5
        assert (model.encode_text(tokens) - want_text).abs().max() < 1e-5
    assert model.logit_scale.item() == 2.5


def test_open_clip_training_checkpoint_with_module_prefixes(oc_folder, tmp_path):
    """epoch_N.pt (state_dict, module. prefixes, optimizer state) + the model config as JSON."""
    folder, weights = oc_folder
    ckpt = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in weights.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}, ckpt)
    (tmp_path / "model.json").write_text(json.dumps(OC_CFG))
    model = build_run_model(run_config(str(ckpt), f"model.init_from_config={tmp_path / 'model.json'}"), 0)
    from_folder = build_run_model(run_config(str(folder)), 0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), from_folder.state_dict().values()))
    with pytest.raises(ConfigError, match="set model.init_from_config to its open_clip model config"):
        check_source(run_config(str(ckpt)))


class _RunsCode:
    def __reduce__(self):
        return (open, ("/tmp/i13a-pickle-ran", "w"))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {"logit_scale": torch.tensor(1.0)}, "payload": _RunsCode()}, ckpt)
    cfg = run_config(str(ckpt), "model.init_from_config=ViT-B-32", "data.image_size=224", "data.context_length=77")
    with pytest.raises(CheckpointError, match="epoch_1.pt: refused: this pickle holds more than tensors"):
        build_run_model(cfg, 0)
    assert not os.path.exists("/tmp/i13a-pickle-ran")


def test_open_clip_round_trip_is_bit_for_bit(oc_folder, tmp_path):
    folder, weights = oc_folder
    cfg = run_config(str(folder))
    url = str(tmp_path / "run" / "published" / "step_00000000")
    save_published(build_run_model(cfg, 0), run_tokenizer(cfg), url, 0, run_config=cfg)
    export(url, "open_clip", str(tmp_path / "out"))
    back = load_file(str(tmp_path / "out" / "open_clip_model.safetensors"))
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    model_cfg = json.load(open(tmp_path / "out" / "open_clip_config.json"))["model_cfg"]
    assert "hf_tokenizer_name" not in model_cfg["text_cfg"], "open_clip's own CLIP BPE is this model's tokenizer"
    assert model_cfg["quick_gelu"] is True and model_cfg["vision_cfg"]["head_width"] == 16


@pytest.mark.parametrize("where, setting, named", [
    ("vision_cfg", {"ls_init_value": 0.1}, "vision_cfg.ls_init_value"),
    ("vision_cfg", {"timm_model_name": "vit_base_patch16_siglip_224"}, "vision_cfg.timm_model_name"),
    ("text_cfg", {"hf_model_name": "roberta-base"}, "text_cfg.hf_model_name"),
    ("vision_cfg", {"layers": [3, 4, 6, 3]}, "ModifiedResNet"),
    ("text_cfg", {"future_option": 1}, "text_cfg.future_option"),
])
def test_what_our_towers_cannot_express_is_refused_by_name(tmp_path, where, setting, named):
    bad = json.loads(json.dumps(OC_CFG))
    bad[where].update(setting)
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": bad}))
    (tmp_path / "oc" / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(ConversionError, match=named):
        inspect_source(str(tmp_path / "oc"))


def test_weights_that_do_not_match_their_config_are_refused(tmp_path):
    folder = tmp_path / "oc"
    weights = open_clip_folder(folder, OC_CFG)
    del weights["visual.ln_post.bias"]
    weights["visual.extra"] = torch.zeros(1)
    save_file(weights, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing visual.ln_post.bias; not understood visual.extra"):
        build_run_model(run_config(str(folder)), 0)


# ------------------------------------------------------------------------------------ Hugging Face
def hf_clip_folder(path, tokenizer, **text):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    config = CLIPConfig(projection_dim=24, vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                              num_attention_heads=3, image_size=SIZE, patch_size=8),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=tokenizer.vocab_size,
                                         max_position_embeddings=CONTEXT, eos_token_id=tokenizer.eot_id, **text))
    model = CLIPModel(config).eval()
    perturb(model)
    model.save_pretrained(str(path))
    (path / "tokenizer.json").write_text(tokenizer.to_json())
    return model


@pytest.fixture(scope="module")
def own_tokenizer():
    return train_tokenizer(CAPTIONS * 4, vocab_size=300, context_length=CONTEXT)


def test_hf_clip_folder_imports_and_round_trips_bit_for_bit(tmp_path, own_tokenizer):
    source = hf_clip_folder(tmp_path / "hf", own_tokenizer, hidden_act="gelu")
    cfg = run_config(str(tmp_path / "hf"))
    model, tok = build_run_model(cfg, 0).eval(), run_tokenizer(cfg)
    tokens, pixels = tok(CAPTIONS), images()
    with torch.no_grad():
        assert close(model.encode_image(pixels), source.get_image_features(pixel_values=pixels))
        assert close(model.encode_text(tokens), source.get_text_features(input_ids=tokens))
    url = str(tmp_path / "run" / "published" / "step_00000000")
    save_published(model, tok, url, 0, run_config=cfg)
    export(url, "hf", str(tmp_path / "out"))
    before, after = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf", "out"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_real_size_vit_b32_from_transformers_gives_its_embeddings(tmp_path):
    """A randomly initialised ViT-B/32 of `transformers.CLIPConfig()` (QuickGELU, 224 px, 77 tokens, 49408 ids)."""
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    source = CLIPModel(CLIPConfig()).eval()
    source.save_pretrained(str(tmp_path / "b32"))
    (tmp_path / "b32" / "tokenizer.json").write_text(clip_tokenizer(77).to_json())
    cfg = load_config(None, [f"model.init_from={tmp_path / 'b32'}", "data.image_size=224", "data.context_length=77"])
    model, tok = build_run_model(cfg, 0).eval(), run_tokenizer(cfg)
    assert (model.spec.image.width, model.spec.image.layers, model.spec.image.patch_size) == (768, 12, 32)
    tokens, pixels = tok(CAPTIONS[:2]), images(2, 224)
    with torch.no_grad():
        assert close(model.encode_image(pixels), source.get_image_features(pixel_values=pixels))
        assert close(model.encode_text(tokens), source.get_text_features(input_ids=tokens))


def hf_siglip_folder(path, tokenizer):
    from transformers import SiglipConfig, SiglipModel
    torch.manual_seed(0)
    config = SiglipConfig(vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=3, image_size=SIZE, patch_size=8),
                          text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, vocab_size=tokenizer.vocab_size,
                                           max_position_embeddings=CONTEXT, projection_size=48))
    model = SiglipModel(config).eval()
    perturb(model)
    model.save_pretrained(str(path))
    (path / "tokenizer.json").write_text(tokenizer.to_json())
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<end>"}))   # SigLIP pads with its end
    return model


def test_hf_siglip_folder_imports_with_its_padding_and_round_trips(tmp_path, own_tokenizer):
    source = hf_siglip_folder(tmp_path / "sig", own_tokenizer)
    cfg = run_config(str(tmp_path / "sig"), "loss.name=siglip")
    model, tok = build_run_model(cfg, 0).eval(), run_tokenizer(cfg)
    tokens, pixels = tok(CAPTIONS), images()
    assert tok.pad_id == tok.eot_id and tokens[0, -1] == tok.eot_id, "padded with the declared pad token"
    with torch.no_grad():
        assert close(model.encode_image(pixels), source.get_image_features(pixel_values=pixels))
        assert close(model.encode_text(tokens), source.get_text_features(input_ids=tokens))
    assert torch.equal(model.logit_bias.data, source.logit_bias.data)
    url = str(tmp_path / "run" / "published" / "step_00000000")
    save_published(model, tok, url, 0, run_config=cfg)
    export(url, "hf", str(tmp_path / "out"))
    before, after = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("sig", "out"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.load(open(tmp_path / "out" / "config.json"))["model_type"] == "siglip"
    with pytest.raises(ConversionError, match="without class token.*pooling 'map'"):
        export(url, "open_clip", str(tmp_path / "oc"))


def test_published_checkpoint_is_a_source_too(tmp_path, oc_folder):
    folder, _ = oc_folder
    cfg = run_config(str(folder))
    first = build_run_model(cfg, 0)
    url = str(tmp_path / "run" / "published" / "step_00000005")
    save_published(first, run_tokenizer(cfg), url, 5, run_config=cfg)
    again = run_config(url)
    assert all(torch.equal(a, b) for a, b in zip(build_run_model(again, 0).state_dict().values(),
                                                 first.state_dict().values()))
    assert run_tokenizer(again).is_clip_bpe


# ------------------------------------------------------------------------------------ LiT and the config
def test_lit_locks_the_imported_image_tower_and_trains_a_new_text_tower(oc_folder, synth, capsys):
    folder, weights = oc_folder
    data = synth(64, image_size=SIZE)
    cfg = run_config(str(folder), "model.init_towers=[image]", "model.image.lock=true", "model.name=tiny",
                     f"data.train_urls=[{data / 'train'}]", "data.context_length=32")
    assert run_tokenizer(cfg) is None, "the new text tower reads the data's tokenizer"
    model = build_run_model(cfg, 500)
    assert torch.equal(model.image_tower.patch_embed.weight, weights["visual.conv1.weight"])
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    assert all(p.requires_grad for p in model.text_tower.parameters()) and model.text_tower.proj.shape == (128, 24)
    assert cli.main(["config", "configs/demo.yaml", f"model.init_from={folder}", "model.init_towers=[image]",
                     "model.image.lock=true", f"data.image_size={SIZE}"]) == 0
    out = capsys.readouterr().out
    assert f"# image: open_clip folder {folder}" in out and "locked" in out
    assert "# text: new, random (tiny's text tower)" in out


def test_config_refuses_sizes_and_tokenizers_that_do_not_fit(oc_folder, capsys):
    folder, _ = oc_folder
    with pytest.raises(ConfigError, match="data.tokenizer = 't.json' .*: expected unset"):
        load_config(None, [f"model.init_from={folder}", "data.tokenizer=t.json"])
    cfg = load_config(None, [f"model.init_from={folder}", "data.image_size=64"])
    with pytest.raises(ConfigError) as e:
        check_source(cfg)
    assert "data.image_size = 64 (from command line): expected 32, the image size of model.init_from" in str(e.value)
    assert "data.context_length = 77 (from defaults): expected 16" in str(e.value)
    assert cli.main(["config", "configs/demo.yaml", "model.init_from=/nowhere"]) == 1
    assert "model.init_from = '/nowhere' (from command line): expected a checkpoint we can start from" in \
        capsys.readouterr().err
    with pytest.raises(CheckpointError, match="found no"):
        inspect_source("/nowhere/either")
